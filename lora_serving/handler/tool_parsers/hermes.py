"""Hermes' and Qwen's form: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per
call, after any content."""

from __future__ import annotations

import json
import re

from lora_serving.handler.tool_parsers.base import MarkedToolCallParser, ParsedToolCall, tool_call_from_object

START, END = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(START) + r"(.*?)" + re.escape(END), re.DOTALL)


class HermesToolParser(MarkedToolCallParser):
    marker = START

    def calls(self, tool_text: str, final: bool) -> list[ParsedToolCall] | None:
        blocks = [match.group(1) for match in _BLOCK.finditer(tool_text)]
        if final:
            # A model may stop (EOS, a stop string) after its last call's JSON without closing the block.
            closed_up_to = max((match.end() for match in _BLOCK.finditer(tool_text)), default=0)
            rest = tool_text[closed_up_to:].strip()
            if rest.startswith(START):
                blocks.append(rest[len(START):])
            # Other text after the calls is dropped, as vLLM drops it: the answer is the calls.
        calls = []
        for block in blocks:
            try:
                call = tool_call_from_object(json.loads(block))
            except json.JSONDecodeError:
                call = None
            if call is None:
                if final:
                    return None
                break  # a malformed block: the final parse decides
            calls.append(call)
        return calls
