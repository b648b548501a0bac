"""LoRA on a mixture of experts' expert weights, as PEFT writes it with `target_parameters`.

With transformers 5 the experts of a layer are two parameters, `experts.gate_up_proj` [E, out, in] and
`experts.down_proj`, not linear modules. PEFT wraps each targeted parameter (ParamWrapper; the second
target wraps the first, whose tensors then sit under `experts.base_layer.`) with one lora_A [r * E, in]
and one lora_B [out, r * E] for all experts: expert e's A is rows e * r ... of lora_A, its B the columns
e, E + e, 2E + e, ... of lora_B (ranks interleaved), and its weight becomes W_e + scaling * B_e @ A_e.
The engine adds the same delta unmerged, x @ A_e.T @ B_e.T, per token with that token's adapter.

The device buffers are allocated at the first adapter that has expert LoRA (a real Mixtral's take GBs),
with one more slot than adapters: kept zero, it is the "slot" of base-model tokens, so that a batch
mixing adapters and base requests needs no masking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# experts, experts.base_layer, experts.base_layer.base_layer, ...: one wrapper per targeted parameter.
EXPERT_MODULE = re.compile(r"^experts(?:\.base_layer)*$")


@dataclass(slots=True)
class ExpertLora:
    a: torch.Tensor  # [E, r, in]
    b: torch.Tensor  # [E, out, r], already multiplied by the scaling


def split_experts(a: torch.Tensor, b: torch.Tensor, num_experts: int, scaling: float, dtype: torch.dtype) -> ExpertLora:
    """PEFT's lora_A [r * E, in] and lora_B [out, r * E] of one parameter -> per-expert A and scaled B."""
    rank = a.shape[0] // num_experts
    per_expert_a = a.reshape(num_experts, rank, a.shape[1])
    per_expert_b = b.reshape(b.shape[0], rank, num_experts).permute(2, 0, 1)
    return ExpertLora(a=per_expert_a.to(dtype).contiguous(),
                      b=(per_expert_b.to(torch.float32) * scaling).to(dtype).contiguous())


def which_parameter(a: torch.Tensor, b: torch.Tensor, shapes: dict[str, tuple[int, int]]) -> str | None:
    """The expert parameter whose (in, out) these A and B fit: gate_up_proj takes the hidden size in and gives
    twice the expert's features out, down_proj the reverse, so no two parameters share a shape."""
    for parameter, (in_features, out_features) in shapes.items():
        if a.shape[1] == in_features and b.shape[0] == out_features:
            return parameter
    return None


class ExpertSlots:
    """Per layer and expert parameter: lora_a [S + 1, E, R, in], lora_b [S + 1, E, out, R]; slot S stays zero."""

    def __init__(self, num_slots: int, max_rank: int, num_layers: int, num_experts: int,
                 shapes: dict[str, tuple[int, int]], dtype: torch.dtype, device: torch.device) -> None:
        self.base_slot = num_slots
        self.buffers = [
            {parameter: (torch.zeros(num_slots + 1, num_experts, max_rank, in_features, dtype=dtype, device=device),
                         torch.zeros(num_slots + 1, num_experts, out_features, max_rank, dtype=dtype, device=device))
             for parameter, (in_features, out_features) in shapes.items()}
            for _ in range(num_layers)
        ]

    def write(self, slot: int, modules: dict[tuple[int, str], ExpertLora]) -> None:
        self.clear(slot)  # rows past this adapter's rank must read as zero
        for (layer, parameter), lora in modules.items():
            lora_a, lora_b = self.buffers[layer][parameter]
            rank = lora.a.shape[1]
            lora_a[slot, :, :rank].copy_(lora.a, non_blocking=True)
            lora_b[slot, :, :, :rank].copy_(lora.b, non_blocking=True)

    def clear(self, slot: int) -> None:
        for layer in self.buffers:
            for lora_a, lora_b in layer.values():
                lora_a[slot].zero_()
                lora_b[slot].zero_()

    def delta(self, layer: int, parameter: str, expert: int, slots: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each row's LoRA delta [n, out] for its slot (`slots` [n], base tokens at `base_slot`)."""
        lora_a, lora_b = self.buffers[layer][parameter]
        a = lora_a[:, expert].index_select(0, slots)  # [n, R, in]
        b = lora_b[:, expert].index_select(0, slots)  # [n, out, R]
        return torch.bmm(b, torch.bmm(a, x.unsqueeze(-1))).squeeze(-1)
