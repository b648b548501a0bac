"""The Triton path: two launches per call (shrink, then expand), however many slices.

The fp32 intermediate `shrunk` is [slices, tokens with an adapter, R_max]: a few KB per step, so
its round trip through memory costs far less than the weights the kernels stream.
"""

import contextlib
import functools

import torch
import triton

from .metadata import LoraBatchMeta
from .triton_expand import lora_expand_kernel
from .triton_shrink import lora_shrink_kernel
from .triton_slices import build_slice_table

BLOCK_R = 16  # ranks are walked 16 at a time (tl.dot's smallest K/N on GPUs) up to the real rank
BLOCK_H = 64
BLOCK_O = 128
# The shrink splits the hidden dimension until about this many programs per SM are in flight,
# so that decode steps with a handful of tiles still stream weights from every SM.
SHRINK_PROGRAMS_PER_SM = 4
_SLICE_TABLE_CACHE_LIMIT = 1024

# The engine writes adapters into fixed buffers, so one table per module is built once and then
# found by address. A table is a pure function of its key, so a reused address is never stale.
_slice_tables: dict = {}


def add_lora_packed_triton(y, x, lora_a_slices, lora_b_slices, slot_ranks_slices, meta: LoraBatchMeta) -> None:
    if meta.num_tiles == 0:
        return
    # Triton launches on the current CUDA device, which need not be x's on a multi-GPU host.
    on_x_device = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with on_x_device:
        _launch(y, x, lora_a_slices, lora_b_slices, slot_ranks_slices, meta)


def _launch(y, x, lora_a_slices, lora_b_slices, slot_ranks_slices, meta: LoraBatchMeta) -> None:
    num_slices = len(lora_a_slices)
    ranks_int64 = _ranks_are_int64(slot_ranks_slices)
    slice_table = _slice_table(lora_a_slices, lora_b_slices, slot_ranks_slices, x.device)
    max_rank = max(lora_a.shape[1] for lora_a in lora_a_slices)
    hidden = x.shape[1]

    num_splits, hidden_per_split = _split_hidden(hidden, meta.num_tiles * num_slices, x.device)
    # Split partial sums are atomically added, so they need a zeroed buffer; a single writer does not.
    allocate = torch.zeros if num_splits > 1 else torch.empty
    shrunk = allocate((num_slices, meta.num_lora_tokens, max_rank), dtype=torch.float32, device=x.device)
    lora_shrink_kernel[(meta.num_tiles, num_splits, num_slices)](
        x,
        shrunk,
        slice_table,
        meta.sorted_token_ids,
        meta.tiles,
        meta.num_tiles,
        hidden,
        hidden_per_split,
        x.stride(0),
        x.stride(1),
        shrunk.stride(0),
        shrunk.stride(1),
        RANKS_INT64=ranks_int64,
        ATOMIC=num_splits > 1,
        BLOCK_T=meta.token_block,
        BLOCK_R=BLOCK_R,
        BLOCK_H=BLOCK_H,
    )

    max_out = max(lora_b.shape[1] for lora_b in lora_b_slices)
    lora_expand_kernel[(meta.num_tiles, triton.cdiv(max_out, BLOCK_O), num_slices)](
        shrunk,
        y,
        slice_table,
        meta.sorted_token_ids,
        meta.tiles,
        meta.num_tiles,
        shrunk.stride(0),
        shrunk.stride(1),
        y.stride(0),
        y.stride(1),
        RANKS_INT64=ranks_int64,
        BLOCK_T=meta.token_block,
        BLOCK_R=BLOCK_R,
        BLOCK_O=BLOCK_O,
    )


def _ranks_are_int64(slot_ranks_slices) -> bool:
    dtypes = {slot_ranks.dtype for slot_ranks in slot_ranks_slices}
    if dtypes == {torch.int64}:
        return True
    if dtypes == {torch.int32}:
        return False
    raise ValueError(f"slot_ranks must all be int32 or all int64, got {sorted(map(str, dtypes))}")


def _slice_table(lora_a_slices, lora_b_slices, slot_ranks_slices, device) -> torch.Tensor:
    key = (device,) + tuple(
        (a.data_ptr(), b.data_ptr(), ranks.data_ptr(), a.stride(), b.stride(), ranks.stride(0), b.shape[1])
        for a, b, ranks in zip(lora_a_slices, lora_b_slices, slot_ranks_slices)
    )
    table = _slice_tables.get(key)
    if table is None:
        if len(_slice_tables) >= _SLICE_TABLE_CACHE_LIMIT:
            _slice_tables.clear()
        table = _slice_tables[key] = build_slice_table(lora_a_slices, lora_b_slices, slot_ranks_slices, device)
    return table


def _split_hidden(hidden: int, num_programs: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, features per split): split H until the shrink fills the device."""
    max_splits = triton.cdiv(hidden, BLOCK_H)
    wanted_splits = triton.cdiv(SHRINK_PROGRAMS_PER_SM * _num_sms(device), num_programs)
    splits = max(1, min(max_splits, wanted_splits))
    hidden_per_split = triton.cdiv(triton.cdiv(hidden, splits), BLOCK_H) * BLOCK_H
    return triton.cdiv(hidden, hidden_per_split), hidden_per_split


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: one "SM" still makes small shapes take the split path
