"""The device side of a step's LoRA: what every LoRA layer call of the step reads, built once per step.

Each rank's runner builds one from the step's LoraStepPlan and its own DeviceSlots; the model's layers call
`apply` (and a mixture of experts `apply_expert`) for every projection group.
"""

from __future__ import annotations

import torch

from lora_serving import kernels
from lora_serving.handler.lora.device_slots import EXPERTS_GROUP, DeviceSlots
from lora_serving.handler.lora.step_plan import LoraStepPlan
from lora_serving.handler.tp.lora import RowParallelLora

# Under tensor parallelism these groups' LoRA needs the all-reduce of its rank-r intermediate.
ROW_PARALLEL_GROUPS = ("o", "down")


class LoraStepApplier:
    """Per step: every LoRA layer call reuses the token -> slot map and its grouping, computed once."""

    def __init__(self, slots: DeviceSlots, plan: LoraStepPlan, device: torch.device,
                 row_parallel: RowParallelLora | None = None) -> None:
        self.plan = plan
        self._group_args = slots.group_args
        self._groups = slots.groups
        # Built from a host tensor: the metadata needs no read back from the device.
        host_slots = torch.tensor(plan.token_slots, dtype=torch.int32)
        self._meta = kernels.LoraBatchMeta.build(host_slots, slots.num_slots, device=device)
        self._token_slots = host_slots.to(device, non_blocking=True)
        self._row_parallel = row_parallel
        self._experts = slots.experts if EXPERTS_GROUP in plan.groups else None
        if self._experts is not None:  # base tokens read the expert buffers' zero slot
            self._expert_slots = torch.where(self._token_slots < 0, self._experts.base_slot, self._token_slots).long()

    def apply(self, layer_index: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None:
        if group not in self.plan.groups:
            return
        if self._row_parallel is not None and group in ROW_PARALLEL_GROUPS:
            args = self._group_args[layer_index][group]
            self._row_parallel.apply(group, y, x, args, self._token_slots, self._meta)
            return
        self._groups[layer_index][group].add(y, x, self._token_slots, self._meta)

    def apply_expert(self, layer_index: int, parameter: str, expert: int, y: torch.Tensor, x: torch.Tensor,
                     tokens: torch.Tensor) -> None:
        """Adds the LoRA delta of one expert's parameter to y [n, out] for its rows x [n, in], the step's
        tokens `tokens` [n] (a mixture of experts groups a step's tokens by expert)."""
        if self._experts is not None:
            y += self._experts.delta(layer_index, parameter, expert, self._expert_slots.index_select(0, tokens), x)
