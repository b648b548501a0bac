"""Offline throughput of the engine against transformers generate() with static batches, in one run.

Same model (a ~50M-parameter Llama with random weights), same 64 requests (prompt and output lengths
drawn from 16..128, eos ignored), same batch size. Also the decode step time at batch 1 of both, next to
the physical floor: the model's weight bytes divided by the memory bandwidth measured in this run.

    .venv/bin/python scripts/bench_engine.py [--requests 64] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    bench_model_dir,
    engine_decode_step_seconds,
    engine_throughput,
    left_padded_batch,
    machine_description,
    measure_memory_bandwidth,
    model_weight_bytes,
    print_table,
    resolve_device,
    workload,
)
from transformers import AutoModelForCausalLM  # noqa: E402

from lora_serving.handler import Engine, SamplingParams  # noqa: E402


def transformers_throughput(model, requests, batch_size: int, pad_id: int) -> float:
    """Static batches in arrival order, left-padded; each batch runs to its longest requested output."""
    useful_tokens = 0
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        ids, mask = left_padded_batch(batch, pad_id, model.device)
        model.generate(ids, attention_mask=mask, max_new_tokens=max(r.max_new_tokens for r in batch),
                       do_sample=False, pad_token_id=pad_id)
        useful_tokens += sum(r.max_new_tokens for r in batch)
    return useful_tokens / (time.perf_counter() - started)


def transformers_decode_step_seconds(model, prompt_ids, new_tokens: int, pad_id: int) -> float:
    ids = torch.tensor([prompt_ids], device=model.device)

    def timed(count: int) -> float:
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                       do_sample=False, pad_token_id=pad_id)
        return time.perf_counter() - started

    return (timed(new_tokens) - timed(1)) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best is kept")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="both engines' device")
    args = parser.parse_args()
    device = resolve_device(args.device)

    model_dir = bench_model_dir()
    requests = workload(args.requests)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=args.batch_size, device=device)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    reference.generation_config.eos_token_id = None
    pad_id = reference.config.pad_token_id

    # Warm both up once so that one-time allocations are not timed.
    engine.generate([requests[0].prompt_ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
    transformers_throughput(reference, requests[:2], 2, pad_id)

    # Alternate the two and keep each one's best run: on a shared machine, interference only slows a run.
    ours = theirs = 0.0
    our_step = their_step = float("inf")
    probe = requests[0].prompt_ids
    for _ in range(args.repeats):
        our_run, tokens = engine_throughput(engine, requests)
        ours = max(ours, our_run)
        theirs = max(theirs, transformers_throughput(reference, requests, args.batch_size, pad_id))
        our_step = min(our_step, engine_decode_step_seconds(engine, probe, args.decode_tokens))
        their_step = min(their_step, transformers_decode_step_seconds(reference, probe, args.decode_tokens, pad_id))
    bandwidth = measure_memory_bandwidth(device=device)
    floor = model_weight_bytes(model_dir) / bandwidth

    print(f"# bench_engine: {machine_description(device)}, on {device}")
    print(f"# model {model_dir.name}: {model_weight_bytes(model_dir) / 1e6:.0f} MB fp32 weights; "
          f"{args.requests} requests, {tokens} generated tokens, batch size {args.batch_size}; "
          f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; best of {args.repeats} alternating runs")
    print_table(
        ["measure", "engine", "transformers", "engine / transformers"],
        [
            ["throughput (generated tok/s)", ours, theirs, ours / theirs],
            ["decode step at batch 1 (ms)", our_step * 1e3, their_step * 1e3, their_step / our_step],
            ["physical floor (ms, weights / bandwidth)", floor * 1e3, floor * 1e3, ""],
        ],
    )


if __name__ == "__main__":
    main()
