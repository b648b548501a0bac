"""OpenAI's legacy completions API (`POST /v1/completions`): its request and its answer objects."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from lora_serving.handler.chat_schema import OpenAISamplingFields
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.openai_format import openai_finish_reason, usage
from lora_serving.handler.output_format import Choice, Generation
from lora_serving.handler.sequence import RequestOutput, SamplingParams, TokenOutput

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
        if self.stream and self.best_of not in (None, self.n):
            raise InvalidRequestError("best_of cannot be streamed: the best are known only at the end")
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported")
        return super().sampling_params(default_max_tokens, top_log_probs=self.logprobs or 0, best_of=self.best_of)


def completion(generations: list[Generation], *, completion_id: str, model: str, created: int,
               logprobs: bool) -> dict:
    """Every prompt's n choices, numbered prompt by prompt (prompt i's j-th choice is i * n + j)."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            _choice(len(chosen) * prompt_index + index, choice, logprobs)
            for prompt_index, chosen in enumerate(generation.returned() for generation in generations)
            for index, choice in enumerate(chosen)
        ],
        "usage": usage(generations),
    }


def _choice(index: int, choice: Choice, logprobs: bool) -> dict:
    return {"index": index, "text": choice.text, "logprobs": _logprobs(choice.tokens) if logprobs else None,
            "finish_reason": openai_finish_reason(choice.finish_reason)}


def completion_chunks(generation: Generation, output: RequestOutput, *, completion_id: str, model: str,
                      created: int, logprobs: bool) -> list[dict]:
    choice = generation.choices[output.index]
    tokens: list[TokenOutput | None] = list(output.tokens) or [None]
    return [
        {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": output.index,
                    "text": token.text if token else "",
                    "logprobs": _logprobs([token]) if logprobs and token else None,
                    "finish_reason": (openai_finish_reason(choice.finish_reason)
                                      if output.finished and position == len(tokens) - 1 else None),
                }
            ],
        }
        for position, token in enumerate(tokens)
    ]


def _logprobs(tokens: list[TokenOutput]) -> dict:
    """The legacy shape: parallel lists, and per token a {text: log-probability} of its alternatives."""
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    with_top = any(token.top_tokens for token in tokens)
    return {
        "tokens": [token.listed_text for token in tokens],
        "token_logprobs": [token.log_prob for token in tokens],
        "top_logprobs": [{top.text: top.log_prob for top in token.top_tokens or ()} for token in tokens]
        if with_top else None,
        "text_offset": offsets,
    }
