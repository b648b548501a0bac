"""Chat requests (`{"messages": [...]}`), which LMI answers as OpenAI chat completions: the messages, tools,
log-probabilities, and the prompt and plan they become. Fields this engine cannot honour, and fields it does not know, are refused by name rather than silently
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_serving.handler.api.chat_answer import AnswerPlan
from lora_serving.handler.api.chat_prompt import render_chat_prompt
from lora_serving.handler.api.openai_fields import OpenAISamplingFields
from lora_serving.handler.api.tool_schema import ToolDefinition, ToolPlan, tool_plan
from lora_serving.handler.api.validation import validate_model
from lora_serving.handler.config import Config
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.reasoning_parsers import REASONING_PARSERS
from lora_serving.handler.sequence import DEFAULT_MAX_NEW_TOKENS, SamplingParams, StructuredOutput


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI answers it


class MessageToolCall(BaseModel):
    """A call an earlier assistant message made, sent back with the conversation."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None  # a `tool` message: the call it answers
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        unsupported = sorted({part.type for part in self.content if part.type != "text"})
        if unsupported:
            raise InvalidRequestError(f"message content of type {', '.join(unsupported)} is not supported: "
                                      "this model reads text only")
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(OpenAISamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    # LMI's chat form may name the adapter in the body, as its text form does.
    adapters: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def sampling_params(self, default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS, *,
                        tool_grammar: StructuredOutput | None = None) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true")
        return super().sampling_params(default_max_tokens, top_log_probs=self.top_logprobs or 0,
                                       tool_grammar=tool_grammar)

    def tool_plan(self, config: Config) -> ToolPlan | None:
        return tool_plan(self.tools, self.tool_choice, self.parallel_tool_calls,
                         enable_auto_tool_choice=config.enable_auto_tool_choice,
                         tool_call_parser=config.tool_call_parser)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    return validate_model(ChatCompletionRequest, body)


@dataclass(slots=True)
class PreparedChat:
    """What a chat request becomes: the engine's prompt and parameters, and how to read its answer."""

    prompt: str
    params: SamplingParams
    answer: AnswerPlan


def prepare_chat(chat: ChatCompletionRequest, tokenizer, config: Config) -> PreparedChat:
    tools = chat.tool_plan(config)
    prompt = render_chat_prompt(tokenizer, chat.messages,
                                [tool.model_dump(exclude_none=True) for tool in chat.tools] if chat.tools else None)
    reasoning = REASONING_PARSERS[config.reasoning_parser] if config.reasoning_parser else None
    params = chat.sampling_params(tool_grammar=tools.grammar if tools else None)
    if tools is not None:
        tools.adjust_request(params)
    return PreparedChat(prompt, params, AnswerPlan(tools, reasoning))
