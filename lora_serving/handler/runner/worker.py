"""Ranks 1..N-1 of a tensor-parallel engine: `python -m lora_serving.handler.runner.worker`, started by rank 0
(handler/tp/ranks.py).

A rank reads its WorkerStart from stdin, joins the process group, builds its ModelRunner exactly as rank 0
builds its own (its shard of the model, LoRA slots, thread policy), and then carries out every message rank
0 sends (handler/tp/protocol.py) until the pipe closes: the KV cache's size once, then each step, the same
forward pass on its shard, without logits or sampling. Any error ends the process (non-zero): rank 0 sees
the exit or the failed collective and reports this rank. Run as a module of the handler package, it imports
handler (which sets the OpenMP wait policy) before torch, as the engine's own process does.
"""

from __future__ import annotations

import datetime
import logging
import sys

import torch
import torch.distributed as dist

from lora_serving.handler.runner.model_runner import ModelRunner
from lora_serving.handler.tp import protocol
from lora_serving.handler.tp.comm import TensorParallelComm

logger = logging.getLogger("lora_serving.handler.runner.worker")


def serve(start: protocol.WorkerStart, pipe) -> None:
    device = torch.device(start.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", start.store_port, start.world_size, False,
                          timeout=datetime.timedelta(seconds=start.timeout_seconds))
    store.set(f"joined/{start.rank}", "1")
    comm = TensorParallelComm.connect(store, start.rank, start.world_size, device, start.timeout_seconds)
    runner = ModelRunner(start.config, device, rank=start.rank, world_size=start.world_size, comm=comm)
    store.set(f"loaded/{start.rank}", "1")
    while True:
        message = protocol.receive(pipe)
        if isinstance(message, protocol.Stop):
            return
        if isinstance(message, protocol.WorkerInit):
            runner.allocate_kv_cache(message.num_kv_blocks)
        else:
            runner.run(message)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pipe = sys.stdin.buffer
    start = protocol.receive(pipe)
    if not isinstance(start, protocol.WorkerStart):
        logger.error("expected a WorkerStart message first")
        return 2
    try:
        serve(start, pipe)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", start.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
