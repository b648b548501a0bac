"""Tensor parallelism: what the ranks send each other per step, and CPU TP=2 against TP=1.

(a) Per-step communication at TP=2, 4, 8 for a Llama-70B shape (hidden 8192, 80 layers, 64 heads, 8 KV
heads, intermediate 28672, vocab 128256, bf16), from the engine's own sharding plan
(lora_serving/handler/tp/plan.py, `ShardingPlan.step_all_reduce_bytes`, which the tests check against the bytes the
model really puts into its collectives): for a decode step of B tokens and a prefill chunk of C tokens,
the base model's all-reduces, the LoRA all-reduces with rank-16 adapters on all seven projections (padded
to max_lora_rank, as the engine sends them), each as payload per rank and as ring-all-reduce wire bytes
per rank; the step message rank 0 pickles to each other rank; and what an LM head sharded by vocabulary
would add (fp32 logits gathered to rank 0), the alternative not taken.

(c) The LM head, replicated on rank 0 (the engine's choice) against sharded by vocabulary, measured on this
CPU with two gloo ranks at the benchmark model's shape and at a 128k vocabulary: rank 0 multiplying the
whole head, against each rank multiplying its half and rank 0 gathering the other half's fp32 logits.

(b) Generated tokens per second on this CPU, TP=2 against TP=1, on the benchmark model, the two engines
taking turns over the same workloads (a new one each round). A sanity figure: on a CPU two ranks split
the same cores, so TP=2 is not expected to be faster.

    BENCH_CACHE_DIR=... .venv/bin/python scripts/bench_tp.py [--rounds 3] [--requests 16]
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

# handler before torch: it sets how torch's OpenMP threads wait.
from lora_serving.handler import Engine
from lora_serving.handler.lora.step_plan import LoraStepPlan
from lora_serving.handler.step_inputs import StepInputs
from lora_serving.handler.tp.plan import ModelShape, ShardingPlan, ring_all_reduce_wire_bytes
from lora_serving.handler.tp.protocol import StepMessage

# isort: split
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_model_dir, engine_throughput, machine_description, print_table, workload  # noqa: E402

LLAMA_70B = ModelShape(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
                       head_dim=128, vocab_size=128256)
BF16_BYTES = 2
LORA_RANK = 16
LORA_ON_ALL_SEVEN = ("qkv", "o", "gate_up", "down")  # the projection groups such adapters touch
BLOCK_SIZE = 16


def mib(size: int) -> str:
    return f"{size / 2**20:.2f}"


def step_message_bytes(num_decodes: int, context: int, prefill: int) -> int:
    """The pickled StepMessage for `num_decodes` decodes of `context` tokens each, or one prefill chunk."""
    blocks = -(-context // BLOCK_SIZE)
    if prefill:
        inputs = StepInputs(list(range(prefill)), list(range(prefill)), list(range(prefill)), [prefill - 1], [], [],
                            "per_sequence", [])
        token_slots = [0] * prefill
    else:
        inputs = StepInputs([7] * num_decodes, [context] * num_decodes, list(range(num_decodes)),
                            list(range(num_decodes)), [list(range(i * blocks, (i + 1) * blocks))
                                                       for i in range(num_decodes)],
                            [context] * num_decodes, "padded", [])
        token_slots = [i % 4 for i in range(num_decodes)]
    message = StepMessage(inputs, [], [], LoraStepPlan(token_slots, set(LORA_ON_ALL_SEVEN)))
    return len(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def communication_table(decode_tokens: int, prefill_tokens: int, context: int) -> None:
    rows = []
    for world_size in (2, 4, 8):
        plan = ShardingPlan(LLAMA_70B, 0, world_size)
        for label, tokens in ((f"decode B={decode_tokens}", decode_tokens), (f"prefill C={prefill_tokens}",
                                                                              prefill_tokens)):
            sent = plan.step_all_reduce_bytes(tokens, BF16_BYTES, LORA_ON_ALL_SEVEN, max_lora_rank=LORA_RANK)
            base = sent["o"] + sent["down"]
            lora = sent["lora_o"] + sent["lora_down"]
            sampled_rows = tokens if label.startswith("decode") else 1
            message = step_message_bytes(tokens, context, 0) if label.startswith("decode") else step_message_bytes(
                0, 0, tokens)
            rows.append([world_size, label, mib(base), mib(ring_all_reduce_wire_bytes(base, world_size)),
                         mib(lora), mib(ring_all_reduce_wire_bytes(lora, world_size)), f"{100 * lora / base:.2f}%",
                         f"{message / 1024:.1f}", mib(plan.vocab_sharded_lm_head_bytes(sampled_rows))])
    print(f"(a) Per-step communication, Llama-70B shape, bf16, LoRA rank {LORA_RANK} on all seven projections "
          f"(decode contexts of {context} tokens):")
    print_table(["TP", "step", "base MiB/rank", "base wire MiB/rank", "LoRA MiB/rank", "LoRA wire MiB/rank",
                 "LoRA / base", "step msg KiB/rank", "vocab-sharded head MiB"], rows)


def _lm_head_rank(rank: int, port: int, hidden: int, vocab: int, rows: int, repeats: int, results) -> None:
    import datetime
    import time

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # each rank one core, as the engine gives them at TP=2 on 2 cores
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=60))
    group = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=60))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=generator)
    half = torch.randn(vocab // 2, hidden, generator=generator) * 0.02
    whole = torch.cat([half, half]) if rank == 0 else None
    timings = {"replicated": [], "vocab-sharded": []}
    for _ in range(repeats):
        group.barrier().wait()
        started = time.perf_counter()
        if rank == 0:
            (x @ whole.T).float()
        group.barrier().wait()
        timings["replicated"].append(time.perf_counter() - started)
        started = time.perf_counter()
        local = (x @ half.T).float().contiguous()
        # All-gather rather than gather: at two ranks rank 0 receives the same bytes.
        gathered = [torch.empty_like(local) for _ in range(2)]
        group.allgather([gathered], [local]).wait()
        if rank == 0:
            torch.cat(gathered, dim=1)
        group.barrier().wait()
        timings["vocab-sharded"].append(time.perf_counter() - started)
    if rank == 0:
        results.put({name: sorted(values)[len(values) // 2] for name, values in timings.items()})


def lm_head_table(rows_list: list[int], repeats: int) -> None:
    import socket

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    table = []
    for hidden, vocab in ((512, 32000), (512, 128256)):
        for rows in rows_list:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            results = context.Queue()
            processes = [context.Process(target=_lm_head_rank, args=(rank, port, hidden, vocab, rows, repeats,
                                                                      results)) for rank in range(2)]
            for process in processes:
                process.start()
            medians = results.get(timeout=300)
            for process in processes:
                process.join()
            table.append([f"{hidden} x {vocab}", rows, f"{medians['replicated'] * 1e3:.2f}",
                          f"{medians['vocab-sharded'] * 1e3:.2f}"])
    print(f"\n(c) LM head per step on this CPU, two ranks of one thread, median of {repeats} (ms):")
    print_table(["hidden x vocab", "rows", "replicated on rank 0", "vocab-sharded + gather"], table)


def throughput_table(rounds: int, num_requests: int) -> None:
    model_dir = bench_model_dir()
    options = dict(dtype="float32", max_rolling_batch_size=16, cpu_kv_cache_mb=256, max_model_len=512)
    cores = len(os.sched_getaffinity(0))
    # torch's thread count is per process and both engines' rank 0 live in this one: each side sets its
    # own before its turn (TP=1 all cores, TP=2 rank 0 half of them, as rank 1 has).
    threads = {1: cores, 2: max(1, cores // 2)}
    single = Engine(model_dir, cpu_threads=threads[1], **options)
    parallel = Engine(model_dir, tensor_parallel_degree=2, **options)
    samples: dict[int, list[float]] = {1: [], 2: []}
    try:
        for round_index in range(rounds):
            requests = workload(num_requests=num_requests, min_len=16, max_len=96, seed=100 + round_index)
            order = [(1, single), (2, parallel)] if round_index % 2 == 0 else [(2, parallel), (1, single)]
            for degree, engine in order:
                torch.set_num_threads(threads[degree])
                tokens_per_second, _ = engine_throughput(engine, requests)
                samples[degree].append(tokens_per_second)
    finally:
        parallel.close()
        single.close()
    print(f"\n(b) Generated tokens/s on this CPU, {num_requests} requests of 16-96 prompt and output tokens, "
          f"max_rolling_batch_size 16, fp32, {rounds} alternating rounds (TP=1 {threads[1]} threads, TP=2 "
          f"{threads[2]} per rank):")
    rows = [[degree, " ".join(f"{value:.0f}" for value in values), f"{max(values):.0f}"]
            for degree, values in samples.items()]
    print_table(["TP", "tokens/s per round", "best"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=2048, help="tokens each decode attends to (block tables)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-lm-head", action="store_true")
    args = parser.parse_args()
    print(machine_description("cpu"))
    communication_table(args.decode_tokens, args.prefill_tokens, args.context)
    if not args.skip_lm_head:
        lm_head_table([1, 16], repeats=30)
    if not args.skip_throughput:
        throughput_table(args.rounds, args.requests)


if __name__ == "__main__":
    main()
