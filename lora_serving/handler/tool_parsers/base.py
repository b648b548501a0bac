"""What every tool-call parser provides, and the JSON reading they share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI answers it


class ToolCallParser:
    def start(self, text: str) -> int | None:
        """Where the tool calls begin in `text`, or None while there are none (yet)."""
        raise NotImplementedError

    def undecided_tail(self, text: str) -> int:
        """How many characters at the end of `text` (which holds no start) may yet begin tool calls."""
        raise NotImplementedError

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        """The calls complete in `tool_text` (the text from `start` on). With `final`, the text is the whole
        answer's: None if it does not hold well-formed calls."""
        raise NotImplementedError


class MarkedToolCallParser(ToolCallParser):
    """A format whose calls begin at a fixed marker (`<tool_call>`, `[TOOL_CALLS]`)."""

    marker: str

    def start(self, text: str) -> int | None:
        index = text.find(self.marker)
        return index if index != -1 else None

    def undecided_tail(self, text: str) -> int:
        return partial_marker_length(text, self.marker)


def partial_marker_length(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def tool_call_from_object(value: Any, arguments_keys: tuple[str, ...] = ("arguments",)) -> ParsedToolCall | None:
    """`{"name": str, "arguments": {...}}` (or the key a format names them by) as a call; None if it is not."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[key] for key in arguments_keys if key in value), {})
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def json_values(text: str, separator: str = "") -> list[Any] | None:
    """The JSON values written one after another in `text` (separated by whitespace and `separator`);
    None if anything else is there."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        position = _skip(text, position, " \t\r\n" + separator)
        if position == len(text):
            return values
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position
