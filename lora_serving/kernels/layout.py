"""Memory layout of the per-module slot buffers.

Shapes are fixed by the op's contract (lora_a [S, R_max, H], lora_b [S, O, R_max]); the memory
order is free. "Rank-major" storage keeps, for every slot, the R_max rank entries of one input or
output feature next to each other: lora_a is stored as [S, H, R_max] and lora_b as [S, R_max, O].
Then lora_b[s, :, j] (one rank's output column) and lora_a[s, :, h] (one feature's rank entries)
are contiguous rows, which lets the CPU path run shrink and expand as two embedding_bag calls that
read only the rows a token needs instead of copying weights per token. The Triton kernels take any
strides, so this layout serves both devices.
"""

import torch


def allocate_lora_buffers(
    num_slots: int,
    max_rank: int,
    in_features: int,
    out_features: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed slot buffers for one module: lora_a [S, R_max, H], lora_b [S, O, R_max], rank-major."""
    lora_a = torch.zeros(num_slots, in_features, max_rank, dtype=dtype, device=device).transpose(1, 2)
    lora_b = torch.zeros(num_slots, max_rank, out_features, dtype=dtype, device=device).transpose(1, 2)
    return lora_a, lora_b


def is_rank_major(lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    return lora_a.transpose(1, 2).is_contiguous() and lora_b.transpose(1, 2).is_contiguous()


def allocate_lora_group_buffers(
    num_slots: int,
    max_rank: int,
    in_features: int,
    out_features: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Zeroed slot buffers for the slices of one fused projection (q/k/v, gate/up), which share their input.

    Each slice's lora_a [S, R_max, H] is a view of ONE rank-major buffer [S, H, slices * R_max] (slice i's
    ranks at columns i * R_max ...), so that the CPU path shrinks all slices with one call; each lora_b
    [S, O_i, R_max] is rank-major as allocate_lora_buffers makes it. The Triton kernels take the views'
    strides as they are.
    """
    num_slices = len(out_features)
    shared_a = torch.zeros(num_slots, in_features, num_slices * max_rank, dtype=dtype, device=device)
    lora_a = tuple(shared_a[:, :, index * max_rank : (index + 1) * max_rank].transpose(1, 2)
                   for index in range(num_slices))
    lora_b = tuple(torch.zeros(num_slots, max_rank, width, dtype=dtype, device=device).transpose(1, 2)
                   for width in out_features)
    return lora_a, lora_b


def shared_rank_major_rows(lora_a_slices) -> torch.Tensor | None:
    """[S * H, slices * R_max], row (s, h) holding every slice's lora_a[s, :, h], when the slices are the
    column blocks of one rank-major buffer in order (allocate_lora_group_buffers; a single slice from
    allocate_lora_buffers is the case of one block); else None."""
    first = lora_a_slices[0]
    num_slots, max_rank, hidden = first.shape
    width = len(lora_a_slices) * max_rank
    expected_strides = (hidden * width, 1, width)
    for index, lora_a in enumerate(lora_a_slices):
        if (lora_a.shape != first.shape or lora_a.stride() != expected_strides
                or lora_a.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or lora_a.storage_offset() != first.storage_offset() + index * max_rank):
            return None
    return first.as_strided((num_slots * hidden, width), (width, 1), first.storage_offset())

