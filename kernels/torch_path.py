"""The pure-torch LoRA path: CPU tensors, and CUDA when Triton is absent or the torch path is forced.

Each segment (the tokens of one slot) takes one of two routes, decided once per step:
- a segment of at least SEGMENT_MIN_TOKENS tokens (a prefill) is one GEMM pair at the slot's real
  rank; when its tokens are consecutive in the batch (a prefill, or any segment once the engine
  orders sequences by slot) the rows are a slice of x and y: no gather, no scatter;
- all other tokens (decode: one or a few tokens per slot) share two embedding_bag calls that read
  only each token's own weight rows. A Python loop over ~32 slots spends more on op dispatch than
  on math, and gathering per-token [T, R, H] weight copies spends more on memory traffic: both
  measured slower (docs/BENCHMARKS.md). This route needs the rank-major layout (kernels/layout.py);
  other layouts send every segment down the GEMM route, which is correct but slower for decode.
The slot ranks are read on the host (free on CPU; one sync per call on CUDA, where this path is
only the baseline and the fallback).
"""

import torch
import torch.nn.functional as F

from .layout import is_rank_major
from .metadata import LoraBatchMeta

# Measured on 2 CPU cores at hidden 512 (scripts/bench_kernels.py --device cpu): below this many
# tokens per slot the per-segment GEMM pair loses to the shared embedding_bag route.
SEGMENT_MIN_TOKENS = 16


def add_lora_torch(y, x, lora_a, lora_b, slot_ranks, meta: LoraBatchMeta) -> None:
    """y[t] += x[t] @ lora_a[s, :r].T @ lora_b[s, :, :r].T for every token with a slot; in place."""
    if meta.num_lora_tokens == 0:
        return
    ranks = slot_ranks.tolist()
    rank_major = is_rank_major(lora_a, lora_b)
    gemm_segments, bag_tokens = _cached(meta, ("routes", rank_major), lambda: _split_routes(meta, rank_major))
    for slot, first_token, token_ids in gemm_segments:
        rank = ranks[slot]
        if rank == 0:
            continue
        a = lora_a[slot, :rank]  # [r, H]
        b = lora_b[slot, :, :rank]  # [O, r]
        if first_token >= 0:
            rows = slice(first_token, first_token + token_ids.shape[0])
            y[rows].addmm_(x[rows] @ a.T, b.T)
        else:
            shrunk = x.index_select(0, token_ids) @ a.T
            y.index_add_(0, token_ids, shrunk @ b.T)
    if bag_tokens is not None:
        _add_lora_embedding_bag(y, x, lora_a, lora_b, ranks, bag_tokens, meta)


class _BagTokens:
    """The tokens that take the embedding_bag route, in batch order."""

    def __init__(self, token_ids: torch.Tensor, slots: torch.Tensor, is_whole_batch: bool):
        self.token_ids = token_ids  # [n] int64
        self.slots = slots  # [n] int64
        self.is_whole_batch = is_whole_batch  # then x and y are used as they are


def _split_routes(meta: LoraBatchMeta, rank_major: bool):
    gemm_segments, bag_ids, bag_slots = [], [], []
    segments = zip(meta.active_slots, meta.segment_starts, meta.segment_counts, meta.segment_first_tokens)
    for slot, start, count, first_token in segments:
        token_ids = meta.sorted_token_ids[start : start + count]
        if count >= SEGMENT_MIN_TOKENS or not rank_major:
            gemm_segments.append((slot, first_token, token_ids))
        else:
            bag_ids.append(token_ids)
            bag_slots.append(torch.full((count,), slot, dtype=torch.int64, device=meta.device))
    if not bag_ids:
        return gemm_segments, None
    token_ids, order = torch.sort(torch.cat(bag_ids))
    slots = torch.cat(bag_slots)[order]
    return gemm_segments, _BagTokens(token_ids, slots, is_whole_batch=token_ids.shape[0] == meta.num_tokens)


def _add_lora_embedding_bag(y, x, lora_a, lora_b, ranks, bag: _BagTokens, meta: LoraBatchMeta):
    num_slots, max_rank, hidden = lora_a.shape
    out_features = lora_b.shape[1]
    # Rank-major storage makes these plain views: rows of R_max rank entries per (slot, feature),
    # and rows of O outputs per (slot, rank).
    a_rows = lora_a.transpose(1, 2).reshape(num_slots * hidden, max_rank)
    b_rows = lora_b.transpose(1, 2).reshape(num_slots * max_rank, out_features)

    shrink_rows = _cached(meta, ("shrink_rows", hidden), lambda: _shrink_rows(bag.slots, hidden))
    expand_rows, expand_offsets, shrunk_positions = _cached(
        meta, ("expand_rows", max_rank, tuple(ranks)), lambda: _expand_rows(bag.slots, ranks, max_rank)
    )

    xs = x.contiguous() if bag.is_whole_batch else x.index_select(0, bag.token_ids)
    # shrunk[t, j] = sum_h x[t, h] * lora_a[s_t, j, h]; columns j >= rank hold padding, never read.
    shrunk = F.embedding_bag(shrink_rows, a_rows, mode="sum", per_sample_weights=xs)  # [n, R_max]
    # delta[t] = sum_{j < r_t} shrunk[t, j] * lora_b[s_t, :, j]: a bag of exactly r_t rows per token.
    delta = F.embedding_bag(
        expand_rows,
        b_rows,
        expand_offsets,
        mode="sum",
        per_sample_weights=shrunk.view(-1).index_select(0, shrunk_positions),
    )  # [n, O]
    if bag.is_whole_batch:
        y.add_(delta)
    else:
        y.index_add_(0, bag.token_ids, delta)


def _cached(meta: LoraBatchMeta, key, compute):
    if key not in meta.plan_cache:
        meta.plan_cache[key] = compute()
    return meta.plan_cache[key]


def _shrink_rows(slots: torch.Tensor, hidden: int) -> torch.Tensor:
    """Row (s_t * H + h) of the [S * H, R_max] view for every token t and feature h: [n, H]."""
    features = torch.arange(hidden, dtype=torch.int64, device=slots.device)
    return slots[:, None] * hidden + features


def _expand_rows(slots: torch.Tensor, ranks: list[int], max_rank: int):
    """Per token, the r_t rows (s_t * R_max + j) of the [S * R_max, O] view, as one bag each."""
    token_ranks = torch.tensor(ranks, dtype=torch.int64, device=slots.device)[slots]  # [n]
    bag_ends = torch.cumsum(token_ranks, 0)
    bag_starts = bag_ends - token_ranks
    token_of_entry = torch.repeat_interleave(torch.arange(slots.shape[0], device=slots.device), token_ranks)
    rank_of_entry = torch.arange(token_of_entry.shape[0], device=slots.device) - bag_starts[token_of_entry]
    rows = slots[token_of_entry] * max_rank + rank_of_entry
    shrunk_positions = token_of_entry * max_rank + rank_of_entry
    return rows, bag_starts, shrunk_positions
