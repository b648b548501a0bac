"""The base model's projections at decode-sized row counts on CPU: oneDNN's prepacked inner product against the C
matrix-vector kernel that reads the same packed weight (lora_serving/kernels/cpu_matvec.py), in one run.

Shapes are bench_engine's model's (hidden 512, intermediate 1376, vocab 32000). Each shape is timed over enough
distinct weights to overflow the CPU caches, as in a decode step, where every weight comes from memory once; the
two sides alternate, best of a few rounds each. GB/s is the weight's bytes over the time, beside what a large
copy moves (read + write) on this machine.

    .venv/bin/python scripts/bench_projection.py [--rows 1 2 4 8] [--rounds 5]
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
from benchlib import machine_description, measure_memory_bandwidth, print_table  # noqa: E402

from lora_serving.handler.models.projection import Projection  # noqa: E402

SHAPES = {"q/k/v": (1536, 512), "o": (512, 512), "gate/up": (2752, 512), "down": (512, 1376), "LM head": (32000, 512)}
# Distinct weights per shape: at least this many bytes in all, more than any CPU cache here.
COLD_BYTES = 128 * 2**20


def time_per_call(projections: list[Projection], x: torch.Tensor, calls: int) -> float:
    started = time.perf_counter()
    for index in range(calls):
        projections[index % len(projections)](x)
    return (time.perf_counter() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds of each side; best kept")
    args = parser.parse_args()

    bandwidth = measure_memory_bandwidth()
    rows_table = []
    for name, (out_features, in_features) in SHAPES.items():
        weight_bytes = out_features * in_features * 4
        copies = max(2, -(-COLD_BYTES // weight_bytes))
        generator = torch.Generator().manual_seed(out_features)
        projections = [Projection(torch.randn(out_features, in_features, generator=generator) * 0.02)
                       for _ in range(copies)]
        if projections[0].matvec_rows == 0:
            sys.exit("the C kernel does not serve these projections here (no oneDNN, no compiler, or another layout)")
        kernels = [p._matvec for p in projections]
        calls = max(2 * copies, 20)
        for rows in args.rows:
            x = torch.randn(rows, in_features, generator=generator)
            best = {"onednn": float("inf"), "kernel": float("inf")}
            for round_index in range(args.rounds):
                order = ("onednn", "kernel") if round_index % 2 == 0 else ("kernel", "onednn")
                for side in order:
                    for projection, kernel in zip(projections, kernels):
                        projection._matvec = kernel if side == "kernel" and rows <= kernel.max_rows else None
                    time_per_call(projections, x, copies)  # warm the route, not the weights
                    best[side] = min(best[side], time_per_call(projections, x, calls))
            served = "kernel" if rows <= kernels[0].max_rows else "onednn (above the kernel's rows)"
            rows_table.append([name, f"{out_features}x{in_features}", rows, best["onednn"] * 1e6,
                               weight_bytes / best["onednn"] / 1e9, best["kernel"] * 1e6,
                               weight_bytes / best["kernel"] / 1e9, best["onednn"] / best["kernel"], served])

    print(f"# bench_projection: {machine_description()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); "
          f"weights cycled over >= {COLD_BYTES >> 20} MB per shape; best of {args.rounds} alternating rounds")
    print_table(["projection", "out x in", "rows", "oneDNN (us)", "oneDNN GB/s", "kernel (us)", "kernel GB/s",
                 "oneDNN / kernel", "the engine uses"], rows_table)


if __name__ == "__main__":
    main()
