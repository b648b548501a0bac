"""The OpenAI sampling fields that the chat and completions APIs share, on the fields every format shares.

OpenAI semantics, not LMI's: sampling is on unless temperature is 0, and `max_tokens` caps the answer.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lora_serving.handler.api.sampling_fields import SamplingFields
from lora_serving.handler.api.structured_fields import response_format
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.sequence import SamplingParams, StructuredOutput


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    # A last chunk with the usage and no choices, as OpenAI sends it.
    include_usage: bool = False


class OpenAISamplingFields(SamplingFields):
    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    n: int = 1
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
    min_tokens: int = 0
    ignore_eos: bool = False

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
        return self.build_sampling_params(
            max_new_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            do_sample=self.temperature > 0,
            ignore_eos=self.ignore_eos,
            n=self.n,
            best_of=best_of,
            min_tokens=self.min_tokens,
            top_n_tokens=top_log_probs,
            structured=self.structured_output(others=(
                response_format(self.response_format) if self.response_format is not None else None, tool_grammar)),
        )
