"""The pure-torch LoRA path: CPU tensors, and CUDA when Triton is absent or the torch path is forced.

Each segment (the tokens of one slot) takes one of two routes, decided once per step:
- a long segment (a prefill) is one GEMM pair at the slot's real rank; when its tokens are
  consecutive in the batch (a prefill, or any segment once the engine orders sequences by slot)
  its rows are slices of x and y: no gather, no scatter;
- all other tokens (decode: one or a few tokens per slot) share two embedding_bag calls that read
  only each token's own weight rows. A Python loop over ~32 slots spends more on op dispatch than
  on math, and gathering per-token [T, R, H] weight copies spends more on memory traffic: both
  measured slower (docs/BENCHMARKS.md). This route needs the rank-major layout (kernels/layout.py);
  other layouts send every segment down the GEMM route, which is correct but slower for decode.
Per call the only host work is a dictionary lookup: the routes and index tensors are built once
per step for each (hidden size, R_max, slot ranks) and shared by all modules that match. The slot
ranks are read on the host (free on CPU; one sync per call on CUDA, where this path is only the
baseline and the fallback).
"""

import weakref
from dataclasses import dataclass

import torch

from .layout import is_rank_major
from .metadata import LoraBatchMeta

# When a segment takes the GEMM route, in tokens x hidden features: the GEMM pair's cost is
# roughly fixed while the bags' grows with tokens x H (the shrink reads H rows per token).
# Crossovers measured on 2 CPU cores at H = 512 and 1376 (scripts/bench_kernels.py --device cpu,
# "routes" table); a gathered segment also pays a gather and a scatter, so it switches much later.
GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE = 8_192
GEMM_MIN_TOKEN_FEATURES_GATHERED = 65_536
_EMBEDDING_BAG_SUM = 0  # torch.embedding_bag's mode code for "sum"


@dataclass(frozen=True)
class _ModuleViews:
    """Views of one module's slot buffers, made once: building them costs more than the math at decode."""

    lora_a: weakref.ref
    lora_b: weakref.ref
    rank_major: bool
    a_rows: torch.Tensor | None  # [S * H, R_max]: row (s, h) holds lora_a[s, :, h]
    b_rows: torch.Tensor | None  # [S * R_max, O]: row (s, j) holds lora_b[s, :, j]


@dataclass(frozen=True)
class _GemmSegment:
    rank: int
    slot: int
    rows: slice | None  # the segment's tokens when they are consecutive in the batch
    token_ids: torch.Tensor


@dataclass(frozen=True)
class _BagPlan:
    """The embedding_bag route for one step and one (H, R_max, slot ranks)."""

    token_ids: torch.Tensor | None  # None: every token of the batch, in batch order
    shrink_rows: torch.Tensor  # [n * H]: row s_t * H + h, bag t = the H features of token t
    shrink_offsets: torch.Tensor  # [n]
    expand_rows: torch.Tensor  # [sum r_t]: row s_t * R_max + j, j < r_t
    expand_offsets: torch.Tensor  # [n]
    shrunk_positions: torch.Tensor  # [sum r_t]: t * R_max + j, where expand's weights sit in shrunk


_module_views: dict = {}


def add_lora_torch(y, x, lora_a, lora_b, slot_ranks, meta: LoraBatchMeta) -> None:
    """y[t] += x[t] @ lora_a[s, :r].T @ lora_b[s, :, :r].T for every token with a slot; in place."""
    if meta.num_lora_tokens == 0:
        return
    views = _views(lora_a, lora_b)
    ranks = slot_ranks.tolist()
    plan_key = (x.shape[1], lora_a.shape[1], views.rank_major, tuple(ranks))
    plan = meta.plan_cache.get(plan_key)
    if plan is None:
        plan = meta.plan_cache[plan_key] = _plan(meta, x.shape[1], lora_a.shape[1], views.rank_major, ranks)
    gemm_segments, bag = plan

    for segment in gemm_segments:
        a = lora_a[segment.slot, : segment.rank]  # [r, H]
        b = lora_b[segment.slot, :, : segment.rank]  # [O, r]
        if segment.rows is not None:
            y[segment.rows].addmm_(x[segment.rows] @ a.T, b.T)
        else:
            shrunk = x.index_select(0, segment.token_ids) @ a.T
            y.index_add_(0, segment.token_ids, shrunk @ b.T)

    if bag is not None:
        xs = x if bag.token_ids is None else x.index_select(0, bag.token_ids)
        # torch.embedding_bag, not F.embedding_bag: the wrapper's checks cost ~20 us a call, more
        # than the lookup itself at decode sizes.
        # shrunk[t, j] = sum_h x[t, h] * lora_a[s_t, j, h]; columns j >= r_t hold padding, never read.
        shrunk = torch.embedding_bag(
            views.a_rows, bag.shrink_rows, bag.shrink_offsets, False, _EMBEDDING_BAG_SUM, False, xs.reshape(-1)
        )[0]
        # delta[t] = sum_{j < r_t} shrunk[t, j] * lora_b[s_t, :, j]: a bag of exactly r_t rows.
        delta = torch.embedding_bag(
            views.b_rows,
            bag.expand_rows,
            bag.expand_offsets,
            False,
            _EMBEDDING_BAG_SUM,
            False,
            shrunk.view(-1).index_select(0, bag.shrunk_positions),
        )[0]
        if bag.token_ids is None:
            y.add_(delta)
        else:
            y.index_add_(0, bag.token_ids, delta)


def _views(lora_a, lora_b) -> _ModuleViews:
    # Keyed by object identity. An entry leaves when either tensor is freed, so it never keeps a
    # caller's buffers alive and an id is never reused while its entry exists.
    key = (id(lora_a), id(lora_b))
    views = _module_views.get(key)
    if views is not None and views.lora_a() is lora_a and views.lora_b() is lora_b:
        return views
    num_slots, max_rank, hidden = lora_a.shape
    rank_major = is_rank_major(lora_a, lora_b)
    a_rows = lora_a.transpose(1, 2).view(num_slots * hidden, max_rank) if rank_major else None
    b_rows = lora_b.transpose(1, 2).view(num_slots * max_rank, lora_b.shape[1]) if rank_major else None
    views = _ModuleViews(weakref.ref(lora_a), weakref.ref(lora_b), rank_major, a_rows, b_rows)
    _module_views[key] = views
    weakref.finalize(lora_a, _module_views.pop, key, None)
    weakref.finalize(lora_b, _module_views.pop, key, None)
    return views


def _plan(meta: LoraBatchMeta, hidden: int, max_rank: int, rank_major: bool, ranks: list[int]):
    gemm_segments, bag_ids, bag_slots = [], [], []
    segments = zip(meta.active_slots, meta.segment_starts, meta.segment_counts, meta.segment_first_tokens)
    for slot, start, count, first_token in segments:
        if ranks[slot] == 0:
            continue  # this slot's adapter does not target the module
        token_ids = meta.sorted_token_ids[start : start + count]
        consecutive = first_token >= 0
        gemm_threshold = GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE if consecutive else GEMM_MIN_TOKEN_FEATURES_GATHERED
        if count * hidden >= gemm_threshold or not rank_major:
            rows = slice(first_token, first_token + count) if consecutive else None
            gemm_segments.append(_GemmSegment(ranks[slot], slot, rows, token_ids))
        else:
            bag_ids.append(token_ids)
            bag_slots.append(torch.full((count,), slot, dtype=torch.int64, device=meta.device))
    if not bag_ids:
        return gemm_segments, None
    token_ids, order = torch.sort(torch.cat(bag_ids))
    slots = torch.cat(bag_slots)[order]
    is_whole_batch = token_ids.shape[0] == meta.num_tokens
    return gemm_segments, _bag_plan(None if is_whole_batch else token_ids, slots, hidden, max_rank, ranks)


def _bag_plan(token_ids, slots: torch.Tensor, hidden: int, max_rank: int, ranks: list[int]) -> _BagPlan:
    device = slots.device
    num_tokens = slots.shape[0]
    features = torch.arange(hidden, dtype=torch.int64, device=device)
    shrink_rows = (slots[:, None] * hidden + features).reshape(-1)
    shrink_offsets = torch.arange(0, num_tokens * hidden, hidden, dtype=torch.int64, device=device)

    token_ranks = torch.tensor(ranks, dtype=torch.int64, device=device)[slots]
    expand_offsets = torch.cumsum(token_ranks, 0) - token_ranks
    token_of_entry = torch.repeat_interleave(torch.arange(num_tokens, device=device), token_ranks)
    rank_of_entry = torch.arange(token_of_entry.shape[0], device=device) - expand_offsets[token_of_entry]
    return _BagPlan(
        token_ids=token_ids,
        shrink_rows=shrink_rows,
        shrink_offsets=shrink_offsets,
        expand_rows=slots[token_of_entry] * max_rank + rank_of_entry,
        expand_offsets=expand_offsets,
        shrunk_positions=token_of_entry * max_rank + rank_of_entry,
    )
