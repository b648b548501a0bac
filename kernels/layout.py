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
