"""The base model's projections at decode-sized row counts on CPU: oneDNN's prepacked inner product against the C
matrix-vector kernel that reads the same packed weight (lora_serving/kernels/cpu_matvec.py), in one run.

Shapes are bench_engine's model's (hidden 512, intermediate 1376, vocab 32000) or, with --shapes smollm2,
SmolLM2-135M's (hidden 576, intermediate 1536, vocab 49152); weights fp32 or, with --dtype bfloat16, bf16 (the
kernel's bf16 form, where the CPU has bf16 dot products). Each shape is timed over enough distinct weights to
overflow the CPU caches, as in a decode step, where every weight comes from memory once; the two sides
alternate, best of a few rounds each. GB/s is the weight's bytes over the time, beside what a large copy moves
(read + write) and a large read (a sum) reach on this machine.

--decode-step MODEL_DIR adds an engine's batch-1 decode step on that model in --dtype with the kernel on and off
(rotating, best of --rounds each), e.g. the tests' SmolLM2-135M-Instruct in bf16.

    .venv/bin/python scripts/bench_projection.py [--rows 1 2 4 8] [--rounds 5] [--shapes bench|smollm2]
        [--dtype float32|bfloat16] [--decode-step MODEL_DIR] [--threads N]
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
    engine_decode_step_seconds,
    machine_description,
    measure_memory_bandwidth,
    print_table,
)

from lora_serving.handler import Engine  # noqa: E402
from lora_serving.handler.models.projection import Projection  # noqa: E402
from lora_serving.kernels import PackedMatvec  # noqa: E402

SHAPES = {
    "bench": {"q/k/v": (1536, 512), "o": (512, 512), "gate/up": (2752, 512), "down": (512, 1376),
              "LM head": (32000, 512)},
    # SmolLM2-135M: 9 query and 3 key/value heads of 64, fused as the engine does.
    "smollm2": {"q/k/v": (960, 576), "o": (576, 576), "gate/up": (3072, 576), "down": (576, 1536),
                "LM head": (49152, 576)},
}
# bf16 also times the kernel's AVX-512 dot-product route where AMX tiles serve (other CPUs' only route).
SIDES_BF16 = ["oneDNN", "kernel", "kernel, no tiles"]
# Distinct weights per shape: at least this many bytes in all, more than any CPU cache here.
COLD_BYTES = 128 * 2**20


def time_per_call(projections: list[Projection], x: torch.Tensor, calls: int) -> float:
    started = time.perf_counter()
    for index in range(calls):
        projections[index % len(projections)](x)
    return (time.perf_counter() - started) / calls


def use_side(side: str, projections: list[Projection], kernels: list) -> None:
    """Routes the projections' one to four rows through oneDNN or the kernel (with AMX tiles or without)."""
    PackedMatvec.allow_tiles = side != "kernel, no tiles"
    for projection, kernel in zip(projections, kernels):
        projection._matvec = None if side == "oneDNN" else kernel


def measure_read_bandwidth(size_mb: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a sum over a large fp32 tensor: a read alone, what a matrix-vector product needs."""
    data = torch.ones(size_mb * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return data.numel() * 4 / best


def decode_step_table(model_dir: Path, dtype: str, rounds: int) -> list[list]:
    """The batch-1 decode step with the kernel serving one to four rows and without (oneDNN), alternating."""
    engine = Engine(model_dir, dtype=dtype, max_rolling_batch_size=1, max_model_len=512)
    model = engine.model
    projections = [p for layer in model.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    projections.append(model.lm_head)
    kernels = [p._matvec for p in projections]
    if not all(kernels):
        sys.exit(f"the C kernel does not serve every projection of {model_dir.name} in {dtype} here")
    prompt = list(range(100, 224))
    sides = SIDES_BF16 if dtype == "bfloat16" else ["oneDNN", "kernel"]
    best = {side: float("inf") for side in sides}
    engine_decode_step_seconds(engine, prompt, 8, "warm-up")
    for round_index in range(rounds):
        for side in sides[round_index % len(sides):] + sides[: round_index % len(sides)]:
            use_side(side, projections, kernels)
            best[side] = min(best[side], engine_decode_step_seconds(engine, prompt, 32, f"probe-{round_index}-{side}"))
    use_side("kernel", projections, kernels)
    weight_bytes = sum(torch.ops.mkldnn._nbytes(p._packed) for p in projections)
    return [[model_dir.name, dtype, weight_bytes / 1e6] + [best[side] * 1e3 for side in sides]
            + [best["oneDNN"] / best["kernel"]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds of each side; best kept")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--decode-step", type=Path, metavar="MODEL_DIR", help="also time this model's decode step")
    parser.add_argument("--threads", type=int, help="torch's threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    sides = SIDES_BF16 if dtype == torch.bfloat16 else ["oneDNN", "kernel"]
    bandwidth, read_bandwidth = measure_memory_bandwidth(), measure_read_bandwidth()
    rows_table = []
    for name, (out_features, in_features) in SHAPES[args.shapes].items():
        weight_bytes = out_features * in_features * dtype.itemsize
        copies = max(2, -(-COLD_BYTES // weight_bytes))
        generator = torch.Generator().manual_seed(out_features)
        projections = [Projection((torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype))
                       for _ in range(copies)]
        if projections[0].matvec_rows == 0:
            sys.exit("the C kernel does not serve these projections here (no oneDNN, no compiler, or another layout)")
        kernels = [p._matvec for p in projections]
        calls = max(2 * copies, 20)
        for rows in args.rows:
            x = torch.randn(rows, in_features, generator=generator).to(dtype)
            best = {side: float("inf") for side in sides}
            for round_index in range(args.rounds):
                for side in sides[round_index % len(sides):] + sides[: round_index % len(sides)]:
                    use_side(side, projections, kernels if rows <= kernels[0].max_rows else [None] * copies)
                    time_per_call(projections, x, copies)  # warm the route, not the weights
                    best[side] = min(best[side], time_per_call(projections, x, calls))
            served = "kernel" if rows <= kernels[0].max_rows else "onednn (above the kernel's rows)"
            row = [name, f"{out_features}x{in_features}", rows]
            for side in sides:
                row += [best[side] * 1e6, weight_bytes / best[side] / 1e9]
            rows_table.append(row + [best["oneDNN"] / best["kernel"], served])
    use_side("kernel", [], [])

    print(f"# bench_projection: {machine_description()}; {args.shapes} shapes in {args.dtype}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (read + write), read {read_bandwidth / 1e9:.1f} GB/s (a sum); weights cycled "
          f"over >= {COLD_BYTES >> 20} MB per shape; best of {args.rounds} alternating rounds")
    print_table(["projection", "out x in", "rows"] + [f"{side} {unit}" for side in sides for unit in ("(us)", "GB/s")]
                + ["oneDNN / kernel", "the engine uses"], rows_table)
    if args.decode_step:
        print(f"# batch-1 decode step (124-token prompt, 32 new tokens), best of {args.rounds} alternating rounds")
        print_table(["model", "dtype", "packed weights (MB)"] + [f"{side} step (ms)" for side in sides]
                    + ["oneDNN / kernel"], decode_step_table(args.decode_step, args.dtype, args.rounds))


if __name__ == "__main__":
    main()
