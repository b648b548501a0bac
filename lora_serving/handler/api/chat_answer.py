"""What a chat answer's text means when tools or reasoning are in play: one choice's text, as it grows,
split into OpenAI message deltas (`reasoning_content`, `content`, `tool_calls`), and the whole message.

The text goes through the reasoning parser (when the server has one), then what is left of it through the
request's tool plan: with `named`, the text is the function's arguments and streams as they are
generated; with `required`, it is the list of calls, each sent once whole; with `auto`, the tool-call parser
finds where calls begin, content before streams at once (less what may yet begin a call), and each call
streams as vLLM streams it: its index, id, type and name once the name is written, then its arguments piece
by piece (tool_parsers/base.py). The streamed deltas and the whole message come from the same steps.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from lora_serving.handler.reasoning_parsers import ThinkParser
from lora_serving.handler.tool_parsers import ParsedToolCall
from lora_serving.handler.api.tool_schema import ToolPlan


@dataclass(frozen=True, slots=True)
class AnswerPlan:
    tools: ToolPlan | None = None
    reasoning: ThinkParser | None = None

    @property
    def is_plain(self) -> bool:
        """The text is the content, as it comes."""
        return self.reasoning is None and (self.tools is None or self.tools.mode == "none")


PLAIN_ANSWER = AnswerPlan()


class ChoiceInterpreter:
    """One choice's text as message deltas. `feed` each piece of text in order, the last with `final`."""

    def __init__(self, plan: AnswerPlan) -> None:
        self._plan = plan
        self._tool_mode = plan.tools.mode if plan.tools is not None else "none"
        self._text = ""
        self._reasoning_sent = 0
        self._content_sent = 0
        self._arguments_sent = 0  # `named`: characters of the arguments streamed
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[dict] = []

    @property
    def called_tools(self) -> bool:
        return bool(self.tool_calls)

    def feed(self, text: str, final: bool) -> dict:
        """The delta that `text`, appended to the choice, adds (empty when all of it is held back)."""
        self._text += text
        delta: dict = {}
        if self._plan.reasoning is not None:
            reasoning, rest = self._plan.reasoning.split(self._text, final)
            if len(reasoning) > self._reasoning_sent:
                delta["reasoning_content"] = reasoning[self._reasoning_sent:]
                self._reasoning_sent = len(reasoning)
                self.reasoning = reasoning
        else:
            rest = self._text
        content, calls = self._interpret(rest, final)
        if content:
            delta["content"] = content
            self.content += content
        if calls:
            delta["tool_calls"] = calls
        return delta

    def message(self) -> dict:
        # Blank text beside calls (the newline before `<tool_call>`) is no content.
        blank = not self.content or (self.tool_calls and not self.content.strip())
        message: dict = {"role": "assistant", "content": None if blank else self.content}
        if self._plan.reasoning is not None:
            message["reasoning_content"] = self.reasoning or None
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        return message

    def _interpret(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """(new content, new tool-call deltas) of the answer text after reasoning."""
        if self._tool_mode == "named":
            return "", self._named_call_delta(text, final)
        if self._tool_mode == "required":
            return "", self._call_deltas(_required_calls(text))
        if self._tool_mode == "auto":
            return self._auto(text, final)
        return self._new_content(text, len(text)), []

    def _auto(self, text: str, final: bool) -> tuple[str, list[dict]]:
        parser = self._plan.tools.parser
        start = parser.start(text)
        if start is None:
            visible = len(text) if final else len(text) - parser.undecided_tail(text)
            return self._new_content(text, visible), []
        content = self._new_content(text, start)
        calls = parser.calls(text[start:], final)
        if calls is None:  # malformed: the model's text is the answer
            return content + self._new_content(text, len(text)), []
        if not self._plan.tools.parallel:
            calls = calls[:1]
        writing = None
        if not final and (self._plan.tools.parallel or not calls):
            writing = parser.call_in_progress(text[start:])
        return content, self._call_deltas(calls + ([writing] if writing is not None else []))

    def _new_content(self, text: str, end: int) -> str:
        new = text[self._content_sent:end] if end > self._content_sent else ""
        self._content_sent = max(self._content_sent, end)
        return new

    def _call_deltas(self, calls: list[ParsedToolCall]) -> list[dict]:
        """What `calls` (complete ones, the last perhaps still being written) add to the calls sent: a new
        call whole with its id, and to a call sent before, the end of its arguments that is new."""
        deltas = []
        for index, call in enumerate(calls):
            if index == len(self.tool_calls):
                entry = _tool_call(call.name, call.arguments)
                self.tool_calls.append(entry)
                deltas.append({"index": index, **entry, "function": dict(entry["function"])})
                continue
            sent = self.tool_calls[index]["function"]
            if len(call.arguments) > len(sent["arguments"]) and call.arguments.startswith(sent["arguments"]):
                deltas.append({"index": index, "function": {"arguments": call.arguments[len(sent["arguments"]):]}})
                sent["arguments"] = call.arguments
        return deltas

    def _named_call_delta(self, arguments: str, final: bool) -> list[dict]:
        new = arguments[self._arguments_sent:]
        self._arguments_sent = len(arguments)
        if not self.tool_calls:
            entry = _tool_call(self._plan.tools.function, "")
            self.tool_calls.append(entry)
            delta = {"index": 0, **entry, "function": {**entry["function"], "arguments": new}}
        elif new:
            delta = {"index": 0, "function": {"arguments": new}}
        else:
            return []
        self.tool_calls[0]["function"]["arguments"] += new
        return [delta]


def _tool_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _required_calls(text: str) -> list[ParsedToolCall]:
    """The calls complete so far in a `required` answer: the list of `{"name", "parameters"}` its JSON schema
    (tool_schema.py) makes it write, item by item; a list cut off by max_tokens answers its whole items."""
    decoder = json.JSONDecoder()
    calls, position = [], text.find("[") + 1
    while position:
        while position < len(text) and text[position] in " \n\t,":
            position += 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break
        calls.append(ParsedToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
    return calls
