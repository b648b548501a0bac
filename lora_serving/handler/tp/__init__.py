"""Tensor parallelism: one engine over N ranks on one machine (docs/ENGINE.md, Tensor parallelism).

plan.py     which shard of every tensor a rank holds, and the bytes the collectives carry
devices.py  the degree (`max`), each rank's device, and a CPU rank's threads
comm.py     a rank's collectives over its own process group
protocol.py the per-step message rank 0 sends the other ranks, and its framing on their stdin
lora.py     LoRA of the row-parallel projections: shrink, all-reduce of the rank-r intermediate, expand
ranks.py    rank 0's side: starting ranks 1..N-1, sending each step, noticing a rank that died

The ranks themselves run handler/runner/ (the same ModelRunner on every rank; runner/worker.py is ranks
1..N-1's loop). Nothing here imports the engine, the runner or the adapter manager.
"""
