"""Reasoning parsers (`option.reasoning_parser`): the thinking a reasoning model writes between `<think>`
and `</think>` goes into `reasoning_content`, the rest into `content`, in answers and in streamed deltas,
as vLLM splits them.

`qwen3`: the answer thinks only when it begins with `<think>` (Qwen3 with thinking switched off answers
directly). `deepseek_r1`: the answer is thinking until `</think>`, whether or not `<think>` was written
(DeepSeek-R1's template puts it in the prompt). A thought cut off before `</think>` stays reasoning.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_serving.handler.tool_parsers.base import partial_marker_length

START, END = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ThinkParser:
    starts_thinking: bool

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of `text` so far; text that may yet be a marker is in neither until `final`.
        Each grows only at its end as `text` grows, so that a stream can send the difference."""
        body = text
        if not self.starts_thinking:
            stripped = text.lstrip()
            if not stripped.startswith(START):
                undecided = START.startswith(stripped) and not final
                return "", "" if undecided else text
            body = stripped[len(START):]
        elif body.startswith(START):
            body = body[len(START):]
        elif START.startswith(body) and not final:
            return "", ""
        end = body.find(END)
        if end == -1:
            held = 0 if final else partial_marker_length(body, END)
            return body[: len(body) - held], ""
        return body[:end], body[end + len(END):]


REASONING_PARSERS = {"qwen3": ThinkParser(starts_thinking=False), "deepseek_r1": ThinkParser(starts_thinking=True)}
