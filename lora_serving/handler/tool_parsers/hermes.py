"""Hermes' and Qwen's form: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per
call, after any content."""

from __future__ import annotations

import json
import re

from lora_serving.handler.tool_parsers.base import (
    MarkedToolCallParser, ParsedToolCall, call_in_progress, tool_call_from_object,
)

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.DOTALL)


class HermesToolParser(MarkedToolCallParser):
    marker = START

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        blocks = [match.group(1) for match in _BLOCK.finditer(tool_text)]
        if final:
            # A model may stop (EOS, a stop string) after its last call's JSON without closing the block.
            rest = tool_text[_closed_up_to(tool_text):].strip()
            if rest.startswith(START):
                blocks.append(rest[len(START):])
            # Other text after the calls is dropped, as vLLM drops it: the answer is the calls.
        calls = []
        for block in blocks:
            try:
                call = tool_call_from_object(json.loads(block), block.strip())
            except json.JSONDecodeError:
                call = None
            if call is None:
                if final:
                    return None
                break  # a malformed block: the final parse decides
            calls.append(call)
        return calls

    def call_in_progress(self, tool_text: str) -> ParsedToolCall | None:
        if len(self.calls(tool_text, final=False)) != len(_BLOCK.findall(tool_text)):
            return None  # a closed block did not parse: nothing after it streams
        rest = tool_text[_closed_up_to(tool_text):]
        opened = rest.find(START)
        return None if opened == -1 else call_in_progress(rest, opened + len(START))


def _closed_up_to(tool_text: str) -> int:
    return max((match.end() for match in _BLOCK.finditer(tool_text)), default=0)
