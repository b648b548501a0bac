"""The C decode attention kernel (lora_serving/kernels/cpu_attention.c) against the same kernel as a git revision
had it ("before", built here from that revision's source text), in one process; prints a table.

Shape of SmolLM2-135M's attention (9 query heads on 3 KV heads, head_dim 64; blocks of 16), one layer's call:
every sequence of the batch at one context length, its blocks scattered over the cache. The two builds alternate
within each round (the order flipping each round) and each keeps its best per-call time; both are called through
ctypes with the same prepared arguments, so the Python wrapper's cost is in neither.

    .venv/bin/python scripts/bench_attention.py [--before main] [--rounds 5] [--batches 1 8 32]
        [--contexts 128 512 2048] [--dtypes fp32 bf16] [--threads N] [--cold-mb 1536]

--cold-mb: each case's calls take turns over copies of its K/V cache, that many MB in all, so that they come from
memory as in an engine step rather than from the caches of the last call.

--engine: instead, the engine's throughput on the real SmolLM2-135M-Instruct (tests/real_model.py builds it) at
batch 32, 32 requests of 16..128 prompt and new tokens (eos ignored), with the engine's decode attention going to
one build or the other (cpu_attention.decode_attention's `library`), alternating; each side keeps its best, and
its best mean time per attention call (the Python wrapper's checks included; one call per layer and step).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_description, print_table  # noqa: E402

from lora_serving.kernels import cpu_native  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = ("lora_serving/kernels/cpu_attention.c", "lora_serving/kernels/cpu_vec.h",
                "lora_serving/kernels/cpu_attention_tiles.h", "lora_serving/kernels/cpu_amx.h",
                "lora_serving/kernels/cpu_attention_amx.h")  # the last three are not in older revisions
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def build_revision(revision: str, directory: Path):
    """The attention kernel as `revision` had it, compiled with the engine's flags and loaded."""
    for name in KERNEL_FILES:
        shown = subprocess.run(["git", "show", f"{revision}:{name}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            (directory / Path(name).name).write_text(shown.stdout)
        elif name == KERNEL_FILES[0]:
            sys.exit(f"--before {revision}: {shown.stderr.strip()}")
    library = directory / "attention_before.so"
    flags = [flag for flag in cpu_native.FLAGS]
    subprocess.run(["cc", *flags, "-o", str(library), str(directory / "cpu_attention.c"), "-lm"], check=True)
    return declare(ctypes.CDLL(str(library)))


def declare(library):
    for attention in (library.paged_decode_attention_f32, library.paged_decode_attention_bf16):
        attention.restype = ctypes.c_int
        attention.argtypes = [_I64, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, _PTR,
                              _PTR, ctypes.c_float, _PTR, ctypes.c_int]
    return library


class Case:
    """One layer's decode attention inputs: `batch` sequences of `context` keys in scattered blocks."""

    def __init__(self, batch: int, context: int, dtype: torch.dtype, seed: int = 0, cold_bytes: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        per_sequence = -(-context // BLOCK_SIZE)
        num_blocks = batch * per_sequence
        self.k_cache = torch.randn(KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM, generator=gen).to(dtype)
        self.v_cache = torch.randn(KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM, generator=gen).to(dtype)
        blocks = list(range(num_blocks))
        random.Random(seed).shuffle(blocks)
        self.tables = torch.tensor(blocks, dtype=torch.int64).view(batch, per_sequence).contiguous()
        self.lengths = torch.full((batch,), context, dtype=torch.int64)
        self.q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen).to(dtype)
        self.out = torch.empty_like(self.q)
        self.arguments = (
            _I64(batch), _PTR(self.q.data_ptr()), _I64(self.q.stride(0)), _I64(self.q.stride(1)), _I64(Q_HEADS),
            _I64(KV_HEADS), _I64(HEAD_DIM), _PTR(self.k_cache.data_ptr()), _PTR(self.v_cache.data_ptr()),
            _I64(num_blocks), _I64(BLOCK_SIZE), _PTR(self.tables.data_ptr()), _I64(per_sequence),
            _PTR(self.lengths.data_ptr()), None, ctypes.c_float(HEAD_DIM**-0.5), _PTR(self.out.data_ptr()),
            ctypes.c_int(torch.get_num_threads()))
        self.suffix = "f32" if dtype == torch.float32 else "bf16"
        # Cold: calls take turns over copies of the caches, cold_bytes in all, so that their K/V come from memory
        # as a layer's do in an engine step (the weights and the other layers pass through the caches between).
        copies = max(2, cold_bytes // (2 * self.k_cache.numel() * self.k_cache.element_size())) if cold_bytes else 1
        self.copies = [(self.k_cache, self.v_cache)]
        if copies > 1:
            k_copies = torch.empty((copies, *self.k_cache.shape), dtype=dtype)
            v_copies = torch.empty_like(k_copies)
            k_copies.copy_(self.k_cache.expand_as(k_copies))
            v_copies.copy_(self.v_cache.expand_as(v_copies))
            self.copies = list(zip(k_copies, v_copies))
        self.turns = [self.arguments[:7] + (_PTR(k.data_ptr()), _PTR(v.data_ptr())) + self.arguments[9:]
                      for k, v in self.copies]
        self.turn = 0

    def run(self, library) -> torch.Tensor:
        if getattr(library, f"paged_decode_attention_{self.suffix}")(*self.arguments) != 0:
            raise MemoryError("the kernel had no memory for its scratch")
        return self.out.clone()

    def seconds(self, library, repeats: int) -> float:
        function = getattr(library, f"paged_decode_attention_{self.suffix}")
        turns = [self.turns[(self.turn + i) % len(self.turns)] for i in range(repeats)]
        self.turn += repeats
        start = time.perf_counter()
        for arguments in turns:
            function(*arguments)
        return (time.perf_counter() - start) / repeats


class Timed:
    """A function that adds up the seconds spent in it and counts its calls."""

    def __init__(self, function) -> None:
        self.function, self.seconds, self.calls = function, 0.0, 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def engine_comparison(before, dtype_names: list[str], rounds: int) -> None:
    sys.path.insert(0, str(ROOT))
    from benchlib import engine_throughput, workload
    from tests.real_model import TEST_CACHE_DIR, build_smollm2, missing_requirements

    from lora_serving.handler import Engine
    from lora_serving.kernels import cpu_attention

    if missing_requirements():
        sys.exit(missing_requirements())
    model_dir = build_smollm2(TEST_CACHE_DIR)
    requests = workload(32, seed=1)
    after_kernel = cpu_attention.decode_attention
    kernels = {"before": Timed(functools.partial(after_kernel, library=before)), "after": Timed(after_kernel)}
    rows = []
    try:
        for dtype_name in dtype_names:
            engine = Engine(model_dir, dtype=str(DTYPES[dtype_name]).removeprefix("torch."), max_rolling_batch_size=32)
            if engine.runner.decode_form != "kernel":
                sys.exit("the C attention kernel does not serve this engine here")
            engine_throughput(engine, requests[:2])  # warm: first calls, the prefix cache
            best = {side: 0.0 for side in kernels}
            per_call = {side: float("inf") for side in kernels}
            for round_index in range(rounds):
                for side in (("before", "after") if round_index % 2 == 0 else ("after", "before")):
                    cpu_attention.decode_attention = kernels[side]
                    kernels[side].seconds, kernels[side].calls = 0.0, 0
                    best[side] = max(best[side], engine_throughput(engine, requests)[0])
                    per_call[side] = min(per_call[side], kernels[side].seconds / kernels[side].calls)
            rows.append([dtype_name, best["before"], best["after"], best["after"] / best["before"],
                         per_call["before"] * 1e6, per_call["after"] * 1e6, per_call["before"] / per_call["after"]])
            del engine
    finally:
        cpu_attention.decode_attention = after_kernel
    print(f"{machine_description()}; SmolLM2-135M-Instruct, 32 requests at batch 32; best of {rounds} rounds")
    print_table(["dtype", "before tok/s", "after tok/s", "after / before", "before us/call", "after us/call",
                 "before / after per call"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="main", help="git revision of the kernel to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--engine", action="store_true", help="the engine's throughput on SmolLM2 instead")
    parser.add_argument("--cold-mb", type=int, default=0,
                        help="cycle each case's calls over copies of its K/V this large in all (0: one copy, warm)")
    parser.add_argument("--threads", type=int, default=None, help="threads the kernel may use (torch's default)")
    parser.add_argument("--seconds-per-side", type=float, default=0.02,
                        help="time each side runs per round (repeats chosen to fill it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    after = cpu_native.library()
    if after is None:
        sys.exit("the C kernels do not build here")
    lanes = after.attention_vector_lanes()
    with tempfile.TemporaryDirectory() as scratch:
        before = build_revision(args.before, Path(scratch))
        if args.engine:
            engine_comparison(before, args.dtypes, args.rounds)
            return
        rows = []
        for dtype_name in args.dtypes:
            for batch in args.batches:
                for context in args.contexts:
                    case = Case(batch, context, DTYPES[dtype_name], cold_bytes=args.cold_mb << 20)
                    difference = (case.run(before).float() - case.run(after).float()).abs().max().item()
                    once = min(case.seconds(after, 1) for _ in range(3))
                    repeats = max(1, int(args.seconds_per_side / max(once, 1e-6)))
                    best = {"before": float("inf"), "after": float("inf")}
                    for round_index in range(args.rounds):
                        order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
                        for side in order:
                            library = before if side == "before" else after
                            best[side] = min(best[side], case.seconds(library, repeats))
                    flops = 4 * batch * Q_HEADS * context * HEAD_DIM  # q.K and p.V, a multiply-add each
                    read = 2 * batch * KV_HEADS * context * HEAD_DIM * case.k_cache.element_size()  # K and V
                    rows.append([dtype_name, batch, context, best["before"] * 1e6, best["after"] * 1e6,
                                 best["before"] / best["after"], flops / best["after"] / 1e9,
                                 read / best["after"] / 1e9, f"{difference:.2g}"])
    warmth = f"K/V cycled over {args.cold_mb} MB of copies" if args.cold_mb else "K/V warm (one copy)"
    print(f"{machine_description()}; kernel vectors of {lanes} floats; before = {args.before}; "
          f"best of {args.rounds} rounds; {warmth}")
    print_table(["dtype", "batch", "context", "before (us)", "after (us)", "before / after", "after GFLOP/s",
                 "after K+V GB/s", "max |after - before|"], rows)


if __name__ == "__main__":
    main()
