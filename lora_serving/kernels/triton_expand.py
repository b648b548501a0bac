"""Expand: y[token_p, offset_i + o] += shrunk[i, p, :r] @ lora_b_i[s, o, :r], for each slice i.

Grid: (tiles, output blocks, slices). Every token sits in exactly one tile, so each y element has
one writer: a plain load-add-store, no atomics. Programs of a slot whose rank in this slice is 0,
or past a narrower slice's width (k/v beside q under grouped-query attention), exit at once.
"""

import triton
import triton.language as tl

from .triton_slices import (
    B_PTR,
    B_STRIDE_OUT,
    B_STRIDE_RANK,
    B_STRIDE_SLOT,
    NUM_FIELDS,
    OUT_FEATURES,
    Y_COLUMN_OFFSET,
    load_slot_rank,
    load_tile,
)


@triton.jit
def lora_expand_kernel(
    shrunk_ptr,  # [slices, N, R_max] fp32
    y_ptr,  # [T, sum O_i]
    slice_table,
    sorted_token_ids,
    tiles,
    num_tiles,
    stride_shrunk_slice,
    stride_shrunk_row,
    stride_y_token,
    stride_y_out,
    RANKS_INT64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    tile = tl.program_id(0)
    out_start = tl.program_id(1) * BLOCK_O
    slice_id = tl.program_id(2)
    slice_entry = slice_table + slice_id * NUM_FIELDS
    slot, start, end = load_tile(tiles, num_tiles, tile)
    rank = load_slot_rank(slice_entry, slot, RANKS_INT64)
    out_features = tl.load(slice_entry + OUT_FEATURES)

    if (rank > 0) & (out_start < out_features):
        weights = tl.load(slice_entry + B_PTR).to(tl.pointer_type(y_ptr.dtype.element_ty))
        weights += slot * tl.load(slice_entry + B_STRIDE_SLOT)
        stride_b_out = tl.load(slice_entry + B_STRIDE_OUT)
        stride_b_rank = tl.load(slice_entry + B_STRIDE_RANK)

        rows = start + tl.arange(0, BLOCK_T)
        row_mask = rows < end
        tokens = tl.load(sorted_token_ids + rows, mask=row_mask, other=0)
        outs = out_start + tl.arange(0, BLOCK_O)
        out_mask = outs < out_features

        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for rank_start in range(0, rank, BLOCK_R):
            ranks = rank_start + tl.arange(0, BLOCK_R)
            rank_mask = ranks < rank
            shrunk_tile = tl.load(
                shrunk_ptr + slice_id * stride_shrunk_slice + rows[:, None] * stride_shrunk_row + ranks[None, :],
                mask=row_mask[:, None] & rank_mask[None, :],
                other=0.0,
            )  # [BLOCK_T, BLOCK_R] fp32
            b_tile = tl.load(
                weights + ranks[:, None] * stride_b_rank + outs[None, :] * stride_b_out,
                mask=rank_mask[:, None] & out_mask[None, :],
                other=0.0,
            )  # [BLOCK_R, BLOCK_O]
            # The shrunk activations are rounded to the weights' dtype, as PEFT's own bf16/fp16
            # path does, so the product runs on tensor cores.
            acc += tl.dot(shrunk_tile.to(b_tile.dtype), b_tile, input_precision="ieee")

        column_offset = tl.load(slice_entry + Y_COLUMN_OFFSET)
        y_tile_ptr = y_ptr + tokens[:, None] * stride_y_token + (column_offset + outs)[None, :] * stride_y_out
        y_mask = row_mask[:, None] & out_mask[None, :]
        y_tile = tl.load(y_tile_ptr, mask=y_mask, other=0.0)
        tl.store(y_tile_ptr, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=y_mask)
