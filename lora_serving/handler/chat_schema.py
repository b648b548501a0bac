"""Chat requests (`{"messages": [...]}`), which LMI answers as OpenAI chat completions, and the OpenAI
sampling fields that the chat and completions APIs share.

OpenAI semantics, not LMI's: sampling is on unless temperature is 0, and `max_tokens` caps the answer.
Fields this engine cannot honour, and fields it does not know, are refused by name rather than silently
ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.lmi_schema import token_id_keys, validate_model
from lora_serving.handler.sequence import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from lora_serving.handler.structured_fields import GuidedDecodingFields, response_format


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

    def sampling_params(self, default_max_tokens: int, *, top_log_probs: int = 0,
                        best_of: int | None = None) -> SamplingParams:
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
                response_format(self.response_format) if self.response_format is not None else None,)),
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None

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
    # LMI's chat form may name the adapter in the body, as its text form does.
    adapters: str | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def sampling_params(self, default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true")
        return super().sampling_params(default_max_tokens, top_log_probs=self.top_logprobs or 0)


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    return validate_model(ChatCompletionRequest, body)


def render_chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt text the model's own chat template makes of `messages`, ending where the assistant
    answers."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template: send 'inputs' instead of 'messages'")
    conversation = [{"role": message.role, "content": message.text()} for message in messages]
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template raises for conversations it rejects (e.g. roles out of order)
        raise InvalidRequestError(f"the chat template rejected these messages: {error}") from None
