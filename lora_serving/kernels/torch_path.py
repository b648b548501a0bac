"""The CPU LoRA path (torch ops and a C kernel): CPU tensors, and CUDA ones when Triton is absent or forced.

One call serves all the slices of a fused projection (q/k/v, gate/up). When their lora_a share one
rank-major buffer (kernels/layout.py, allocate_lora_group_buffers: as the engine allocates them), the
shrink runs once for all slices, x @ [A_q | A_k | A_v], and only the expand is per slice; otherwise each
slice is shrunk on its own.

Each segment (the tokens of one slot) takes one of these routes, decided once per step:
- a long segment (a prefill) is one shrink GEMM and one expand GEMM per slice, at the slot's real rank
  for the expand; when its tokens are consecutive in the batch (a prefill, or any segment once the engine
  orders sequences by slot) its rows are slices of x and y: no gather, no scatter;
- all other tokens (decode: one or a few tokens per slot) go to the C kernel (kernels/cpu_native.py) in
  one call, when the buffers are rank-major fp32 or bf16 on the CPU and the kernel builds here: one pass per
  slot over its contiguous weight rows;
- failing that (no compiler, LORA_CPU_KERNEL=off, another dtype) they share one embedding_bag call for the
  shrink and one per slice for the expand, which read only each token's own weight rows. A Python loop
  over ~32 slots spends more on op dispatch than on math, and gathering per-token [T, R, H] weight copies
  spends more on memory traffic: both measured slower (docs/BENCHMARKS.md). Both of these routes need the
  rank-major layout; other layouts send every segment down the GEMM route, which is correct but slower for
  decode.
Per call the host work is a few dictionary lookups: the routes and index tensors are built once per step
for each (hidden size, buffer shape, slot ranks) and shared by all the layers' calls that match. Slot
ranks are read on the host (free on CPU; one sync per call on CUDA, where this path is only the baseline
and the fallback).
"""

import weakref
from dataclasses import dataclass

import torch

from . import cpu_native
from .layout import shared_rank_major_rows
from .metadata import LoraBatchMeta

# When a segment takes the GEMM route, in tokens x hidden features: the GEMM pair's cost is
# roughly fixed while the bags' grows with tokens x H (the shrink reads H rows per token).
# Crossovers measured on 2 CPU cores at H = 512 and 1376 (scripts/bench_kernels.py --device cpu,
# "routes" table); a gathered segment also pays a gather and a scatter, so it switches much later.
GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE = 8_192
GEMM_MIN_TOKEN_FEATURES_GATHERED = 65_536
# Beside the C kernel, consecutive segments stay off the GEMM route longer: it was as fast or faster up to
# 64 tokens at H = 512 and 32 at 1376 (scripts/bench_kernels.py "routes", 2 threads, 2026-12-01).
C_KERNEL_GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE = 32_768
_EMBEDDING_BAG_SUM = 0  # torch.embedding_bag's mode code for "sum"


@dataclass(frozen=True)
class _GroupViews:
    """Views of one group's slot buffers, made once: building them costs more than the math at decode."""

    lora_a: tuple  # weakrefs: an entry must not keep the buffers alive
    lora_b: tuple
    # [S, H, n * R_max]: a slot's shrink matrix for all slices (lora_a_i[s].T side by side); None when the
    # slices' lora_a are not one buffer (each slice is then served alone).
    a_columns: torch.Tensor | None
    # For the embedding_bag route (rank-major buffers), else None: [S * H, n * R_max], row (s, h) holding every
    # slice's lora_a[s, :, h]; and per slice [S * R_max, O], row (s, j) holding lora_b[s, :, j].
    a_rows: torch.Tensor | None
    b_rows: tuple | None
    native: cpu_native.Weights | None  # the same rows for the C kernel: fp32/bf16 CPU buffers, when it builds here


@dataclass(frozen=True)
class _GemmSegment:
    slot: int
    ranks: tuple[int, ...]  # per slice
    columns: int  # of the shrink: up to the last slice's rank
    rows: slice | None  # the segment's tokens when they are consecutive in the batch
    token_ids: torch.Tensor


@dataclass(frozen=True)
class _BagPlan:
    """The embedding_bag route for one step and one (H, R_max, slices' slot ranks)."""

    token_ids: torch.Tensor | None  # None: every token of the batch, in batch order
    shrink_rows: torch.Tensor  # [n_tokens * H]: row s_t * H + h, bag t = the H features of token t
    shrink_offsets: torch.Tensor  # [n_tokens]
    expand: tuple  # per slice: (rows, offsets, positions) or None when no token's slot targets the slice


_group_views: dict = {}


def add_lora_torch(y, x, lora_a_slices, lora_b_slices, slot_ranks_slices, meta: LoraBatchMeta) -> None:
    """y[:, slice i] += x @ lora_a_i[s, :r].T @ lora_b_i[s, :, :r].T per token with a slot; in place."""
    if meta.num_lora_tokens == 0:
        return
    views = _views(lora_a_slices, lora_b_slices)
    if views.a_columns is None:  # slices in buffers of their own: shrink each alone
        offset = 0
        for lora_a, lora_b, slot_ranks in zip(lora_a_slices, lora_b_slices, slot_ranks_slices):
            width = lora_b.shape[1]
            add_lora_torch(y[:, offset : offset + width], x, (lora_a,), (lora_b,), (slot_ranks,), meta)
            offset += width
        return
    max_rank = lora_a_slices[0].shape[1]
    if views.native is not None and x.stride(1) == 1 and y.stride(1) == 1 and cpu_native.ranks_supported(
            slot_ranks_slices):
        _add_native(y, x, views, lora_b_slices, slot_ranks_slices, views.native.bind(slot_ranks_slices), meta,
                    max_rank)
        return
    ranks = tuple(tuple(slot_ranks.tolist()) for slot_ranks in slot_ranks_slices)
    bags_possible = views.a_rows is not None
    plan_key = (x.shape[1], max_rank, bags_possible, ranks)
    plan = meta.plan_cache.get(plan_key)
    if plan is None:
        plan = meta.plan_cache[plan_key] = _plan(meta, x.shape[1], max_rank, bags_possible, ranks)
    gemm_segments, bag = plan
    outputs = _column_blocks(y, [lora_b.shape[1] for lora_b in lora_b_slices])
    _add_gemm_segments(outputs, x, views, lora_b_slices, max_rank, gemm_segments)

    if bag is not None:
        xs = x if bag.token_ids is None else x.index_select(0, bag.token_ids)
        # torch.embedding_bag, not F.embedding_bag: the wrapper's checks cost ~20 us a call, more
        # than the lookup itself at decode sizes.
        # shrunk[t, i * R_max + j] = sum_h x[t, h] * lora_a_i[s_t, j, h]; columns j >= r_t unused.
        shrunk = torch.embedding_bag(
            views.a_rows, bag.shrink_rows, bag.shrink_offsets, False, _EMBEDDING_BAG_SUM, False, xs.reshape(-1)
        )[0].view(-1)
        for output, b_rows, expand in zip(outputs, views.b_rows, bag.expand):
            if expand is None:
                continue
            rows, offsets, positions = expand
            # delta[t] = sum_{j < r_t} shrunk[t, i * R_max + j] * lora_b_i[s_t, :, j]: a bag of r_t rows.
            delta = torch.embedding_bag(
                b_rows, rows, offsets, False, _EMBEDDING_BAG_SUM, False, shrunk.index_select(0, positions)
            )[0]
            if bag.token_ids is None:
                output.add_(delta)
            else:
                output.index_add_(0, bag.token_ids, delta)


class NativeGroup:
    """One fused projection's buffers and slot ranks as the C kernel takes them, resolved once (kernels/group.py)."""

    def __init__(self, views: _GroupViews, lora_b_slices, slot_ranks_slices, max_rank: int) -> None:
        self._views, self._lora_b_slices = views, tuple(lora_b_slices)
        self._slot_ranks_slices = tuple(slot_ranks_slices)
        self._buffers = views.native.bind(slot_ranks_slices, cpu_native.CompactA(views.native))
        self._max_rank = max_rank
        self.dtype = views.native.dtype

    @classmethod
    def for_buffers(cls, lora_a_slices, lora_b_slices, slot_ranks_slices) -> "NativeGroup | None":
        """None unless add_lora_torch would take the C kernel for these buffers."""
        views = _views(lora_a_slices, lora_b_slices)
        if views.native is None or not cpu_native.ranks_supported(slot_ranks_slices):
            return None
        return cls(views, lora_b_slices, slot_ranks_slices, lora_a_slices[0].shape[1])

    def slot_written(self, slot: int) -> None:
        self._buffers.compact_slot(slot)

    @property
    def compact_ranks(self) -> torch.Tensor:
        return self._buffers.compact.compact_ranks

    def add(self, y, x, meta: LoraBatchMeta) -> None:
        """As add_lora_torch, for x and y with unit column strides (the caller checked them)."""
        if meta.num_lora_tokens:
            _add_native(y, x, self._views, self._lora_b_slices, self._slot_ranks_slices, self._buffers, meta,
                        self._max_rank)


def _add_native(y, x, views: _GroupViews, lora_b_slices, slot_ranks_slices, buffers: cpu_native.Buffers,
                meta: LoraBatchMeta, max_rank: int):
    """Long segments by GEMM as on the other route; every other token in one call of the C kernel, which reads
    the ranks itself (so, unlike the embedding_bag plan, this plan depends only on the step and H)."""
    long_segments, call = _native_step_plan(meta, x.shape[1])
    if long_segments:
        _add_long_segments(y, x, views, lora_b_slices, slot_ranks_slices, max_rank, long_segments)
    if call is not None:
        cpu_native.add(y, x, call, buffers)


def _native_step_plan(meta: LoraBatchMeta, hidden: int):
    """_native_plan for this step and H, made by the step's first call and reused by the others."""
    plan = meta.plan_cache.get(hidden)  # the embedding_bag plans' keys are tuples: no clash
    if plan is None:
        plan = meta.plan_cache[hidden] = _native_plan(meta, hidden)
    return plan


def _add_long_segments(y, x, views: _GroupViews, lora_b_slices, slot_ranks_slices, max_rank: int, long_segments):
    ranks = [slot_ranks.tolist() for slot_ranks in slot_ranks_slices]
    segments = []
    for slot, first_token, token_ids in long_segments:
        slot_ranks = tuple(slice_ranks[slot] for slice_ranks in ranks)
        if any(slot_ranks):
            segments.append(_gemm_segment(slot, slot_ranks, max_rank, first_token, token_ids))
    outputs = _column_blocks(y, [lora_b.shape[1] for lora_b in lora_b_slices])
    _add_gemm_segments(outputs, x, views, lora_b_slices, max_rank, segments)


def _native_plan(meta: LoraBatchMeta, hidden: int):
    """(long segments as (slot, first token or -1, token_ids), a cpu_native.Call for the rest or None)."""
    block = cpu_native.token_block()
    long_segments, items = [], []
    segments = zip(meta.active_slots, meta.segment_starts, meta.segment_counts, meta.segment_first_tokens)
    for slot, start, count, first_token in segments:
        if _takes_gemm(count, hidden, first_token, C_KERNEL_GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE):
            long_segments.append((slot, first_token, meta.sorted_token_ids[start : start + count]))
        else:
            items += [(slot, first, min(block, start + count - first)) for first in range(start, start + count, block)]
    if not items:
        return long_segments, None
    return long_segments, cpu_native.Call(torch.tensor(items, dtype=torch.int64).T.contiguous(), meta.sorted_token_ids)


def _takes_gemm(count: int, hidden: int, first_token: int, consecutive_threshold: int) -> bool:
    """Whether a segment of `count` tokens is long enough for the GEMM route; one whose tokens are not
    consecutive (first_token -1) also pays a gather and a scatter there, so it switches later."""
    threshold = consecutive_threshold if first_token >= 0 else GEMM_MIN_TOKEN_FEATURES_GATHERED
    return count * hidden >= threshold


def _gemm_segment(slot: int, slot_ranks: tuple, max_rank: int, first_token: int, token_ids) -> _GemmSegment:
    """The GEMM route's view of one segment whose slot targets at least one slice."""
    rows = slice(first_token, first_token + token_ids.shape[0]) if first_token >= 0 else None
    columns = max(index * max_rank + rank for index, rank in enumerate(slot_ranks) if rank)
    return _GemmSegment(slot, slot_ranks, columns, rows, token_ids)


def _add_gemm_segments(outputs, x, views: _GroupViews, lora_b_slices, max_rank: int, segments) -> None:
    for segment in segments:
        xs = x[segment.rows] if segment.rows is not None else x.index_select(0, segment.token_ids)
        # [n, columns]: slice i's ranks at columns i * R_max...; the padding between them is computed, unused.
        shrunk = xs @ views.a_columns[segment.slot, :, : segment.columns]
        for index, (lora_b, rank) in enumerate(zip(lora_b_slices, segment.ranks)):
            if rank == 0:
                continue
            ranked = shrunk[:, index * max_rank : index * max_rank + rank]
            b = lora_b[segment.slot, :, :rank]  # [O, r]
            if segment.rows is not None:
                outputs[index][segment.rows].addmm_(ranked, b.T)
            else:
                outputs[index].index_add_(0, segment.token_ids, ranked @ b.T)


def _column_blocks(y: torch.Tensor, widths: list[int]) -> list[torch.Tensor]:
    blocks, offset = [], 0
    for width in widths:
        blocks.append(y[:, offset : offset + width])
        offset += width
    return blocks


def _views(lora_a_slices, lora_b_slices) -> _GroupViews:
    # Keyed by object identity. An entry leaves when any of its tensors is freed, so it never keeps a
    # caller's buffers alive and an id is never reused while its entry exists.
    key = tuple(map(id, lora_a_slices)) + tuple(map(id, lora_b_slices))
    views = _group_views.get(key)
    if views is not None and all(ref() is t for ref, t in zip(views.lora_a + views.lora_b,
                                                               (*lora_a_slices, *lora_b_slices))):
        return views
    num_slots, max_rank, hidden = lora_a_slices[0].shape
    a_rows = shared_rank_major_rows(lora_a_slices)
    b_rank_major = all(lora_b.transpose(1, 2).is_contiguous() for lora_b in lora_b_slices)
    if a_rows is not None:
        a_columns = a_rows.view(num_slots, hidden, -1)
    elif len(lora_a_slices) == 1:
        a_columns = lora_a_slices[0].transpose(1, 2)  # any layout: the GEMM route takes strides
    else:
        a_columns = None
    if a_rows is None or not b_rank_major:
        a_rows = b_rows = None
    else:
        b_rows = tuple(lora_b.transpose(1, 2).view(num_slots * max_rank, lora_b.shape[1]) for lora_b in lora_b_slices)
    native = None
    if (a_rows is not None and a_rows.dtype in cpu_native.KERNEL_DTYPES and a_rows.device.type == "cpu"
            and cpu_native.enabled() and len(b_rows) <= cpu_native.max_slices()):
        native = cpu_native.Weights(a_rows, b_rows, max_rank, hidden)
    views = _GroupViews(
        lora_a=tuple(weakref.ref(t) for t in lora_a_slices),
        lora_b=tuple(weakref.ref(t) for t in lora_b_slices),
        a_columns=a_columns,
        a_rows=a_rows,
        b_rows=b_rows,
        native=native,
    )
    _group_views[key] = views
    for tensor in (*lora_a_slices, *lora_b_slices):
        weakref.finalize(tensor, _group_views.pop, key, None)
    return views


def _plan(meta: LoraBatchMeta, hidden: int, max_rank: int, bags_possible: bool, ranks: tuple):
    num_slices = len(ranks)
    gemm_segments, bag_ids, bag_slots = [], [], []
    segments = zip(meta.active_slots, meta.segment_starts, meta.segment_counts, meta.segment_first_tokens)
    for slot, start, count, first_token in segments:
        slot_ranks = tuple(slice_ranks[slot] for slice_ranks in ranks)
        if not any(slot_ranks):
            continue  # this slot's adapter targets none of the slices
        token_ids = meta.sorted_token_ids[start : start + count]
        if _takes_gemm(count, hidden, first_token, GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE) or not bags_possible:
            gemm_segments.append(_gemm_segment(slot, slot_ranks, max_rank, first_token, token_ids))
        else:
            bag_ids.append(token_ids)
            bag_slots.append(torch.full((count,), slot, dtype=torch.int64, device=meta.device))
    if not bag_ids:
        return gemm_segments, None
    token_ids, order = torch.sort(torch.cat(bag_ids))
    slots = torch.cat(bag_slots)[order]
    is_whole_batch = token_ids.shape[0] == meta.num_tokens
    return gemm_segments, _bag_plan(None if is_whole_batch else token_ids, slots, hidden, max_rank, num_slices,
                                    ranks)


def _bag_plan(token_ids, slots: torch.Tensor, hidden: int, max_rank: int, num_slices: int, ranks: tuple) -> _BagPlan:
    device = slots.device
    num_tokens = slots.shape[0]
    features = torch.arange(hidden, dtype=torch.int64, device=device)
    shrink_rows = (slots[:, None] * hidden + features).reshape(-1)
    shrink_offsets = torch.arange(0, num_tokens * hidden, hidden, dtype=torch.int64, device=device)
    expand = tuple(_expand_plan(slots, torch.tensor(slice_ranks, dtype=torch.int64, device=device), max_rank,
                                index * max_rank, num_slices * max_rank)
                   for index, slice_ranks in enumerate(ranks))
    return _BagPlan(token_ids, shrink_rows, shrink_offsets, expand)


def _expand_plan(slots, slot_ranks, max_rank: int, column: int, shrunk_width: int):
    """One slice's expand bags: token t's bag is the first r_t rows of its slot in the slice's lora_b, weighted
    by the slice's columns of shrunk. None when no token has a rank here."""
    token_ranks = slot_ranks[slots]
    if not bool(token_ranks.any()):
        return None
    offsets = torch.cumsum(token_ranks, 0) - token_ranks
    token_of_entry = torch.repeat_interleave(torch.arange(slots.shape[0], device=slots.device), token_ranks)
    rank_of_entry = torch.arange(token_of_entry.shape[0], device=slots.device) - offsets[token_of_entry]
    rows = slots[token_of_entry] * max_rank + rank_of_entry
    positions = token_of_entry * shrunk_width + column + rank_of_entry
    return rows, offsets, positions
