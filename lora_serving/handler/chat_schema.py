"""Chat requests (`{"messages": [...]}`), which LMI answers as OpenAI chat completions, and the OpenAI
sampling fields that the chat and completions APIs share.

OpenAI semantics, not LMI's: sampling is on unless temperature is 0, and `max_tokens` caps the answer.
Fields this engine cannot honour, and fields it does not know, are refused by name rather than silently
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_serving.handler.chat_answer import AnswerPlan
from lora_serving.handler.chat_prompt import render_chat_prompt
from lora_serving.handler.config import Config
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.lmi_schema import token_id_keys, validate_model
from lora_serving.handler.reasoning_parsers import REASONING_PARSERS
from lora_serving.handler.sequence import DEFAULT_MAX_NEW_TOKENS, SamplingParams, StructuredOutput
from lora_serving.handler.structured_fields import GuidedDecodingFields, response_format
from lora_serving.handler.tool_schema import ToolDefinition, ToolPlan, tool_plan


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    # A last chunk with the usage and no choices, as OpenAI sends it.
    include_usage: bool = False


class OpenAISamplingFields(GuidedDecodingFields):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    stream: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] = {}
    response_format: dict | None = None
    stream_options: StreamOptions | None = None
    # OpenAI's own bookkeeping, which changes nothing in what is generated: an end-user id for abuse
    # monitoring, storing the completion and its tags for OpenAI's dashboard, the processing tier. Clients
    # (the SDK's helpers, LangChain) attach them; refusing them would fail those clients for nothing.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    # Extensions that vLLM's OpenAI server also accepts.
    top_k: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] = []
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, default_max_tokens: int, *, top_log_probs: int = 0, best_of: int | None = None,
                        tool_grammar: StructuredOutput | None = None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed with stream: true")
        max_tokens = self.requested_max_tokens()
        return SamplingParams(
            max_new_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            n=self.n,
            best_of=best_of,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_p=self.min_p,
            typical_p=self.typical_p,
            min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids,
            logit_bias=token_id_keys(self.logit_bias, "logit_bias"),
            top_n_tokens=top_log_probs,
            structured=self.structured_output(others=(
                response_format(self.response_format) if self.response_format is not None else None, tool_grammar)),
        )


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
    return PreparedChat(prompt, chat.sampling_params(tool_grammar=tools.grammar if tools else None),
                        AnswerPlan(tools, reasoning))
