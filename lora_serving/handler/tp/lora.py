"""LoRA of a row-parallel projection (o, down) on one rank, as S-LoRA computes it.

The rank's input x is its slice of the features, and its slot buffers hold A's matching input columns
and B's rows for the rank's share of the hidden output (handler/tp/plan.py). So:

    shrunk = x_local @ A_local.T               # [T, R]: a partial sum
    all-reduce(shrunk)                         # R values per token, not the hidden size
    y_partial[:, my hidden columns] += shrunk @ B_local.T

and the base projection's all-reduce that follows adds every rank's columns, the delta included.

Both halves go through kernels.add_lora, so they run on the same Triton kernels and torch path as any
LoRA call: the shrink as add_lora with an identity for B (out = R), the expand as add_lora with an
identity for A (in = R), each at the slot's real rank. The identities cost an R x R product per token,
nothing next to the hidden-size ones.
"""

from __future__ import annotations

import torch

from lora_serving import kernels
from lora_serving.handler.tp.comm import TensorParallelComm


class RowParallelLora:
    def __init__(self, comm: TensorParallelComm, hidden_columns: slice, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.comm = comm
        self.hidden_columns = hidden_columns
        self.max_rank = max_rank
        # [S, R, R] in the slot buffers' own layout, so that the torch path's fast routes apply.
        self._identity_a, self._identity_b = kernels.allocate_lora_buffers(
            num_slots, max_rank, max_rank, max_rank, dtype=dtype, device=device)
        diagonal = torch.arange(max_rank, device=device)
        self._identity_a[:, diagonal, diagonal] = 1
        self._identity_b[:, diagonal, diagonal] = 1

    def apply(self, group: str, y: torch.Tensor, x: torch.Tensor, group_args, token_slots: torch.Tensor,
              meta) -> None:
        """y [T, hidden]: this rank's partial output; x [T, in_local]; group_args: (lora_a, lora_b, ranks)
        of the group's one module."""
        (lora_a,), (lora_b,), (slot_ranks,) = group_args
        shrunk = torch.zeros(x.shape[0], self.max_rank, dtype=x.dtype, device=x.device)
        kernels.add_lora(shrunk, x, lora_a, self._identity_b, token_slots, slot_ranks, meta)
        self.comm.all_reduce(shrunk, f"lora_{group}")
        kernels.add_lora(y[:, self.hidden_columns], shrunk, self._identity_a, lora_b, token_slots, slot_ranks, meta)
