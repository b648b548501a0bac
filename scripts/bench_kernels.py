"""Benchmark the LoRA ops; prints tables (docs/BENCHMARKS.md, "Kernels", keeps the latest figures).

    python scripts/bench_kernels.py                # CUDA if present, else the CPU tables
    python scripts/bench_kernels.py --device cpu   # the engine's CPU workload

cuda: the issue's shapes (T in {1, 16, 64, 256, 1024}, H = O = 4096, rank 16 or a mix of 8..64,
4 to 128 distinct adapters): time, bandwidth achieved against the device's peak, speed-up against
the torch path and against the same kernels run at the padded maximum rank.
cpu: the engine's benchmark model (hidden 512, intermediate 1376, 8 layers, fp32, ranks 8 and 16
on all seven projections): per-call times against the obvious torch alternatives, the crossover
between the torch path's two routes, and whole steps of the model's projections with and without
LoRA.
"""

import argparse
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_serving import kernels  # noqa: E402
from lora_serving.kernels import torch_path  # noqa: E402


@dataclass
class Module:
    """One projection's LoRA slot buffers, one entry per output slice."""

    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    slot_ranks: list[torch.Tensor]

    def add(self, y, x, token_slots, meta, backend=None):
        kernels.add_lora_packed(
            y, x, self.lora_a, self.lora_b, token_slots, self.slot_ranks, meta, backend=backend
        )

    def padded(self) -> "Module":
        """The same weights with every slot computed at R_max (padding is zero, so same result)."""
        max_rank = self.lora_a[0].shape[1]
        return Module(self.lora_a, self.lora_b, [torch.full_like(r, max_rank) for r in self.slot_ranks])


def make_module(num_slots, max_rank, hidden, out_features, ranks, dtype, device) -> Module:
    lora_a, lora_b, slot_ranks = [], [], []
    for width in out_features:
        a, b = kernels.allocate_lora_buffers(num_slots, max_rank, hidden, width, dtype=dtype, device=device)
        for slot, rank in enumerate(ranks):
            a[slot, :rank] = torch.randn(rank, hidden, device=device, dtype=dtype) / hidden**0.5
            b[slot, :, :rank] = torch.randn(width, rank, device=device, dtype=dtype) / rank**0.5
        lora_a.append(a)
        lora_b.append(b)
        slot_ranks.append(torch.tensor(ranks, dtype=torch.int32, device=device))
    return Module(lora_a, lora_b, slot_ranks)


def decode_slots(tokens, num_adapters, rng) -> list[int]:
    """Each adapter used at least once (when tokens allow), the rest uniform, in random order."""
    slots = list(range(min(tokens, num_adapters)))
    slots += [rng.randrange(num_adapters) for _ in range(tokens - len(slots))]
    rng.shuffle(slots)
    return slots


def cpu_clock():
    """With one torch thread all the work runs on this thread, so its CPU time is the work's cost
    and ignores the time other processes hold the cores; with more threads, only wall time can tell."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def best_time(fn, device, repeats, calls) -> float:
    """Seconds per call: the best of `repeats` runs of `calls` calls (robust to a busy machine)."""
    fn()
    clock = cpu_clock()
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / calls)
        else:
            begin = clock()
            for _ in range(calls):
                fn()
            best = min(best, (clock() - begin) / calls)
    return best


# ---------------------------------------------------------------- the torch alternatives (CPU)


def slot_loop(y, x, module: Module, slots: list[int]):
    """One GEMM pair per active slot, gathered and scattered: the obvious torch code."""
    token_slots = torch.tensor(slots)
    offset = 0
    for lora_a, lora_b, slot_ranks in zip(module.lora_a, module.lora_b, module.slot_ranks):
        width = lora_b.shape[1]
        ranks = slot_ranks.tolist()
        for slot in sorted(set(slots) - {-1}):
            tokens = torch.nonzero(token_slots == slot).flatten()
            rank = ranks[slot]
            shrunk = x.index_select(0, tokens) @ lora_a[slot, :rank].T
            y[:, offset : offset + width].index_add_(0, tokens, shrunk @ lora_b[slot, :, :rank].T)
        offset += width


def gather_bmm(y, x, module: Module, token_slots: torch.Tensor):
    """Per-token weight copies [T, R, H] / [T, O, R] and two bmm's, padding masked: the punica-free way."""
    offset = 0
    for lora_a, lora_b, slot_ranks in zip(module.lora_a, module.lora_b, module.slot_ranks):
        width, max_rank = lora_b.shape[1], lora_a.shape[1]
        rank_mask = torch.arange(max_rank) < slot_ranks[token_slots][:, None]
        shrunk = torch.bmm(lora_a.index_select(0, token_slots), x[:, :, None]) * rank_mask[:, :, None]
        y[:, offset : offset + width] += torch.bmm(lora_b.index_select(0, token_slots), shrunk)[:, :, 0]
        offset += width


# ---------------------------------------------------------------- CPU tables

ENGINE_HIDDEN, ENGINE_INTERMEDIATE, ENGINE_LAYERS, ENGINE_KV = 512, 1376, 8, 256
ENGINE_SLOTS, ENGINE_MAX_RANK = 32, 16
ENGINE_RANKS = [8 if slot % 2 else 16 for slot in range(ENGINE_SLOTS)]
DECODE_BATCHES = [(8, 8), (16, 16), (32, 32), (64, 32), (64, 8)]  # (tokens, distinct adapters)


def engine_modules(device="cpu") -> dict[str, tuple[int, Module]]:
    """name -> (input features, module) for one layer of the engine's benchmark model."""
    h, i, kv = ENGINE_HIDDEN, ENGINE_INTERMEDIATE, ENGINE_KV

    def module(hidden, widths):
        return make_module(ENGINE_SLOTS, ENGINE_MAX_RANK, hidden, widths, ENGINE_RANKS, torch.float32, device)

    return {
        "qkv (3 slices)": (h, module(h, (h, kv, kv))),
        "o": (h, module(h, (h,))),
        "gate_up (2 slices)": (h, module(h, (i, i))),
        "down": (i, module(i, (h,))),
    }


@contextlib.contextmanager
def cpu_kernel(on: bool):
    """The torch path with its C kernel (lora_serving/kernels/cpu_native.py) on or off for decode-sized segments."""
    saved = os.environ.get("LORA_CPU_KERNEL")
    os.environ["LORA_CPU_KERNEL"] = "auto" if on else "off"
    torch_path._group_views.clear()  # the route is chosen when a module's buffers are first seen
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("LORA_CPU_KERNEL")
        else:
            os.environ["LORA_CPU_KERNEL"] = saved
        torch_path._group_views.clear()


def timed_with_kernel(on: bool, fn, repeats, calls) -> float:
    with cpu_kernel(on):
        return best_time(fn, "cpu", repeats, calls)


def cpu_call_table(repeats):
    rng = random.Random(0)
    print("\n### CPU: one call, engine shapes (fp32, slots of rank 8 and 16, R_max 16), microseconds")
    print("| module | T | adapters | ours | ours, embedding_bag route | slot loop | gather+bmm | ours at padded rank "
          "| vs embedding_bag | vs slot loop | vs gather+bmm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (hidden, module) in engine_modules().items():
        padded = module.padded()
        width = sum(b.shape[1] for b in module.lora_b)
        for tokens, adapters in DECODE_BATCHES:
            slots = decode_slots(tokens, adapters, rng)
            token_slots = torch.tensor(slots)
            x, y = torch.randn(tokens, hidden), torch.zeros(tokens, width)
            meta = kernels.LoraBatchMeta.build(token_slots, ENGINE_SLOTS)
            times = [
                timed_with_kernel(on, fn, repeats, calls=20)
                for on, fn in (
                    (True, lambda: module.add(y, x, token_slots, meta)),
                    (False, lambda: module.add(y, x, token_slots, meta)),
                    (True, lambda: slot_loop(y, x, module, slots)),
                    (True, lambda: gather_bmm(y, x, module, token_slots)),
                    (True, lambda: padded.add(y, x, token_slots, meta)),
                )
            ]
            ours = times[0]
            cells = " | ".join(f"{t * 1e6:.0f}" for t in times)
            print(f"| {name} | {tokens} | {adapters} | {cells} | {times[1] / ours:.1f}x | {times[2] / ours:.1f}x "
                  f"| {times[3] / ours:.1f}x |")


def cpu_route_table(repeats):
    print("\n### CPU: the torch path's routes for a segment of n tokens (4 slots, rank 16), microseconds")
    print("| H | n | tokens consecutive | C kernel | embedding_bag route | GEMM route |")
    print("|---|---|---|---|---|---|")
    saved = torch_path.GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE, torch_path.GEMM_MIN_TOKEN_FEATURES_GATHERED
    try:
        for hidden in (512, 1376):
            module = make_module(4, 16, hidden, (512,), [16] * 4, torch.float32, "cpu")
            for count in (4, 8, 16, 32):
                for consecutive in (True, False):
                    slots = torch.arange(4).repeat_interleave(count) if consecutive else torch.arange(4).repeat(count)
                    x, y = torch.randn(slots.numel(), hidden), torch.zeros(slots.numel(), 512)
                    times = []
                    # Everything to the C kernel, to the bags, then to GEMMs.
                    for threshold, kernel_on in ((10**9, True), (10**9, False), (1, True)):
                        torch_path.GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE = threshold
                        torch_path.GEMM_MIN_TOKEN_FEATURES_GATHERED = threshold
                        meta = kernels.LoraBatchMeta.build(slots, 4)
                        times.append(timed_with_kernel(kernel_on, lambda: module.add(y, x, slots, meta), repeats,
                                                       calls=20))
                    cells = " | ".join(f"{t * 1e6:.0f}" for t in times)
                    print(f"| {hidden} | {count} | {consecutive} | {cells} |")
    finally:
        torch_path.GEMM_MIN_TOKEN_FEATURES_CONSECUTIVE, torch_path.GEMM_MIN_TOKEN_FEATURES_GATHERED = saved


class ProjectionStack:
    """The engine model's projections, 8 layers (attention, norms and lm_head left out)."""

    def __init__(self):
        h, i, kv = ENGINE_HIDDEN, ENGINE_INTERMEDIATE, ENGINE_KV
        self.layers = []
        for _ in range(ENGINE_LAYERS):
            weights = {
                "qkv": torch.randn(h + 2 * kv, h) / h**0.5,
                "o": torch.randn(h, h) / h**0.5,
                "gate_up": torch.randn(2 * i, h) / h**0.5,
                "down": torch.randn(h, i) / i**0.5,
            }
            loras = {name.split(" ")[0]: module for name, (_, module) in engine_modules().items()}
            self.layers.append((weights, loras))

    def step(self, x, token_slots, with_lora):
        meta = kernels.LoraBatchMeta.build(token_slots, ENGINE_SLOTS) if with_lora else None
        h = ENGINE_HIDDEN
        for weights, loras in self.layers:
            qkv = F.linear(x, weights["qkv"])
            if with_lora:
                loras["qkv"].add(qkv, x, token_slots, meta)
            attention_out = qkv[:, :h]  # attention itself is not what is measured here
            o = F.linear(attention_out, weights["o"])
            if with_lora:
                loras["o"].add(o, attention_out, token_slots, meta)
            x = x + o
            gate_up = F.linear(x, weights["gate_up"])
            if with_lora:
                loras["gate_up"].add(gate_up, x, token_slots, meta)
            hidden = F.silu(gate_up[:, :ENGINE_INTERMEDIATE]) * gate_up[:, ENGINE_INTERMEDIATE:]
            down = F.linear(hidden, weights["down"])
            if with_lora:
                loras["down"].add(down, hidden, token_slots, meta)
            x = x + down
        return x


def cpu_step_table(repeats):
    rng = random.Random(1)
    stack = ProjectionStack()
    batches = [(f"decode T={t}, {a} adapters", decode_slots(t, a, rng)) for t, a in DECODE_BATCHES]
    batches += [
        ("prefill 256 tokens, 1 adapter", [3] * 256),
        ("prefill 4 x 128 tokens, 4 adapters", [s for s in range(4) for _ in range(128)]),
        ("prefill 200 + 32 decode, 16 adapters", [5] * 200 + decode_slots(32, 16, rng)),
    ]
    print("\n### CPU: one step of the engine model's projections (8 layers, 32 LoRA calls + 1 meta build)")
    print("| batch | base ms | with LoRA ms | throughput vs base | with LoRA, embedding_bag route ms | vs base |")
    print("|---|---|---|---|---|---|")
    for label, slots in batches:
        token_slots = torch.tensor(slots)
        x = torch.randn(len(slots), ENGINE_HIDDEN)
        base = best_time(lambda: stack.step(x, token_slots, False), "cpu", repeats, calls=2)
        lora = timed_with_kernel(True, lambda: stack.step(x, token_slots, True), repeats, calls=2)
        bags = timed_with_kernel(False, lambda: stack.step(x, token_slots, True), repeats, calls=2)
        print(f"| {label} | {base * 1e3:.1f} | {lora * 1e3:.1f} | {base / lora:.2f}x | {bags * 1e3:.1f} "
              f"| {base / bags:.2f}x |")


# ---------------------------------------------------------------- CUDA table

CUDA_TOKENS = (1, 16, 64, 256, 1024)
CUDA_ADAPTERS = (4, 32, 128)
CUDA_HIDDEN = 4096
CUDA_MAX_RANK = 64


def peak_bandwidth(device) -> float | None:
    """Bytes/s from the memory clock and bus width (torch >= 2.5 exposes both), else None."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate


def bytes_moved(token_slots: list[int], ranks: list[int], hidden, out, element_size) -> int:
    """The least traffic: x rows and y rows once (y read and written), each active slot's A and B at its rank."""
    active = set(token_slots) - {-1}
    weights = sum(ranks[slot] * (hidden + out) for slot in active)
    tokens = sum(slot >= 0 for slot in token_slots)
    return (weights + tokens * (hidden + 2 * out)) * element_size


def cuda_table(repeats, dtype):
    rng = random.Random(0)
    device = "cuda"
    peak = peak_bandwidth(torch.device(device))
    peak_text = f"{peak / 1e12:.2f} TB/s" if peak else "unknown"
    print(f"\n### CUDA: {torch.cuda.get_device_name()} (peak {peak_text}), H = O = {CUDA_HIDDEN}, {dtype}, R_max 64")
    print("| T | adapters | ranks | Triton us | GB/s | of peak | torch path us | vs torch | padded-rank us | vs padded |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rank_kind in ("16", "mixed 8..64"):
        max_adapters = max(CUDA_ADAPTERS)
        ranks = [16] * max_adapters if rank_kind == "16" else [rng.choice((8, 16, 32, 64)) for _ in range(max_adapters)]
        module = make_module(max_adapters, CUDA_MAX_RANK, CUDA_HIDDEN, (CUDA_HIDDEN,), ranks, dtype, device)
        padded = module.padded()
        for tokens in CUDA_TOKENS:
            for adapters in CUDA_ADAPTERS:
                if adapters > tokens and adapters != CUDA_ADAPTERS[0]:
                    continue  # no more distinct adapters than tokens
                slots = decode_slots(tokens, adapters, rng)
                token_slots = torch.tensor(slots, device=device)
                x = torch.randn(tokens, CUDA_HIDDEN, device=device, dtype=dtype)
                y = torch.zeros(tokens, CUDA_HIDDEN, device=device, dtype=dtype)
                meta = kernels.LoraBatchMeta.build(token_slots, max_adapters)
                triton_s = best_time(lambda: module.add(y, x, token_slots, meta), device, repeats, calls=50)
                torch_s = best_time(lambda: module.add(y, x, token_slots, meta, "torch"), device, repeats, calls=10)
                padded_s = best_time(lambda: padded.add(y, x, token_slots, meta), device, repeats, calls=50)
                moved = bytes_moved(slots, ranks, CUDA_HIDDEN, CUDA_HIDDEN, x.element_size())
                bandwidth = moved / triton_s
                of_peak = f"{bandwidth / peak:.0%}" if peak else "-"
                print(
                    f"| {tokens} | {min(adapters, tokens)} | {rank_kind} | {triton_s * 1e6:.1f} | {bandwidth / 1e9:.0f}"
                    f" | {of_peak} | {torch_s * 1e6:.1f} | {torch_s / triton_s:.1f}x | {padded_s * 1e6:.1f}"
                    f" | {padded_s / triton_s:.2f}x |"
                )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many timed runs per cell")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="CUDA tables only")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads; 1 gives steadier figures on a machine shared with others"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU is available on this machine")
    clock = "CUDA events" if device == "cuda" else cpu_clock().__name__
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {clock}, load average {os.getloadavg()[0]:.1f}")
    if device == "cuda":
        cuda_table(args.repeats, torch.bfloat16 if args.dtype == "bf16" else torch.float16)
        return
    if not torch.cuda.is_available():
        print("No GPU on this machine: the CUDA table (Triton kernels) is not measured; CPU tables follow.")
    torch.manual_seed(0)
    cpu_call_table(args.repeats)
    cpu_route_table(args.repeats)
    cpu_step_table(args.repeats)


if __name__ == "__main__":
    main()
