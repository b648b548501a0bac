"""The device tier: `max_loras` preallocated slots per layer and projection, written in place.

Buffers have fixed addresses for the engine's lifetime (safe to capture in CUDA graphs later); loading an
adapter into a slot copies its weights into the slot's rows and records its real rank per module, which
is all the kernels look at (rows past the rank are never read).
"""

from __future__ import annotations

import torch

from lora_serving import kernels
from lora_serving.handler.lora.expert_lora import ExpertSlots
from lora_serving.handler.lora.peft_adapter import SERVABLE_MODULES, AdapterWeights
from lora_serving.handler.models import LORA_GROUPS
from lora_serving.handler.tp.plan import ShardingPlan

MODULE_INDEX = {module: index for index, module in enumerate(SERVABLE_MODULES)}
# The step-plan group of LoRA on a mixture of experts' expert parameters (lora/expert_lora.py).
EXPERTS_GROUP = "experts"


class DeviceSlots:
    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        num_layers: int,
        module_shapes: dict[str, tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
        shard: ShardingPlan | None = None,
        mirror_writes: bool = False,
        expert_shapes: dict[str, tuple[int, int]] | None = None,
        num_experts: int = 0,
    ) -> None:
        """`module_shapes`: the whole model's (in, out); with a sharding plan the buffers hold this rank's
        shard of every adapter (handler/tp/plan.py). `mirror_writes`: keep a log of writes and clears for
        the other tensor-parallel ranks (rank 0), which `take_mirror_ops` empties."""
        self.num_slots = num_slots
        self.device = device
        self._expert_args = (num_slots, max_rank, num_layers, num_experts, expert_shapes or {}, dtype, device)
        self.experts: ExpertSlots | None = None  # allocated with the first adapter that has expert LoRA
        self.shard = shard
        if shard is not None:
            module_shapes = shard.local_lora_shapes(module_shapes)
        self.mirror_ops: list[tuple[int, AdapterWeights | None]] | None = [] if mirror_writes else None
        # buffers[layer][module] = (lora_a [S, R, in], lora_b [S, out, R]); the modules of a projection group
        # (q/k/v, gate/up) share one lora_a buffer, so that the CPU path shrinks them with one call.
        self.buffers = [_layer_buffers(num_slots, max_rank, module_shapes, dtype, device) for _ in range(num_layers)]
        # ranks[layer, module, slot]: the adapter's real rank there; 0 = slot empty or module not targeted.
        self.ranks = torch.zeros(num_layers, len(SERVABLE_MODULES), num_slots, dtype=torch.int32, device=device)
        # The same on the host, so that planning a step never reads back from the device.
        self.host_ranks = torch.zeros(self.ranks.shape, dtype=torch.int32)
        # What the layers pass to kernels.add_lora_packed, per layer and projection group.
        self.group_args = [
            {
                group: (
                    tuple(self.buffers[layer][m][0] for m in modules),
                    tuple(self.buffers[layer][m][1] for m in modules),
                    tuple(self.ranks[layer, MODULE_INDEX[m]] for m in modules),
                )
                for group, modules in LORA_GROUPS.items()
            }
            for layer in range(num_layers)
        ]
        self.owner: list[str | None] = [None] * num_slots  # content hash held by each slot
        # The projection groups each slot's adapter targets (in some layer), kept at writes: planning a step
        # takes their union instead of reducing host_ranks over the step's slots (~0.1 ms a step).
        self._targeted_groups: list[frozenset[str]] = [frozenset()] * num_slots
        if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            # Build (or find cached) the CPU LoRA kernel now, not in the first adapter request's step.
            kernels.cpu_kernel_enabled()
        # The same buffers checked and resolved once, for the layers' calls of every step.
        self.groups = [{group: kernels.LoraGroup(*args) for group, args in layer.items()} for layer in self.group_args]

    def write(self, slot: int, weights: AdapterWeights) -> None:
        if self.mirror_ops is not None:
            self.mirror_ops.append((slot, weights))
        ranks = torch.zeros(self.ranks.shape[:2], dtype=torch.int32)
        for (layer, module), lora in weights.modules.items():
            rank = lora.a.shape[0]
            a, b = (lora.a, lora.b) if self.shard is None else self.shard.shard_lora(module, lora.a, lora.b)
            lora_a, lora_b = self.buffers[layer][module]
            lora_a[slot, :rank].copy_(a, non_blocking=True)
            lora_b[slot, :, :rank].copy_(b, non_blocking=True)
            ranks[layer, MODULE_INDEX[module]] = rank
        self.host_ranks[:, :, slot] = ranks
        self.ranks[:, :, slot].copy_(ranks)
        for layer_groups in self.groups:  # the CPU kernel's compact copies of A follow the new weights and ranks
            for group in layer_groups.values():
                group.slot_written(slot)
        targeted = {module for module, rank in zip(SERVABLE_MODULES, ranks.amax(dim=0).tolist()) if rank > 0}
        if weights.expert_modules and self.experts is None:
            self.experts = ExpertSlots(*self._expert_args)
        if self.experts is not None:
            self.experts.write(slot, weights.expert_modules)
        self._targeted_groups[slot] = frozenset(
            group for group, modules in LORA_GROUPS.items() if targeted.intersection(modules)
        ) | ({EXPERTS_GROUP} if weights.expert_modules else set())
        self.owner[slot] = weights.version.content_hash

    def clear(self, slot: int) -> None:
        if self.mirror_ops is not None:
            self.mirror_ops.append((slot, None))
        self.host_ranks[:, :, slot] = 0
        self.ranks[:, :, slot] = 0
        if self.experts is not None:
            self.experts.clear(slot)
        self._targeted_groups[slot] = frozenset()
        self.owner[slot] = None

    def take_mirror_ops(self) -> list[tuple[int, AdapterWeights | None]]:
        """Writes (slot, weights) and clears (slot, None) since the last call, in order."""
        ops, self.mirror_ops[:] = list(self.mirror_ops), []
        return ops

    def groups_in_use(self, slots: set[int]) -> set[str]:
        """Projection groups that some adapter in `slots` targets; the others need no LoRA call this step."""
        return set().union(*(self._targeted_groups[slot] for slot in slots))


def _layer_buffers(num_slots, max_rank, module_shapes, dtype, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    buffers = {}
    for modules in LORA_GROUPS.values():
        in_features = module_shapes[modules[0]][0]
        lora_a, lora_b = kernels.allocate_lora_group_buffers(
            num_slots, max_rank, in_features, tuple(module_shapes[m][1] for m in modules), dtype=dtype, device=device)
        buffers.update({module: (a, b) for module, a, b in zip(modules, lora_a, lora_b)})
    return buffers

