"""What every tool-call parser provides, and the JSON reading they share.

A call streams as it is written once its head, `{"name": "...", "arguments": ` (or the key a format names
the arguments by), is complete: its name first, then its arguments object piece by piece, as vLLM streams
them. The arguments a call answers are the object's text as the model wrote it, so that the pieces a stream
sent add up to the arguments of the whole answer; arguments written otherwise (as JSON text in a string,
or before the name) are answered as JSON once the call is complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from lora_serving.handler.sequence import SamplingParams

# The head of a call object whose arguments can stream: its name, then the key of its arguments.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(\w+)"\s*:\s*')

# Every character JSON text may hold outside its strings (structure, whitespace, numbers, literals).
_JSON_OUTSIDE_STRINGS = frozenset(' \t\r\n{}[],:-+.0123456789eEtruefalsn')


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

    def call_in_progress(self, tool_text: str) -> ParsedToolCall | None:
        """The call being written after the complete ones, once its name is known, with the part of its
        arguments' text written so far ("" where they cannot stream); None while there is none."""
        raise NotImplementedError

    def adjust_request(self, params: SamplingParams) -> None:
        """What the format needs of generation, as vLLM's parsers' adjust_request: each format's marker
        (`[TOOL_CALLS]`, `<|python_tag|>`, `<tool_call>`) is a special token in some of its models'
        tokenizers, and text without special tokens would lose it; the answer's content ends before it."""
        params.skip_special_tokens = False


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


def tool_call_from_object(value: Any, text: str, arguments_keys: tuple[str, ...] = ("arguments",)
                          ) -> ParsedToolCall | None:
    """`{"name": str, "arguments": {...}}` (or the key a format names them by), written as `text`, as a call;
    None if it is not."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    key = next((key for key in arguments_keys if key in value), None)
    arguments = value[key] if key is not None else {}
    if isinstance(arguments, dict):
        head = _CALL_HEAD.match(text)
        if head and head.group(2) == key and text.startswith("{", head.end()):
            written = _object_text(text, head.end())
            if len(written) > 1 and written.endswith("}"):
                return ParsedToolCall(value["name"], written)
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def call_in_progress(text: str, position: int, arguments_keys: tuple[str, ...] = ("arguments",)
                     ) -> ParsedToolCall | None:
    """The call whose object begins at `position` of `text` (after whitespace), as far as it is written."""
    head = _CALL_HEAD.match(text, position)
    if head is None or head.group(2) not in arguments_keys:
        return None
    try:
        name = json.loads(f'"{head.group(1)}"')
    except json.JSONDecodeError:
        return None
    streams = text.startswith("{", head.end())
    return ParsedToolCall(name, _object_text(text, head.end()) if streams else "")


def _object_text(text: str, start: int) -> str:
    """The JSON object's text from `start` (its `{`) to its closing brace, or while it is open, as far as it
    can be JSON (to the end of `text`, or to a character JSON has no place for outside its strings)."""
    depth, in_string, escaped = 0, False, False
    for index in range(start, len(text)):
        character = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "{[":
            depth += 1
        elif character in "}]":
            depth -= 1
            if depth == 0:
                return text[start:index + 1]
        elif character not in _JSON_OUTSIDE_STRINGS:
            return text[start:index]
    return text[start:]


def json_values(text: str, position: int = 0, separator: str = "") -> tuple[list[tuple[Any, str]], int]:
    """The JSON values written one after another from `position` in `text` (separated by whitespace and
    `separator`), each with its text, and where the rest (the first that does not parse) begins."""
    decoder = json.JSONDecoder()
    values = []
    while True:
        position = _skip(text, position, " \t\r\n" + separator)
        if position == len(text):
            return values, position
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return values, position
        values.append((value, text[position:end]))
        position = end


def calls_in_values(values: list[tuple[Any, str]], final: bool,
                    arguments_keys: tuple[str, ...] = ("arguments",)) -> list[ParsedToolCall] | None:
    """The values (from json_values) as calls: up to the first that is not one, or, `final`, None if one is
    not."""
    calls = []
    for value, text in values:
        call = tool_call_from_object(value, text, arguments_keys)
        if call is None:
            return None if final else calls
        calls.append(call)
    return calls


def _skip(text: str, position: int, characters: str) -> int:
    while position < len(text) and text[position] in characters:
        position += 1
    return position
