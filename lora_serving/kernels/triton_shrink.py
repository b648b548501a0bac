"""Shrink: shrunk[i, p, :r] = x[token_p] @ lora_a_i[s, :r].T, for each slice i and sorted position p.

Grid: (tiles, hidden splits, slices). A tile is up to token_block tokens of one slot, so the grid
grows with the tokens present, not with slots x max tokens. The rank loop stops at the slot's real
rank: padded rank rows are neither loaded nor multiplied. Decode has few tiles, so the hidden
dimension is split across programs (split-K) to keep every SM streaming weights; the partial sums
then meet in shrunk through fp32 atomic adds.
"""

import triton
import triton.language as tl

from .triton_slices import (
    A_PTR,
    A_STRIDE_HIDDEN,
    A_STRIDE_RANK,
    A_STRIDE_SLOT,
    NUM_FIELDS,
    load_slot_rank,
    load_tile,
)


@triton.jit
def lora_shrink_kernel(
    x_ptr,  # [T, H]
    shrunk_ptr,  # [slices, N, R_max] fp32, N = tokens with an adapter, in sorted order
    slice_table,
    sorted_token_ids,
    tiles,
    num_tiles,
    hidden,
    hidden_per_split,
    stride_x_token,
    stride_x_hidden,
    stride_shrunk_slice,
    stride_shrunk_row,
    RANKS_INT64: tl.constexpr,
    ATOMIC: tl.constexpr,  # several programs add into one output: hidden is split
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    slice_id = tl.program_id(2)
    slice_entry = slice_table + slice_id * NUM_FIELDS
    slot, start, end = load_tile(tiles, num_tiles, tile)
    rank = load_slot_rank(slice_entry, slot, RANKS_INT64)

    weights = tl.load(slice_entry + A_PTR).to(tl.pointer_type(x_ptr.dtype.element_ty))
    weights += slot * tl.load(slice_entry + A_STRIDE_SLOT)
    stride_a_rank = tl.load(slice_entry + A_STRIDE_RANK)
    stride_a_hidden = tl.load(slice_entry + A_STRIDE_HIDDEN)

    rows = start + tl.arange(0, BLOCK_T)
    row_mask = rows < end
    tokens = tl.load(sorted_token_ids + rows, mask=row_mask, other=0)
    hidden_start = split * hidden_per_split
    hidden_end = tl.minimum(hidden_start + hidden_per_split, hidden)

    for rank_start in range(0, rank, BLOCK_R):
        ranks = rank_start + tl.arange(0, BLOCK_R)
        rank_mask = ranks < rank
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for h_start in range(hidden_start, hidden_end, BLOCK_H):
            features = h_start + tl.arange(0, BLOCK_H)
            feature_mask = features < hidden_end
            x_tile = tl.load(
                x_ptr + tokens[:, None] * stride_x_token + features[None, :] * stride_x_hidden,
                mask=row_mask[:, None] & feature_mask[None, :],
                other=0.0,
            )  # [BLOCK_T, BLOCK_H]
            a_tile = tl.load(
                weights + features[:, None] * stride_a_hidden + ranks[None, :] * stride_a_rank,
                mask=feature_mask[:, None] & rank_mask[None, :],
                other=0.0,
            )  # [BLOCK_H, BLOCK_R]
            # fp32 inputs: "ieee" keeps full precision (TF32 would break fp32 parity with PEFT);
            # the option does not apply to fp16/bf16.
            acc += tl.dot(x_tile, a_tile, input_precision="ieee")
        out = shrunk_ptr + slice_id * stride_shrunk_slice + rows[:, None] * stride_shrunk_row + ranks[None, :]
        out_mask = row_mask[:, None] & rank_mask[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=out_mask)
        else:
            tl.store(out, acc, mask=out_mask)
