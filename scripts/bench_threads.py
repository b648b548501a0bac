"""How torch's OpenMP threads should wait, measured: the engine's throughput (base model and LoRA) under each
OpenMP wait setting, on a quiet machine and with another process keeping one core busy.

Each setting runs in a fresh process (OpenMP reads its environment when torch loads it). Settings: sleep at
once (OMP_WAIT_POLICY=PASSIVE, spin count 0), sleep after a short spin (PASSIVE with GOMP_SPINCOUNT =
3,000 / 10,000 / 30,000; the handler package's default is handler.GOMP_SPINCOUNT), and spin (ACTIVE). The
engine's thread count follows the machine (option.cpu_threads=auto) as it does by default. Workload:
benchlib's requests (--requests of them) on --model (benchlib's, or the real SmolLM2-135M-Instruct) in --dtype,
LoRA with 64 adapters drawn Zipf(1.0) as in bench_lora.py; each setting keeps the best of --repeats alternating
base/LoRA runs. --spins picks the settings: those spin counts (0: sleep at once) and, with "active", ACTIVE.

    .venv/bin/python scripts/bench_threads.py [--requests 32] [--repeats 2] [--model llama-50m|smollm2|DIR]
        [--dtype float32|bfloat16] [--spins 0 3000 10000 30000 active]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
DEFAULT_SPINS = ["0", "3000", "10000", "30000", "active"]
NUM_ADAPTERS = 64


def setting(spin: str) -> tuple[str, dict]:
    """A --spins entry's row name and environment."""
    if spin == "active":
        return "spin (ACTIVE)", {"OMP_WAIT_POLICY": "ACTIVE"}
    if spin == "0":
        return "sleep at once (PASSIVE)", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    return f"PASSIVE, spin {int(spin):,}", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": spin}


def measure(args) -> dict:
    """In the child process: best base and LoRA throughput."""
    sys.path.insert(0, str(SCRIPTS))
    from bench_lora import make_adapters, zipf_choices
    from benchlib import engine_throughput, named_model_dir, workload

    from lora_serving.handler import Engine

    model_dir = named_model_dir(args.model)
    requests, repeats = args.requests, args.repeats
    work = workload(requests)
    engine = Engine(model_dir, dtype=args.dtype, max_rolling_batch_size=32, enable_lora=True, max_loras=32,
                    max_cpu_loras=128, max_lora_rank=16)
    for index, path in enumerate(make_adapters(model_dir, NUM_ADAPTERS)):
        engine.register_adapter(f"a{index}", path, preload=False)
    adapters = [f"a{choice}" for choice in zipf_choices(len(work), NUM_ADAPTERS)]
    engine_throughput(engine, work, adapters)  # loads the adapters, warms up
    base = lora = 0.0
    for _ in range(repeats):
        base = max(base, engine_throughput(engine, work)[0])
        lora = max(lora, engine_throughput(engine, work, adapters)[0])
    return {"base": base, "lora": lora}


def run_setting(env: dict, args, busy: bool) -> dict:
    busy_process = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        completed = subprocess.run(
            [sys.executable, __file__, "--child", "--requests", str(args.requests), "--repeats", str(args.repeats),
             "--model", args.model, "--dtype", args.dtype],
            env={**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}, **env},
            capture_output=True, text=True, check=True)
    finally:
        if busy_process is not None:
            busy_process.kill()
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="llama-50m")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--spins", nargs="+", default=DEFAULT_SPINS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    sys.path.insert(0, str(SCRIPTS))
    from benchlib import machine_description, print_table

    rows = []
    for name, env in map(setting, args.spins):
        quiet, busy = run_setting(env, args, busy=False), run_setting(env, args, busy=True)
        print(f"{name}: quiet {quiet}, one core busy {busy}", flush=True)
        rows.append([name, quiet["base"], quiet["lora"], quiet["lora"] / quiet["base"], busy["base"], busy["lora"]])
    print(f"\n# bench_threads: {machine_description()}; {args.model} in {args.dtype}; {args.requests} requests, LoRA "
          f"over {NUM_ADAPTERS} adapters "
          f"(Zipf); best of {args.repeats} alternating runs per cell")
    print_table(["OpenMP waiting", "base tok/s", "LoRA tok/s", "LoRA / base", "base, 1 core busy",
                 "LoRA, 1 core busy"], rows)


if __name__ == "__main__":
    main()
