"""Mistral's form: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}` (or one such
object), after any content. (Mistral's later `[TOOL_CALLS]name[ARGS]{...}` form is not read.)"""

from __future__ import annotations

from lora_serving.handler.tool_parsers.base import (
    MarkedToolCallParser, ParsedToolCall, call_in_progress, calls_in_values, json_values,
)

START = "[TOOL_CALLS]"


class MistralToolParser(MarkedToolCallParser):
    marker = START

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        body, values, rest = _read(tool_text)
        if final:
            listed = body.lstrip().startswith("[")
            tail = body[rest:].strip()
            if not values or (tail != "]" if listed else tail or len(values) != 1):
                return None
        return calls_in_values(values, final)

    def call_in_progress(self, tool_text: str) -> ParsedToolCall | None:
        body, values, rest = _read(tool_text)
        if len(calls_in_values(values, False)) != len(values):
            return None
        return call_in_progress(body, rest)


def _read(tool_text: str) -> tuple[str, list, int]:
    """The text after the marker, the call objects complete in it (inside the list, or the one object), and
    where the rest begins."""
    body = tool_text[len(START):]
    stripped = body.lstrip()
    position = len(body) - len(stripped) + (1 if stripped.startswith("[") else 0)
    values, rest = json_values(body, position, separator=",")
    return body, values, rest
