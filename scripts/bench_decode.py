"""What the CPU decode kernels buy in the engine: the C attention kernel (lora_serving/kernels/cpu_attention.py)
and the C matrix-vector kernel for one to four rows (lora_serving/kernels/cpu_matvec.py), each switched off in turn,
in one run.

bench_engine's model and workload: throughput over 64 requests at batch size 32 (prompt and output lengths
16..128), and the decode step at batch 1 (a prompt of 124 tokens, 64 new ones). The variants run in rounds,
the order rotating each round; each keeps its best. Ratios are against "both kernels" in the same run.

    .venv/bin/python scripts/bench_decode.py [--rounds 3] [--prefix-caching]

The prefix cache is off unless asked for: the workload repeats, so with it every prompt from the second run on
starts with cached blocks and its block table is in two runs, which torch's attention forms gather at every
step and the kernel reads in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    bench_model_dir,
    engine_decode_step_seconds,
    engine_throughput,
    machine_description,
    measure_memory_bandwidth,
    model_weight_bytes,
    print_table,
    workload,
)

from lora_serving.handler import Engine, SamplingParams  # noqa: E402

VARIANTS = {  # name -> (attention kernel, matvec kernel)
    "both kernels": (True, True),
    "no attention kernel": (False, True),
    "no matvec kernel": (True, False),
    "neither (torch, oneDNN)": (False, False),
}


class KernelSwitches:
    """Turns the engine's two CPU decode kernels on and off between runs."""

    def __init__(self, engine: Engine) -> None:
        self.runner = engine.runner
        model = engine.model
        self.projections = [p for layer in model.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.projections.append(model.lm_head)
        self.matvecs = [p._matvec for p in self.projections]
        if self.runner.decode_form != "kernel" or not all(self.matvecs):
            sys.exit("the C kernels do not serve this engine here (no compiler, no oneDNN, or not fp32 on CPU)")

    def set(self, attention: bool, matvec: bool) -> None:
        self.runner.decode_form = "kernel" if attention else "auto"
        for projection, kernel in zip(self.projections, self.matvecs):
            projection._matvec = kernel if matvec else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefix-caching", action="store_true", help="the engine's default; off unless given")
    args = parser.parse_args()

    model_dir = bench_model_dir()
    requests = workload(64)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=32, enable_prefix_caching=args.prefix_caching)
    switches = KernelSwitches(engine)
    engine.generate([requests[0].prompt_ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
    probe = requests[0].prompt_ids

    throughput = {name: 0.0 for name in VARIANTS}
    step = {name: float("inf") for name in VARIANTS}
    names = list(VARIANTS)
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            switches.set(*VARIANTS[name])
            throughput[name] = max(throughput[name], engine_throughput(engine, requests)[0])
            step[name] = min(step[name], engine_decode_step_seconds(engine, probe, 64, f"probe-{round_index}-{name}"))
    switches.set(True, True)
    floor = model_weight_bytes(model_dir) / measure_memory_bandwidth()

    base = "both kernels"
    print(f"# bench_decode: {machine_description()}; model {model_dir.name}; prefix cache "
          f"{'on' if args.prefix_caching else 'off'}; best of {args.rounds} rotating rounds; "
          f"batch-1 floor {floor * 1e3:.2f} ms (weights / copy bandwidth)")
    print_table(
        ["variant", "tok/s at batch 32", "vs both kernels", "batch-1 step (ms)", "vs both kernels", "vs floor"],
        [[name, throughput[name], throughput[name] / throughput[base], step[name] * 1e3,
          step[name] / step[base], step[name] / floor] for name in names],
    )


if __name__ == "__main__":
    main()
