"""Llama 3.x's JSON form: the answer is `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` when
the tokenizer keeps it), several calls separated by `;`; an answer that starts otherwise is content."""

from __future__ import annotations

from lora_serving.handler.tool_parsers.base import ParsedToolCall, ToolCallParser, json_values, tool_call_from_object

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolCallParser):
    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        return 0 if stripped.startswith(PYTHON_TAG) or stripped.startswith("{") else None

    def undecided_tail(self, text: str) -> int:
        # Only the answer's beginning can start calls: held back while it is blank or a beginning of the tag.
        stripped = text.lstrip()
        return len(text) if PYTHON_TAG.startswith(stripped) else 0

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        if not final:  # a JSON object is known whole only at the end
            return []
        tool_text = tool_text.lstrip()
        if tool_text.startswith(PYTHON_TAG):
            tool_text = tool_text[len(PYTHON_TAG):]
        values = json_values(tool_text, separator=";")
        if not values:
            return None
        calls = [tool_call_from_object(value, ("parameters", "arguments")) for value in values]
        return None if None in calls else calls
