"""Mistral's form: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`, after any
content. (Mistral's later `[TOOL_CALLS]name[ARGS]{...}` form is not read.)"""

from __future__ import annotations

from lora_serving.handler.tool_parsers.base import (
    ParsedToolCall, ToolCallParser, json_values, partial_marker_length, tool_call_from_object,
)

START = "[TOOL_CALLS]"


class MistralToolParser(ToolCallParser):
    def start(self, text: str) -> int | None:
        index = text.find(START)
        return index if index != -1 else None

    def undecided_tail(self, text: str) -> int:
        return partial_marker_length(text, START)

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        if not final:
            return []
        values = json_values(tool_text[len(START):])
        if values is None or len(values) != 1:
            return None
        listed = values[0] if isinstance(values[0], list) else [values[0]]
        calls = [tool_call_from_object(value) for value in listed]
        return None if not calls or None in calls else calls
