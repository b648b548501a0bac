"""The device side of the engine: one ModelRunner per tensor-parallel rank, built the same way on each.

device.py        the device and dtype, the CPU-thread policy, how many KV blocks fit
model_runner.py  ModelRunner: the model shard, LoRA slots, KV cache, the forward pass, sampling on rank 0
slot_sync.py     rank 0's adapter slot writes, sent to and received by the other ranks
worker.py        ranks 1..N-1: `python -m lora_serving.handler.runner.worker`, a loop around ModelRunner.run
"""
