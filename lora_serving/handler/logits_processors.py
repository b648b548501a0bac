"""What a request's parameters do to its logits before a token is chosen, one row at a time.

Processors (every request, greedy or sampled), in transformers' order: logit_bias, repetition penalty,
presence / frequency penalties (OpenAI's, over the generated tokens), min_tokens. Warpers (sampled requests
only), in transformers' order: temperature, top-k, top-p, min-p, typical-p. Each works on one request's row
and only when that request asked for it, so requests that ask for none of them pay nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch

from lora_serving.handler.sequence import Sequence

NEG_INF = float("-inf")


def process_rows(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Apply each request's processors to its row of `logits` [len(seqs), V], in place: a few indexed
    operations for all the rows together, whatever their number (per-row operations cost ~20 us each)."""
    vocab_size = logits.shape[1]
    biases, repeated, penalties, suppressed = _Pairs(), _Pairs(), _Pairs(), _Pairs()
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.logit_bias:
            biases.extend(row, params.logit_bias, params.logit_bias.values())
        if params.repetition_penalty != 1.0:
            seen = [token for token in set(seq.token_ids) if token < vocab_size]
            repeated.extend(row, seen, [params.repetition_penalty] * len(seen))
        if (params.presence_penalty or params.frequency_penalty) and seq.output_token_ids:
            counts = Counter(seq.output_token_ids)
            penalties.extend(row, counts, [-(count * params.frequency_penalty + params.presence_penalty)
                                           for count in counts.values()])
        if seq.min_tokens_suppressed and len(seq.output_token_ids) < params.min_tokens:
            suppressed.extend(row, seq.min_tokens_suppressed, [NEG_INF] * len(seq.min_tokens_suppressed))
    if biases:
        logits.index_put_(biases.index(logits), biases.values(logits), accumulate=True)
    if repeated:
        index, penalty = repeated.index(logits), repeated.values(logits)
        scores = logits[index]
        logits[index] = torch.where(scores < 0, scores * penalty, scores / penalty)
    if penalties:
        logits.index_put_(penalties.index(logits), penalties.values(logits), accumulate=True)
    if suppressed:
        logits.index_put_(suppressed.index(logits), suppressed.values(logits))


class _Pairs:
    """(row, token) -> value entries, gathered in Python and applied as one indexed operation."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.tokens: list[int] = []
        self._values: list[float] = []

    def extend(self, row: int, tokens: Iterable[int], values: Iterable[float]) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        self._values.extend(values)
        self.rows.extend([row] * (len(self.tokens) - start))

    def __bool__(self) -> bool:
        return bool(self.rows)

    def index(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(self.rows, dtype=torch.long, device=logits.device),
                torch.tensor(self.tokens, dtype=torch.long, device=logits.device))

    def values(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self._values, dtype=logits.dtype, device=logits.device)


def warp_row(row_logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """`seq`'s warpers applied to its (processed) logits row: the scores to sample from."""
    params = seq.params
    scores = row_logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[0]:
        kth_largest = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_largest, NEG_INF)
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop the low tail whose total mass is at most 1 - top_p; the most likely token always stays.
        remove_sorted = cumulative <= (1.0 - params.top_p)
        remove_sorted[-1] = False
        scores = scores.masked_fill(remove_sorted.scatter(0, order, remove_sorted), NEG_INF)
    if params.min_p > 0.0:
        probs = scores.softmax(dim=-1)
        remove = probs < params.min_p * probs.max()
        remove[probs.argmax()] = False
        scores = scores.masked_fill(remove, NEG_INF)
    if params.typical_p < 1.0:
        scores = _typical(scores, params.typical_p)
    return scores


def _typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to `mass`."""
    log_probs = scores.log_softmax(dim=-1)
    entropy = -(log_probs * log_probs.exp()).nansum()
    distance = (-log_probs - entropy).abs()
    sorted_distance, order = distance.sort()
    cumulative = scores[order].softmax(dim=-1).cumsum(dim=-1)
    last = min(int((cumulative < mass).sum()), scores.shape[0] - 1)
    remove_sorted = sorted_distance > sorted_distance[last]
    remove_sorted[0] = False
    return scores.masked_fill(remove_sorted.scatter(0, order, remove_sorted), NEG_INF)
