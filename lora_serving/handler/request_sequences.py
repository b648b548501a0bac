"""A request's sequences, one per choice (n / best_of), checked against what this engine can serve.

The first sequence is the one prefilled; the others are its forks, which share its prompt's KV blocks from
admission on (handler/scheduler.py). Each sequence has its own grammar state when the request asks for
structured output, compiled here so that a bad schema is refused before the request is queued.
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from lora_serving.handler.errors import InvalidRequestError
from lora_serving.handler.sequence import SamplingParams, Sequence
from lora_serving.handler.structured_output import StructuredOutputCompiler

Choice = TypeVar("Choice")


class RequestSequences:
    def __init__(self, structured: StructuredOutputCompiler, *, vocab_size: int, eos_token_ids: frozenset[int],
                 max_running: int) -> None:
        self._structured = structured
        self._vocab_size = vocab_size
        self._eos_token_ids = eos_token_ids
        self._max_running = max_running

    def check(self, params: SamplingParams) -> None:
        """InvalidRequestError for parameters valid in themselves that this engine cannot serve."""
        if params.num_sequences > self._max_running:
            raise InvalidRequestError(f"n / best_of of {params.num_sequences} is more sequences than the running "
                                      f"batch holds (max_rolling_batch_size {self._max_running})")
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            outside = [token for token in ids if token >= self._vocab_size]
            if outside:
                raise InvalidRequestError(f"{name}: token id {outside[0]} is outside the vocabulary "
                                          f"(0..{self._vocab_size - 1})")

    def create(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None,
               adapter_version) -> list[Sequence]:
        suppressed: tuple[int, ...] = ()
        if params.min_tokens:
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self._eos_token_ids))
            suppressed = tuple(sorted(ends))
        structured = params.structured
        seqs = [
            Sequence(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params, adapter=adapter,
                     adapter_version=adapter_version, index=index, min_tokens_suppressed=suppressed,
                     grammar=self._structured.matcher(structured) if structured is not None else None)
            for index in range(params.num_sequences)
        ]
        seqs[0].forks = seqs[1:]
        return seqs


def returned_choices(choices: Iterable[Choice], params: SamplingParams, log_probs_of) -> list[Choice]:
    """The n choices a request answers with, from its sequences (in index order): with best_of given, the
    n with the highest cumulative log-probability, best first (vLLM's and TGI's rule), else all of them in
    order. `log_probs_of(choice)` gives a choice's token log-probabilities."""
    choices = list(choices)
    if params.best_of is None:
        return choices
    return sorted(choices, key=lambda choice: sum(log_probs_of(choice)), reverse=True)[: params.n]
