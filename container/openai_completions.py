"""OpenAI's legacy completions API (`POST /v1/completions`): its request and its answer objects."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from handler.chat_schema import OpenAISamplingFields
from handler.errors import InvalidRequestError
from handler.output_format import Generation, openai_finish_reason, usage
from handler.sequence import RequestOutput, SamplingParams, TokenOutput

# OpenAI's documented default for max_tokens in this API.
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(OpenAISamplingFields):
    prompt: list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def sampling_params(self, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> SamplingParams:
        if not self.prompt:
            raise InvalidRequestError("prompt: List should have at least 1 item")
        if self.stream and len(self.prompt) > 1:
            raise InvalidRequestError("streaming answers one prompt at a time: send 'prompt' as a string")
        if self.logprobs:
            raise InvalidRequestError("logprobs > 0 is not supported: the engine returns only the sampled "
                                      "token's log-probability (ask for logprobs=0)")
        for name in ("echo", "best_of", "suffix"):
            value = getattr(self, name)
            if value and not (name == "best_of" and value == 1):
                raise InvalidRequestError(f"{name} is not supported")
        return super().sampling_params(default_max_tokens)


def completion(generations: list[Generation], *, completion_id: str, model: str, created: int,
               logprobs: bool) -> dict:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": generation.text,
                "logprobs": _logprobs(generation.tokens) if logprobs else None,
                "finish_reason": openai_finish_reason(generation.finish_reason),
            }
            for index, generation in enumerate(generations)
        ],
        "usage": {
            key: sum(usage(generation)[key] for generation in generations)
            for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        },
    }


def completion_chunks(generation: Generation, output: RequestOutput, *, completion_id: str, model: str,
                      created: int, logprobs: bool) -> list[dict]:
    tokens: list[TokenOutput | None] = list(output.tokens) or [None]
    return [
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": token.text if token else "",
                    "logprobs": _logprobs([token]) if logprobs and token else None,
                    "finish_reason": (openai_finish_reason(generation.finish_reason)
                                      if output.finished and index == len(tokens) - 1 else None),
                }
            ],
        }
        for index, token in enumerate(tokens)
    ]


def _logprobs(tokens: list[TokenOutput]) -> dict:
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": [token.log_prob for token in tokens],
        "top_logprobs": None,
        "text_offset": offsets,
    }
