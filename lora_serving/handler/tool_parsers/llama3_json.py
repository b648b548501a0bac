"""Llama 3.x's JSON form: the answer is `{"name": ..., "parameters": {...}}` (after `<|python_tag|>` when
the tokenizer keeps it), several calls separated by `;`; an answer that starts otherwise is content."""

from __future__ import annotations

from lora_serving.handler.tool_parsers.base import (
    ParsedToolCall, ToolCallParser, call_in_progress, calls_in_values, json_values,
)

PYTHON_TAG = "<|python_tag|>"
ARGUMENTS_KEYS = ("parameters", "arguments")


class Llama3JsonToolParser(ToolCallParser):
    def start(self, text: str) -> int | None:
        stripped = text.lstrip()
        return 0 if stripped.startswith(PYTHON_TAG) or stripped.startswith("{") else None

    def undecided_tail(self, text: str) -> int:
        # Only the answer's beginning can start calls: held back while it is blank or a beginning of the tag.
        stripped = text.lstrip()
        return len(text) if PYTHON_TAG.startswith(stripped) else 0

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        values, rest = json_values(_body(tool_text), separator=";")
        if final and (not values or rest != len(_body(tool_text))):
            return None
        return calls_in_values(values, final, ARGUMENTS_KEYS)

    def call_in_progress(self, tool_text: str) -> ParsedToolCall | None:
        body = _body(tool_text)
        values, rest = json_values(body, separator=";")
        if len(calls_in_values(values, False, ARGUMENTS_KEYS)) != len(values):
            return None
        return call_in_progress(body, rest, ARGUMENTS_KEYS)


def _body(tool_text: str) -> str:
    tool_text = tool_text.lstrip()
    return tool_text[len(PYTHON_TAG):] if tool_text.startswith(PYTHON_TAG) else tool_text
