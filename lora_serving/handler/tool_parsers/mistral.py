"""Mistral's form: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`, after any
content. (Mistral's later `[TOOL_CALLS]name[ARGS]{...}` form is not read.)"""

from __future__ import annotations

from lora_serving.handler.tool_parsers.base import (
    MarkedToolCallParser, ParsedToolCall, json_values, tool_call_from_object,
)

START = "[TOOL_CALLS]"


class MistralToolParser(MarkedToolCallParser):
    marker = START

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        if not final:
            return []
        values = json_values(tool_text[len(START):])
        if values is None or len(values) != 1:
            return None
        listed = values[0] if isinstance(values[0], list) else [values[0]]
        calls = [tool_call_from_object(value) for value in listed]
        return None if not calls or None in calls else calls
