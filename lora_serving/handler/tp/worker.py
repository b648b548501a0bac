"""Ranks 1..N-1 of a tensor-parallel engine: `python -m lora_serving.handler.tp.worker`, started by rank 0 (ranks.py).

A rank reads its WorkerStart from stdin, joins the process group, loads its shard of the model, and then
runs every step rank 0 sends (handler/tp/protocol.py) until the pipe closes: the same forward pass on its
shard, without logits or sampling. Any error ends the process (non-zero): rank 0 sees the exit or the
failed collective and reports this rank. Run as a module of the handler package, it imports handler (which
sets the OpenMP wait policy) before torch, as the engine's own process does.
"""

from __future__ import annotations

import datetime
import logging
import sys

import torch
import torch.distributed as dist

from lora_serving.handler.engine import resolve_dtype
from lora_serving.handler.lora.device_slots import DeviceSlots
from lora_serving.handler.lora.manager import LoraStepApplier
from lora_serving.handler.lora.peft_adapter import AdapterVersion, AdapterWeights, ModuleLora
from lora_serving.handler.models import load_hf_config, load_model
from lora_serving.handler.step_inputs import build_forward_inputs
from lora_serving.handler.tp import protocol
from lora_serving.handler.tp.comm import TensorParallelComm
from lora_serving.handler.tp.lora import RowParallelLora
from lora_serving.handler.tp.plan import ModelShape, ShardingPlan

logger = logging.getLogger("lora_serving.handler.tp.worker")


class Worker:
    def __init__(self, start: protocol.WorkerStart) -> None:
        config = start.config
        self.device = torch.device(start.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif start.cpu_threads:
            torch.set_num_threads(start.cpu_threads)
        store = dist.TCPStore("127.0.0.1", start.store_port, start.world_size, False,
                              timeout=datetime.timedelta(seconds=start.timeout_seconds))
        store.set(f"joined/{start.rank}", "1")
        self.comm = TensorParallelComm.connect(store, start.rank, start.world_size, self.device,
                                               start.timeout_seconds)
        hf_config = load_hf_config(config.model_id, config.trust_remote_code)
        self.plan = ShardingPlan(ModelShape.from_hf_config(hf_config), start.rank, start.world_size)
        self.dtype = resolve_dtype(config, self.device)
        self.model = load_model(config.model_id, hf_config, self.dtype, self.device, self.plan, self.comm)
        store.set(f"loaded/{start.rank}", "1")
        self.slots = self.row_parallel = None
        if config.enable_lora:
            self.slots = DeviceSlots(config.max_loras, config.max_lora_rank, self.model.num_layers,
                                     self.model.lora_module_shapes(), self.dtype, self.device, shard=self.plan)
            self.row_parallel = RowParallelLora(self.comm, self.plan.hidden_columns, config.max_loras,
                                                config.max_lora_rank, self.dtype, self.device)
        self.block_size = config.block_size
        self.kv_cache: torch.Tensor | None = None

    def run(self, pipe) -> None:
        while True:
            message = protocol.receive(pipe)
            if isinstance(message, protocol.Stop):
                return
            if isinstance(message, protocol.WorkerInit):
                model = self.model
                self.kv_cache = torch.zeros(
                    (model.num_layers, 2, model.num_kv_heads, message.num_kv_blocks, self.block_size,
                     model.head_dim), dtype=model.dtype, device=self.device)
                continue
            self.step(message)

    def step(self, message: protocol.StepMessage) -> None:
        for write in message.slot_writes:
            self._write_slot(write)
        if message.block_copies:
            sources, destinations = (torch.tensor(side, dtype=torch.long, device=self.device)
                                     for side in zip(*message.block_copies))
            self.kv_cache[:, :, :, destinations] = self.kv_cache[:, :, :, sources]
        ctx, input_ids, _ = build_forward_inputs(message.inputs, self.device)
        if message.lora is not None:
            ctx.lora = LoraStepApplier(self.slots, message.lora, self.device, self.row_parallel)
        self.model.forward(input_ids, ctx, self.kv_cache)

    def _write_slot(self, write: protocol.SlotWrite) -> None:
        if not write.modules:
            self.slots.clear(write.slot)
            return
        sizes = [rank * (in_features + out_features) for _, _, rank, in_features, out_features in write.modules]
        flat = torch.empty(sum(sizes), dtype=self.dtype, device=self.device)
        self.comm.broadcast(flat, "adapter_weights")
        modules = {}
        for (layer, module, rank, in_features, out_features), part in zip(write.modules, flat.split(sizes)):
            a, b = part.split([rank * in_features, out_features * rank])
            modules[(layer, module)] = ModuleLora(a.view(rank, in_features), b.view(out_features, rank))
        version = AdapterVersion(name="", path=None, content_hash=write.content_hash)
        self.slots.write(write.slot, AdapterWeights(version, modules))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe = sys.stdin.buffer
    start = protocol.receive(pipe)
    if not isinstance(start, protocol.WorkerStart):
        logger.error("expected a WorkerStart message first")
        return 2
    try:
        worker = Worker(start)
        worker.run(pipe)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", start.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
