"""The HTTP serving path against vLLM's OpenAI server, both driven by vLLM's own benchmark client.

    .venv/bin/python scripts/bench_serving.py [--adapters 16] [--num-prompts 64] [--rounds 1] [--sides ours,vllm]
        [--before DIR]   # DIR: `git archive <commit> lora_serving | tar -x -C DIR`: its server runs beside ours
        [--max-num-batched-tokens N]   # our servers' and the engine alone's step budget
        [--dtype float32|bfloat16]     # every side's (default float32)
        [--cpu-threads N]              # our servers' and the engine alone's (default auto)

Needs .venv-vllm (scripts/bench_vs_vllm.py --setup): vLLM's server and its client `vllm.benchmarks.serve`
(what `vllm bench serve` runs) come from there. Model: SmolLM2-135M-Instruct (tests/real_model.py builds it
offline, when its requirements are installed), else benchlib's 50M Llama, or `--model DIR`; `--dtype`. Workload:
vLLM's random dataset, `--num-prompts` prompts of `--input-len` tokens, `--output-len` tokens each (eos
ignored), all sent at once (`--max-concurrency` = prompts), streamed from /v1/completions with
`stream_options.include_usage`, as the client's default `openai` backend sends them; with adapters, each
request's `model` is one of `--adapters` PEFT adapters (ranks 8/16, all projections) drawn at random.

Phases: base (both servers without LoRA), then LoRA (both with it). In each phase both servers are up,
idle while the other runs; each round runs the client against one then the other, the side going first
alternating between rounds, and each side keeps its best round. In the base phase's rounds the engine alone
takes its turn too (this package's Engine, no HTTP, the servers idle): the same number of prompts of the
same lengths, all added at once, with its own TTFT (adding them to each one's first token). The serving
path's cost is the gap between it and our server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


SCRIPTS = Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS.parent
VLLM_VENV = REPO_ROOT / ".venv-vllm"
HIDE_DIR = VLLM_VENV / "hide-cuda-vision"
MAX_MODEL_LEN = 512
MAX_LORA_RANK = 16
STARTUP_SECONDS = 900
# vLLM's CPU KV cache, in GiB (its default, 4, is more than this workload needs).
VLLM_KV_CACHE_GIB = "1"
SERVED_NAME = "model"


def bench_model(args) -> Path:
    if args.model:
        return Path(args.model)
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from tests.real_model import TEST_CACHE_DIR, build_smollm2, missing_requirements
    except ImportError:
        missing_requirements = None
    if missing_requirements is not None and missing_requirements() is None:
        return build_smollm2(TEST_CACHE_DIR)
    sys.path.insert(0, str(SCRIPTS))
    from benchlib import bench_model_dir

    print("SmolLM2 cannot be built here: benchlib's model instead", flush=True)
    return bench_model_dir()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self._log = log.open("w")
        self.process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        sys.path.insert(0, str(SCRIPTS))
        from benchlib import wait_until_serving  # torch comes with it: only once a server is started

        # /v1/models: the route both servers answer once their model is loaded.
        wait_until_serving(self.url, self.process, Path(self._log.name), seconds=STARTUP_SECONDS, path="/v1/models",
                           poll_seconds=1, what=f"the {self.name} server")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


# --dtype as each side names it.
OPTION_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}


def our_server(model_dir: Path, adapter_dirs: list[Path], work: Path, batch: int, dtype: str,
               source: Path | None = None,
               name: str = "ours", options: dict | None = None) -> Server:
    """Our server; `source`: a checkout of another commit whose lora_serving it runs instead; `options`: Config
    fields it sets (as `option.<name>`)."""
    serving = work / f"{name}-{len(adapter_dirs)}" / SERVED_NAME
    serving.mkdir(parents=True)
    for path in model_dir.iterdir():
        (serving / path.name).symlink_to(path.resolve())
    properties = {"option.dtype": OPTION_DTYPES[dtype], "option.max_model_len": MAX_MODEL_LEN, "option.max_rolling_batch_size": batch,
                  "option.cpu_kv_cache_mb": 1024, **{f"option.{key}": value for key, value in (options or {}).items()}}
    if adapter_dirs:
        properties.update({"option.enable_lora": "true", "option.max_loras": len(adapter_dirs),
                           "option.max_lora_rank": MAX_LORA_RANK})
        (serving / "adapters").mkdir()
        for index, path in enumerate(adapter_dirs):
            (serving / "adapters" / f"a{index}").symlink_to(path.resolve())
    (serving / "serving.properties").write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source)} if source else dict(os.environ)
    return Server(name, [sys.executable, "-m", "lora_serving", "--model-dir", str(serving), "--host", "127.0.0.1",
                         "--port", str(port)], env, port, work / f"{name}-{len(adapter_dirs)}.log")


def vllm_server(model_dir: Path, adapter_dirs: list[Path], work: Path, batch: int, dtype: str) -> Server:
    port = free_port()
    command = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", str(batch), "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
               "--disable-log-stats"]
    if adapter_dirs:
        command += ["--enable-lora", "--max-loras", str(len(adapter_dirs)), "--max-lora-rank", str(MAX_LORA_RANK),
                    "--lora-modules", *[f"a{index}={path}" for index, path in enumerate(adapter_dirs)]]
    env = {**os.environ, "PYTHONPATH": str(HIDE_DIR), "VLLM_CPU_KVCACHE_SPACE": VLLM_KV_CACHE_GIB,
           "VLLM_LOGGING_LEVEL": "WARNING"}
    return Server("vLLM", command, env, port, work / f"vllm-{len(adapter_dirs)}.log")


def run_client(server: Server, model_dir: Path, args, adapters: int, work: Path, seed: int = 0) -> dict:
    """vLLM's benchmark client against `server`, in the vLLM venv; its result dict. Each round draws its own
    prompts (`seed`): a server's prefix cache would otherwise answer a later round's prompts from an earlier
    round's blocks."""
    result_file = work / f"result-{server.name}-{adapters}-{time.monotonic_ns()}.json"
    client_args = ["--backend", "openai", "--base-url", server.url, "--endpoint", "/v1/completions",
                   "--model", SERVED_NAME, "--tokenizer", str(model_dir), "--dataset-name", "random",
                   "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                   "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.num_prompts),
                   "--ignore-eos", "--seed", str(seed), "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el"]
    if adapters:
        client_args += ["--lora-modules", *[f"a{index}" for index in range(adapters)]]
    completed = subprocess.run([str(VLLM_VENV / "bin" / "python"), __file__, "--client", str(result_file), "--",
                                *client_args], env={**os.environ, "PYTHONPATH": str(HIDE_DIR)}, cwd=REPO_ROOT,
                               capture_output=True, text=True)
    if completed.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"vLLM's client failed against {server.name}:\n{completed.stdout[-3000:]}\n"
                           f"{completed.stderr[-3000:]}")
    return json.loads(result_file.read_text())


def client_main(result_file: str, client_args: list[str]) -> None:
    """Runs inside the vLLM venv: `vllm bench serve` by its module (the `vllm` command needs package
    metadata that the `vllm-cpu` distribution does not register under that name)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = main(parser.parse_args(client_args))
    Path(result_file).write_text(json.dumps({key: value for key, value in result.items()
                                             if isinstance(value, (int, float, str))}))


def engine_only(model_dir: Path, args, batch: int, source: Path | None = None) -> tuple[float, float]:
    """Output tokens per second of the engine alone on the same number and lengths of prompts (no HTTP), all
    added at once and stepped to the end, sampled at temperature 1 as both servers sample what the client sends
    (it names no temperature); and the median time from adding them to each one's first token."""
    code = f"""
import random, statistics, time
from lora_serving.handler import Engine, SamplingParams
engine = Engine({str(model_dir)!r}, dtype={args.dtype!r}, max_rolling_batch_size={batch}, max_model_len={MAX_MODEL_LEN},
                cpu_kv_cache_mb=1024, **{engine_options(args)!r})
rng = random.Random(0)
vocab = engine.tokenizer.vocab_size
prompts = [[rng.randrange(100, vocab) for _ in range({args.input_len})] for _ in range({args.num_prompts})]
def params(count):
    return [SamplingParams(max_new_tokens=count, ignore_eos=True, do_sample=True, temperature=1.0)
            for _ in prompts]
engine.generate(prompts[:2], params(4)[:2])
started = time.perf_counter()
for index, (prompt, sampling) in enumerate(zip(prompts, params({args.output_len}))):
    engine.add_request(str(index), prompt, sampling)
first_token, generated = {{}}, 0
while engine.has_unfinished_requests():
    for output in engine.step():
        generated += len(output.tokens)
        if output.tokens:
            first_token.setdefault(output.request_id, time.perf_counter() - started)
print(generated / (time.perf_counter() - started), statistics.median(first_token.values()))
"""
    env = {**os.environ, "PYTHONPATH": str(source)} if source else dict(os.environ)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=source or REPO_ROOT,
                               env=env, check=True)
    rate, ttft = completed.stdout.strip().splitlines()[-1].split()
    return float(rate), float(ttft)


def engine_options(args) -> dict:
    """The engine settings the command line changes from their defaults, for our server and the engine alone."""
    options = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    return options if args.cpu_threads is None else {**options, "cpu_threads": args.cpu_threads}


def compare(args) -> None:
    sys.path.insert(0, str(SCRIPTS))
    from bench_lora import make_adapters
    from benchlib import machine_description, print_table

    if not (VLLM_VENV / "bin" / "python").exists() and "vllm" in args.sides:
        sys.exit(f"{VLLM_VENV} is missing: run scripts/bench_vs_vllm.py --setup first")
    model_dir = bench_model(args)
    batch = args.num_prompts
    phases = {"base": []}
    if args.adapters:
        phases[f"LoRA, {args.adapters} adapters"] = make_adapters(model_dir, args.adapters)
    makers = {"ours": lambda *common: our_server(*common, options=engine_options(args)), "vllm": vllm_server}
    if args.before:
        makers["before"] = lambda *common: our_server(*common, source=Path(args.before).resolve(), name="before",
                                                      options=engine_options(args))
        args.sides = ["before", *args.sides]
    rows, engine_rates, engine_ttfts = [], {}, {}
    engine_sides = [side for side in args.sides if side != "vllm"]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        work = Path(scratch)
        for label, adapter_dirs in phases.items():
            servers = {side: makers[side](model_dir, adapter_dirs, work, batch, args.dtype) for side in args.sides}
            # In the base phase the engine alone takes its turn in each round beside the servers (they idle
            # meanwhile), so that the server / engine ratio compares runs made under the same load.
            runs = [*servers, *(f"engine:{side}" for side in engine_sides if label == "base")]
            best: dict[str, dict] = {}
            try:
                for server in servers.values():
                    server.wait_ready()
                for round_index in range(args.rounds):
                    for run in runs if round_index % 2 == 0 else list(reversed(runs)):
                        if run.startswith("engine:"):
                            side = run.split(":")[1]
                            source = Path(args.before).resolve() if side == "before" else None
                            rate, ttft = engine_only(model_dir, args, batch, source)
                            print(f"round {round_index + 1} engine alone ({side}): {rate:.0f} tok/s, TTFT p50 "
                                  f"{ttft:.2f} s", flush=True)
                            if rate > engine_rates.get(side, 0):
                                engine_rates[side], engine_ttfts[side] = rate, ttft
                            continue
                        result = run_client(servers[run], model_dir, args, len(adapter_dirs), work, seed=round_index)
                        print(f"round {round_index + 1} {run} {label}: {result['output_throughput']:.0f} tok/s, "
                              f"TTFT p50 {result['median_ttft_ms'] / 1e3:.2f} s", flush=True)
                        if run not in best or result["output_throughput"] > best[run]["output_throughput"]:
                            best[run] = result
            finally:
                for server in servers.values():
                    server.stop()
            for side, result in best.items():
                rows.append([label, side, f"{result['output_throughput']:.0f}",
                             f"{result['median_ttft_ms'] / 1e3:.2f}", f"{result['median_tpot_ms']:.0f}",
                             f"{result['completed']}/{args.num_prompts}",
                             f"{result['output_throughput'] / engine_rates[side]:.2f}"
                             if side in engine_rates and label == "base" else ""])
    print(f"\n# bench_serving: {machine_description()}; {model_dir.name}, {args.dtype}; {args.num_prompts} prompts of "
          f"{args.input_len} random tokens, {args.output_len} out, all at once; vLLM's client, /v1/completions "
          f"streamed; best of {args.rounds} round(s); engine alone (same prompts, sampled, no HTTP): "
          + ", ".join(f"{side} {rate:.0f} tok/s, TTFT p50 {engine_ttfts[side]:.2f} s"
                      for side, rate in engine_rates.items())
          + (f"; max_num_batched_tokens {args.max_num_batched_tokens}" if args.max_num_batched_tokens else ""))
    print_table(["workload", "server", "output tok/s", "TTFT p50 s", "TPOT p50 ms", "completed",
                 "server / engine alone"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model directory (default: SmolLM2-135M-Instruct, else benchlib's)")
    parser.add_argument("--adapters", type=int, default=16, help="0: the base phase only")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-num-batched-tokens", type=int,
                        help="our server's and the engine alone's step budget (default: the Config's)")
    parser.add_argument("--cpu-threads", help="our servers' and the engine alone's cpu_threads (default: auto)")
    parser.add_argument("--dtype", choices=sorted(OPTION_DTYPES), default="float32", help="every side's dtype")
    parser.add_argument("--sides", type=lambda text: text.split(","), default=["ours", "vllm"])
    parser.add_argument("--before", help="lora_serving of an earlier commit under DIR: its server (and engine) run "
                        "as a third side, before")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.client:
        client_main(args.client, rest[1:] if rest[:1] == ["--"] else rest)
    else:
        compare(args)


if __name__ == "__main__":
    main()
