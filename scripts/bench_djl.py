"""What serving through DJL costs: one streaming workload through `python -m lora_serving` and through DJL
Serving's real Python worker (djl_python_engine.py from ../shared/third_party/djl-serving) running
lora_serving.handler.model in rolling-batch and in async mode.

The worker is driven by the tests' DJL front end (tests/djl/front_end.py), which follows DJL's Java classes
(RollingBatch.java, AsyncRequestManager.java) over the worker's unix socket; the Java process itself is not
part of the measurement. All three servers run at once, idle while another is measured; rounds alternate
between them and each keeps its best round. Model: benchlib's 50M Llama, fp32, with 4 adapters of ranks
8/16 on all projections; requests cycle over the base model and the adapters; `--clients` clients each
stream requests one after another (prompts 16..128 tokens, outputs 16..128 tokens, eos ignored).

    .venv/bin/python scripts/bench_djl.py [--clients 16] [--requests 64] [--rounds 2] [--async-cpu-threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lora import make_adapters  # noqa: E402
from benchlib import REPO_ROOT, bench_model_dir, machine_description, print_table, workload  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from tests.djl.front_end import ClientRequest, DjlFrontEnd  # noqa: E402
from tests.djl.worker import djl_serving_dir  # noqa: E402

NUM_ADAPTERS = 4
OPTIONS = {"entryPoint": "lora_serving.handler.model", "dtype": "fp32", "enable_lora": "true",
           "max_loras": str(NUM_ADAPTERS), "max_cpu_loras": str(NUM_ADAPTERS), "max_lora_rank": "16",
           "max_model_len": "512", "cpu_kv_cache_mb": "512", "max_rolling_batch_size": "32"}
MODES = {"djl rolling batch": {"rolling_batch": "auto"},
         "djl async": {"rolling_batch": "disable", "async_mode": "true"}}


def model_directory(root: Path, base: Path, adapters: list[Path], options: dict[str, str]) -> Path:
    """An LMI model directory: links to the base model's files, serving.properties, adapters/<name>."""
    root.mkdir(parents=True)
    for path in base.iterdir():
        (root / path.name).symlink_to(path)
    (root / "serving.properties").write_text("".join(f"option.{key}={value}\n" for key, value in options.items()))
    (root / "adapters").mkdir()
    for index, adapter in enumerate(adapters):
        (root / "adapters" / f"tenant-{index}").symlink_to(adapter)
    return root


class Timings:
    def __init__(self) -> None:
        self.first_token: list[float] = []
        self.tokens = 0
        self._lock = threading.Lock()

    def add(self, first_token: float, tokens: int) -> None:
        with self._lock:
            self.first_token.append(first_token)
            self.tokens += tokens


def run_workload(send_one, bodies: list[dict], clients: int) -> tuple[float, Timings]:
    """`send_one(body) -> (seconds to the first token, tokens)`, from `clients` threads; (tokens/s, timings)."""
    timings = Timings()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for first_token, tokens in pool.map(send_one, bodies):
            timings.add(first_token, tokens)
    return timings.tokens / (time.perf_counter() - started), timings


def container_sender(url: str):
    client = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64))

    def send(body: dict) -> tuple[float, int]:
        sent = time.perf_counter()
        first, tokens = None, 0
        with client.stream("POST", "/invocations", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line:
                    json.loads(line)["token"]
                    first = first or time.perf_counter() - sent
                    tokens += 1
        return first, tokens

    return send


def worker_sender(front_end: DjlFrontEnd):
    def send(body: dict) -> tuple[float, int]:
        sent = time.monotonic()
        response = front_end.submit(ClientRequest.json(body)).wait(600)
        assert response.code == 200, response.body[:300]
        return response.first_chunk_at - sent, len(response.json_lines())

    return send


def start_container(model_dir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "lora_serving", "--model-dir", str(model_dir), "--host",
                                "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError("python -m lora_serving exited")
        time.sleep(0.5)
    raise TimeoutError("python -m lora_serving did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--async-cpu-threads", nargs="*", default=[], metavar="N",
                        help="also run async workers with these option.cpu_threads values (auto or a number)")
    args = parser.parse_args()
    djl_dir = djl_serving_dir()
    if djl_dir is None:
        sys.exit("DJL's Python worker was not found (../shared/third_party/djl-serving or DJL_SERVING_DIR)")

    base = bench_model_dir()
    adapters = make_adapters(base, NUM_ADAPTERS)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    names = [""] + [f"tenant-{index}" for index in range(NUM_ADAPTERS)]
    bodies = [{"inputs": tokenizer.decode(request.prompt_ids), "adapters": names[index % len(names)], "stream": True,
               "parameters": {"max_new_tokens": request.max_new_tokens, "ignore_eos_token": True}}
              for index, request in enumerate(workload(args.requests))]
    warmup = [{**body, "parameters": {"max_new_tokens": 4, "ignore_eos_token": True}} for body in bodies[:8]]

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env_policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE (the handler package's default)")
        container = start_container(model_directory(scratch / "container", base, adapters, OPTIONS), args.port)
        front_ends = {}
        try:
            senders = {"python -m lora_serving": container_sender(f"http://127.0.0.1:{args.port}")}
            modes = {**MODES, **{f"djl async, cpu_threads={threads}": {**MODES["djl async"], "cpu_threads": threads}
                                 for threads in args.async_cpu_threads}}
            for name, mode in modes.items():
                model_dir = model_directory(scratch / name.replace(" ", "-"), base, adapters, {**OPTIONS, **mode})
                sock_dir = scratch / f"{name.replace(' ', '-')}-socket"
                sock_dir.mkdir()
                front_ends[name] = DjlFrontEnd(djl_dir, model_dir, sock_dir)
                front_ends[name].start()
                senders[name] = worker_sender(front_ends[name])
            for send in senders.values():
                run_workload(send, warmup, args.clients)
            best: dict[str, tuple[float, Timings]] = {}
            for round_index in range(args.rounds):
                for name, send in senders.items():
                    result = run_workload(send, bodies, args.clients)
                    print(f"round {round_index + 1} {name}: {result[0]:.0f} tokens/s", flush=True)
                    if name not in best or result[0] > best[name][0]:
                        best[name] = result
        finally:
            for front_end in front_ends.values():
                front_end.stop()
            container.terminate()
            container.wait(30)

    print(f"\n{machine_description()}; OMP_WAIT_POLICY of the DJL workers: {env_policy}")
    print(f"{args.requests} streamed requests, {args.clients} clients, base + {NUM_ADAPTERS} adapters; "
          f"best of {args.rounds} alternating rounds\n")
    reference = best["python -m lora_serving"][0]
    rows = []
    for name, (tokens_per_second, timings) in best.items():
        quantiles = statistics.quantiles(timings.first_token, n=10)
        rows.append([name, tokens_per_second, tokens_per_second / reference,
                     statistics.median(timings.first_token) * 1000, quantiles[8] * 1000])
    print_table(["path", "tokens/s", "vs container", "TTFT p50 ms", "TTFT p90 ms"], rows)


if __name__ == "__main__":
    main()
