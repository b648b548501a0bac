"""OpenAI's legacy completions API (`POST /v1/completions`): its request and its answer objects.

`echo` puts the prompt before each choice's text, as vLLM does (in a stream, before the choice's first
token); with `logprobs` it would also need the prompt's log-probabilities, which are not served here.
"""

from __future__ import annotations

from typing import Any

from pydantic import field_validator

from lora_serving.handler.api.openai_fields import OpenAISamplingFields
from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.api.openai_answer import openai_finish_reason, usage, usage_chunk
from lora_serving.handler.api.generation import Choice, Generation
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
        if self.suffix:
            raise InvalidRequestError("suffix is not supported: this server does not fill in the middle")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo with logprobs is not supported: the prompt's log-probabilities are "
                                      "not served; send one of them")
        return super().sampling_params(default_max_tokens, top_log_probs=self.logprobs or 0, best_of=self.best_of)


def completion(generations: list[Generation], *, completion_id: str, model: str, created: int,
               logprobs: bool, echo: bool = False) -> dict:
    """Every prompt's n choices, numbered prompt by prompt (prompt i's j-th choice is i * n + j)."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            _choice(len(chosen) * prompt_index + index, choice, logprobs, generation.prompt if echo else "")
            for prompt_index, (generation, chosen) in enumerate((generation, generation.returned())
                                                                for generation in generations)
            for index, choice in enumerate(chosen)
        ],
        "usage": usage(generations),
    }


def _choice(index: int, choice: Choice, logprobs: bool, echoed: str) -> dict:
    return {"index": index, "text": echoed + choice.text, "logprobs": _logprobs(choice.tokens) if logprobs else None,
            "finish_reason": openai_finish_reason(choice.finish_reason)}


class CompletionChunks:
    """The chunks of one streamed completion, engine step by engine step: one per token (the prompt before
    each choice's first when echoed), then a usage chunk when the client asked for `include_usage`."""

    def __init__(self, generation: Generation, *, completion_id: str, model: str, created: int, logprobs: bool,
                 echo: bool = False, include_usage: bool = False) -> None:
        self._generation = generation
        self._identity = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
        self._usage_identity = {"completion_id": completion_id, "model": model, "created": created}
        self._logprobs = logprobs
        self._echo = echo
        self._include_usage = include_usage
        self._started: set[int] = set()

    def for_output(self, output: RequestOutput) -> list[dict]:
        """What `output` (already added to the generation) adds to the stream."""
        choice = self._generation.choices[output.index]
        tokens: list[TokenOutput | None] = list(output.tokens) or [None]
        chunks = []
        for position, token in enumerate(tokens):
            text = token.text if token else ""
            if choice.index not in self._started:
                self._started.add(choice.index)
                text = (self._generation.prompt if self._echo else "") + text
            is_last = output.finished and position == len(tokens) - 1
            chunks.append({**self._identity, "choices": [{
                "index": choice.index,
                "text": text,
                "logprobs": _logprobs([token]) if self._logprobs and token else None,
                "finish_reason": openai_finish_reason(choice.finish_reason) if is_last else None,
            }]})
        if self._include_usage and self._generation.finished and output.finished:
            chunks.append(usage_chunk(self._generation, object_name="text_completion", **self._usage_identity))
        return chunks


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
