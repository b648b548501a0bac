"""What a request's parameters do to its logits before a token is chosen, one row at a time.

Processors (every request, greedy or sampled), in transformers' order: logit_bias, repetition penalty,
presence / frequency penalties (OpenAI's, over the generated tokens), min_tokens. Warpers (sampled requests
only), in transformers' order: temperature, top-k, top-p, min-p, typical-p. Each works on one request's row
and only when that request asked for it, so requests that ask for none of them pay nothing.
"""

from __future__ import annotations

import torch

from handler.sequence import Sequence

NEG_INF = float("-inf")


def process_row(row_logits: torch.Tensor, seq: Sequence) -> None:
    """Apply `seq`'s processors to its logits row, in place."""
    params = seq.params
    vocab_size = row_logits.shape[0]
    device = row_logits.device
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
        row_logits[ids] += torch.tensor(list(params.logit_bias.values()), dtype=row_logits.dtype, device=device)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=device)
        seen = seen[seen < vocab_size]
        scores = row_logits[seen]
        row_logits[seen] = torch.where(scores < 0, scores * params.repetition_penalty,
                                       scores / params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.output_token_ids:
        ids, counts = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device).unique(return_counts=True)
        row_logits[ids] -= counts.to(row_logits.dtype) * params.frequency_penalty + params.presence_penalty
    if seq.min_tokens_suppressed and len(seq.output_token_ids) < params.min_tokens:
        row_logits[torch.tensor(seq.min_tokens_suppressed, dtype=torch.long, device=device)] = NEG_INF


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
