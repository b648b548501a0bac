"""Adapter slots kept the same on every tensor-parallel rank: rank 0's slot writes, sent and received.

Rank 0 admits adapters into its slots (handler/lora/slot_admission.py); its DeviceSlots log each write and
clear. Before a step, `take_slot_writes` turns the log into SlotWrites for the step message and one flat
tensor per written adapter (A then B of every module, whole), which rank 0 broadcasts after the message;
each other rank reads them back with `receive_slot_write` and keeps its own shard (DeviceSlots.write).
"""

from __future__ import annotations

import torch

from lora_serving.handler.lora.device_slots import DeviceSlots
from lora_serving.handler.lora.peft_adapter import AdapterVersion, AdapterWeights, ModuleLora
from lora_serving.handler.tp import protocol
from lora_serving.handler.tp.comm import TensorParallelComm


def take_slot_writes(slots: DeviceSlots | None,
                     device: torch.device) -> tuple[list[protocol.SlotWrite], list[torch.Tensor]]:
    """The slot changes since the last step, and the weights to broadcast after the message, in order."""
    writes: list[protocol.SlotWrite] = []
    tensors: list[torch.Tensor] = []
    for slot, weights in slots.take_mirror_ops() if slots is not None else ():
        if weights is None:
            writes.append(protocol.SlotWrite(slot, None))
            continue
        keys = sorted(weights.modules)
        modules = [weights.modules[key] for key in keys]
        shapes = [(layer, module, m.a.shape[0], m.a.shape[1], m.b.shape[0])
                  for (layer, module), m in zip(keys, modules)]
        writes.append(protocol.SlotWrite(slot, weights.version.content_hash, shapes))
        tensors.append(torch.cat([t.reshape(-1) for m in modules for t in (m.a, m.b)]).to(device))
    return writes, tensors


def receive_slot_write(write: protocol.SlotWrite, slots: DeviceSlots, comm: TensorParallelComm,
                       dtype: torch.dtype, device: torch.device) -> None:
    """Apply one of rank 0's slot changes; a write's weights come from rank 0's broadcast."""
    if not write.modules:
        slots.clear(write.slot)
        return
    sizes = [rank * (in_features + out_features) for _, _, rank, in_features, out_features in write.modules]
    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
    comm.broadcast(flat, "adapter_weights")
    modules = {}
    for (layer, module, rank, in_features, out_features), part in zip(write.modules, flat.split(sizes)):
        a, b = part.split([rank * in_features, out_features * rank])
        modules[(layer, module)] = ModuleLora(a.view(rank, in_features), b.view(out_features, rank))
    version = AdapterVersion(name="", path=None, content_hash=write.content_hash)
    slots.write(write.slot, AdapterWeights(version, modules))
