"""Tool-call parsers for `tool_choice: "auto"`: each finds the calls a model family writes in its own format
in the answer's text (`option.tool_call_parser`, vLLM's and LMI's names).

A parser answers three questions about the text generated so far: where its tool calls begin (the text
before is the answer's content), how much of the text's end might still turn out to begin them (held back
from a stream until it is known), and which calls the text holds. A final text whose calls do not parse is
the answer's content, as vLLM answers it: a model that meant to call a tool and wrote it wrong is shown.
"""

from __future__ import annotations

from lora_serving.handler.tool_parsers.base import ParsedToolCall, ToolCallParser
from lora_serving.handler.tool_parsers.hermes import HermesToolParser
from lora_serving.handler.tool_parsers.llama3_json import Llama3JsonToolParser
from lora_serving.handler.tool_parsers.mistral import MistralToolParser

TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolParser,
    # Qwen2.5 and Qwen3 write Hermes' <tool_call> form; vLLM serves them with "hermes".
    "qwen": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}

__all__ = ["TOOL_CALL_PARSERS", "ParsedToolCall", "ToolCallParser"]
