"""The slice table: where each output slice's weights live, read by the kernels at run time.

One launch serves every slice of a fused projection (q/k/v, gate/up) although each slice is its
own buffer: the programs of slice i read row i of this int64 table (pointers, sizes, strides).
"""

import torch
import triton
import triton.language as tl

# Columns of a table row.
A_PTR: tl.constexpr = tl.constexpr(0)
B_PTR: tl.constexpr = tl.constexpr(1)
RANKS_PTR: tl.constexpr = tl.constexpr(2)
RANKS_STRIDE: tl.constexpr = tl.constexpr(3)
OUT_FEATURES: tl.constexpr = tl.constexpr(4)
Y_COLUMN_OFFSET: tl.constexpr = tl.constexpr(5)
A_STRIDE_SLOT: tl.constexpr = tl.constexpr(6)
A_STRIDE_RANK: tl.constexpr = tl.constexpr(7)
A_STRIDE_HIDDEN: tl.constexpr = tl.constexpr(8)
B_STRIDE_SLOT: tl.constexpr = tl.constexpr(9)
B_STRIDE_OUT: tl.constexpr = tl.constexpr(10)
B_STRIDE_RANK: tl.constexpr = tl.constexpr(11)
NUM_FIELDS: tl.constexpr = tl.constexpr(12)


def build_slice_table(lora_a_slices, lora_b_slices, slot_ranks_slices, device) -> torch.Tensor:
    """[num_slices, NUM_FIELDS] int64 on device; slice i writes y columns after slices 0..i-1."""
    rows = []
    y_column_offset = 0
    for lora_a, lora_b, slot_ranks in zip(lora_a_slices, lora_b_slices, slot_ranks_slices):
        rows.append(
            [lora_a.data_ptr(), lora_b.data_ptr(), slot_ranks.data_ptr(), slot_ranks.stride(0)]
            + [lora_b.shape[1], y_column_offset]
            + list(lora_a.stride())
            + list(lora_b.stride())
        )
        y_column_offset += lora_b.shape[1]
    assert all(len(row) == NUM_FIELDS.value for row in rows)
    return torch.tensor(rows, dtype=torch.int64).to(device)


@triton.jit
def load_slot_rank(slice_entry, slot, RANKS_INT64: tl.constexpr):
    """The rank of `slot` in this slice (this module); 0 when its adapter does not target it."""
    ranks_address = tl.load(slice_entry + RANKS_PTR)
    ranks_stride = tl.load(slice_entry + RANKS_STRIDE)
    if RANKS_INT64:
        rank = tl.load(ranks_address.to(tl.pointer_type(tl.int64)) + slot * ranks_stride).to(tl.int32)
    else:
        rank = tl.load(ranks_address.to(tl.pointer_type(tl.int32)) + slot * ranks_stride)
    return rank


@triton.jit
def load_tile(tiles, num_tiles, tile):
    """A tile's slot and its [start, end) positions in sorted_token_ids (tiles is [3, num_tiles])."""
    slot = tl.load(tiles + tile)
    start = tl.load(tiles + num_tiles + tile)
    end = tl.load(tiles + 2 * num_tiles + tile)
    return slot, start, end
