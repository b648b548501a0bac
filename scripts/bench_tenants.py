"""Thousands of tenants: adapters resolved from S3 on first use against every adapter registered and resident, and
a flood past job_queue_size.

`--adapters` distinct adapters (the demo's `es` adapter with each tenant's own seeded noise on its weights, so no
two share content) sit in S3 (moto's server on 127.0.0.1, found through AWS_ENDPOINT_URL_S3 as on AWS). Clients
stream LMI requests naming them with Zipf popularity (exponent `--zipf`), the same sequence for both sides:

- "resolved on first use": a fresh server (`python -m lora_serving`, its own empty cache) with
  option.adapter_resolver=s3://.../ and nothing registered; at most `--max-disk-loras` resolved adapters kept;
- "registered and resident": one server with every adapter registered beforehand through the management API
  (preload=true, option.max_cpu_loras = the adapter count: all in host memory).

Both sides have the same batch size, slots and host cache; the rounds alternate which side goes first. TTFT runs
from sending a request to its first token line. Then a flood: 10x the capacity (max_rolling_batch_size +
job_queue_size) of clients looping requests for `--flood-seconds` against the resolver server: latency of the
accepted requests, how many were refused and how fast, /ping meanwhile, the server's resident memory, and
recovery after.

    .venv/bin/python scripts/bench_tenants.py [--adapters 1000] [--requests 300] [--flood-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import httpx
import numpy as np
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_description, print_table, wait_until_serving  # noqa: E402

from lora_serving.container.adapter_layout import find_startup_adapters  # noqa: E402
from lora_serving.container.demo.build import ensure_demo_model  # noqa: E402
from lora_serving.handler.config import DEFAULT_CACHE_DIR  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "the red cat sees a small dog\n"
BUCKET = "bench-tenants"
TEMPLATE_ADAPTER = "es"


def make_tenants(template: Path, out_dir: Path, count: int) -> list[str]:
    """`count` adapters shaped like `template`, each with its own weights."""
    tensors = load_file(template / "adapter_model.safetensors")
    names = []
    for index in range(count):
        name = f"tenant-{index:04d}"
        generator = np.random.default_rng(index)
        target = out_dir / name
        target.mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", target)
        noisy = {key: value * (1 + 0.1 * _noise(generator, value.shape)) for key, value in tensors.items()}
        save_file({key: value.contiguous() for key, value in noisy.items()}, target / "adapter_model.safetensors")
        names.append(name)
    return names


def _noise(generator, shape):
    import torch

    return torch.from_numpy(generator.standard_normal(tuple(shape)).astype(np.float32))


def upload(endpoint: str, tenants_dir: Path, names: list[str]) -> None:
    client = boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench",
                                   region_name="us-east-1").client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    for name in names:
        for path in (tenants_dir / name).iterdir():
            client.upload_file(str(path), BUCKET, f"tenants/{name}/{path.name}")


class Server:
    """`python -m lora_serving` in a subprocess over a model directory holding only serving.properties."""

    def __init__(self, root: Path, model_id: Path, properties: dict[str, str], env: dict[str, str]) -> None:
        self.model_dir = root / "model"
        self.model_dir.mkdir(parents=True)
        properties = {"option.model_id": str(model_id), "option.cache_dir": str(root / "cache"), **properties}
        (self.model_dir / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in properties.items()))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "server.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lora_serving", "--model-dir", str(self.model_dir), "--host", "127.0.0.1",
             "--port", str(self.port)], env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until_serving(self.url, self.process, root / "server.log", seconds=300, poll_seconds=0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


async def stream_request(client: httpx.AsyncClient, adapter: str, max_new_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, tokens) of one streamed LMI request."""
    body = {"inputs": PROMPT, "adapters": adapter, "stream": True,
            "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}}
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", "/invocations", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{adapter}: {response.status_code} {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line:
                json.loads(line)["token"]
                first = first or time.perf_counter() - sent
                tokens += 1
    return first, tokens


async def traffic(url: str, adapters: list[str], concurrency: int, max_new_tokens: int) -> dict:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for adapter in adapters:
        queue.put_nowait(adapter)
    ttfts: list[float] = []
    total_tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal total_tokens
        while not queue.empty():
            ttft, tokens = await stream_request(client, queue.get_nowait(), max_new_tokens)
            ttfts.append(ttft)
            total_tokens += tokens

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"wall": wall, "tokens_per_s": total_tokens / wall, "requests_per_s": len(adapters) / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99)}


PROBE = """
import json, sys, time, httpx
url, seconds, body = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
pings, probes = [], []
with httpx.Client(base_url=url, timeout=600) as client:
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at:
        sent = time.perf_counter()
        healthy = client.get("/ping").status_code == 200
        pings.append(time.perf_counter() - sent if healthy else float("inf"))
        sent = time.perf_counter()
        status = client.post("/invocations", json=body).status_code
        probes.append((status, time.perf_counter() - sent))
        time.sleep(0.25)
print(json.dumps({"pings": pings, "probes": probes}))
"""


class RawConnection:
    """A bare keep-alive HTTP/1.1 connection: far lighter than an httpx client, so that one Python process on a
    small machine can keep 10x the server's capacity of requests coming."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: dict) -> tuple[int, str | None]:
        """The status and the Retry-After header of the answer, read whole."""
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers["content-length"]))
        return status, headers.get("retry-after")

    def close(self) -> None:
        self.writer.close()


async def flood(server: Server, adapters: list[str], clients: int, seconds: float, max_new_tokens: int,
                honour_retry_after: bool) -> dict:
    """Clients loop requests for `seconds`. /ping and a probe request are timed from another, quiet process, so
    that the load these clients put on this process's event loop does not count as the server's."""
    accepted: list[float] = []
    rejected: list[float] = []
    other: list[int] = []
    rss = [server.rss_mib()]
    stop_at = time.perf_counter() + seconds
    probe_body = {"inputs": PROMPT, "adapters": adapters[0],
                  "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}}
    watcher = subprocess.Popen([sys.executable, "-c", PROBE, server.url, str(seconds), json.dumps(probe_body)],
                               stdout=subprocess.PIPE)

    async def client_loop(index: int) -> None:
        position = index
        connection = None
        while time.perf_counter() < stop_at:
            body = {"inputs": PROMPT, "adapters": adapters[position % len(adapters)],
                    "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}}
            position += clients
            sent = time.perf_counter()
            try:
                connection = connection or await RawConnection.open(server.port)
                status, retry_after = await connection.post("/invocations", body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                other.append("transport error")
                connection = None
                continue
            elapsed = time.perf_counter() - sent
            if status == 200:
                accepted.append(elapsed)
            elif status == 503 and retry_after:
                rejected.append(elapsed)
                if honour_retry_after:
                    await asyncio.sleep(float(retry_after))
            else:
                other.append(status)
        if connection is not None:
            connection.close()

    async def watch_memory() -> None:
        while time.perf_counter() < stop_at:
            rss.append(server.rss_mib())
            await asyncio.sleep(0.5)

    await asyncio.gather(watch_memory(), *(client_loop(index) for index in range(clients)))
    after_rss = server.rss_mib()
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
        after = [await one_request(client, adapters[0], max_new_tokens) for _ in range(5)]
    probed = json.loads(watcher.communicate()[0])
    return {"accepted": accepted, "rejected": rejected, "other": other, "pings": probed["pings"],
            "probe_accepted": [seconds for status, seconds in probed["probes"] if status == 200],
            "probe_refused": [seconds for status, seconds in probed["probes"] if status == 503], "rss": rss,
            "after_rss": after_rss, "after": after}


async def one_request(client: httpx.AsyncClient, adapter: str, max_new_tokens: int) -> float:
    sent = time.perf_counter()
    answer = await client.post("/invocations", json={"inputs": PROMPT, "adapters": adapter, "parameters": {
        "max_new_tokens": max_new_tokens, "ignore_eos_token": True}})
    answer.raise_for_status()
    return time.perf_counter() - sent


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def zipf_sequence(names: list[str], count: int, exponent: float, seed: int = 0) -> list[str]:
    weights = 1.0 / np.arange(1, len(names) + 1) ** exponent
    picks = np.random.default_rng(seed).choice(len(names), size=count, p=weights / weights.sum())
    return [names[index] for index in picks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=300, help="per side and round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8, help="option.max_rolling_batch_size")
    parser.add_argument("--job-queue", type=int, default=8, help="job_queue_size")
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-disk-loras", type=int, default=256)
    parser.add_argument("--flood-seconds", type=float, default=60)
    args = parser.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every S3 call
    demo = ensure_demo_model(DEFAULT_CACHE_DIR)
    work = Path(tempfile.mkdtemp(prefix="bench-tenants-"))
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    endpoint = "http://{}:{}".format(*moto.get_host_and_port())
    servers: list[Server] = []
    try:
        started = time.perf_counter()
        # The demo ships its adapters as adapters.tar.gz: found (unpacked) as a server would find them.
        template = find_startup_adapters(demo, cache_dir=work / "demo-adapters")[TEMPLATE_ADAPTER]
        names = make_tenants(template, work / "tenants", args.adapters)
        upload(endpoint, work / "tenants", names)
        print(f"{len(names)} adapters made and put in S3 in {time.perf_counter() - started:.0f}s", flush=True)
        env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL_S3": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
        common = {"option.enable_lora": "true", "option.dtype": "fp32",
                  "option.max_rolling_batch_size": str(args.max_batch),
                  "job_queue_size": str(args.job_queue), "option.max_loras": str(args.max_loras),
                  "option.max_cpu_loras": str(args.adapters), "option.max_lora_rank": "16"}
        resolving = {**common, "option.adapter_resolver": f"s3://{BUCKET}/tenants/",
                     "option.max_disk_loras": str(args.max_disk_loras)}

        registered = Server(work / "registered", demo, {**common, "option.adapter_source_roots": str(work / "tenants")},
                            env)
        servers.append(registered)
        started = time.perf_counter()
        with httpx.Client(base_url=registered.url, timeout=120) as client:
            for name in names:
                client.post("/adapters", json={"name": name, "src": str(work / "tenants" / name),
                                               "preload": True}).raise_for_status()
        print(f"registered {len(names)} adapters in {time.perf_counter() - started:.0f}s; server RSS "
              f"{registered.rss_mib():.0f} MiB", flush=True)

        sequence = zipf_sequence(names, args.requests, args.zipf)
        asyncio.run(traffic(registered.url, sequence[: args.concurrency], args.concurrency, 4))  # warm-up
        results: dict[str, list[dict]] = {"resolved on first use": [], "registered and resident": []}
        resolver_rss = []
        for round_index in range(args.rounds):
            sides = ["resolved on first use", "registered and resident"]
            for side in sides if round_index % 2 == 0 else sides[::-1]:
                if side == "registered and resident":
                    results[side].append(asyncio.run(traffic(registered.url, sequence, args.concurrency,
                                                             args.max_new_tokens)))
                    continue
                fresh = Server(work / f"resolving-{round_index}", demo, resolving, env)
                try:
                    results[side].append(asyncio.run(traffic(fresh.url, sequence, args.concurrency,
                                                             args.max_new_tokens)))
                    resolver_rss.append(fresh.rss_mib())
                finally:
                    fresh.stop()
        print(f"\n{machine_description()}; {args.adapters} adapters, {args.requests} requests per side and round "
              f"({len(set(sequence))} distinct adapters, Zipf {args.zipf}), {args.concurrency} streaming clients, "
              f"{args.max_new_tokens} tokens each, {args.rounds} rounds (best of)")
        rows = []
        for side, runs in results.items():
            best = max(runs, key=lambda run: run["tokens_per_s"])
            rows.append([side, round(best["requests_per_s"], 2), round(best["tokens_per_s"], 1),
                         round(best["ttft_p50"] * 1000, 1), round(best["ttft_p99"] * 1000, 1)])
        print_table(["side", "requests/s", "tokens/s", "TTFT p50 ms", "TTFT p99 ms"], rows)
        print(f"resolver server RSS after its traffic: {', '.join(f'{rss:.0f}' for rss in resolver_rss)} MiB; "
              f"registered server: {registered.rss_mib():.0f} MiB")
        registered.stop()
        servers.remove(registered)

        capacity = args.max_batch + args.job_queue
        clients = 10 * capacity
        flooded = Server(work / "flooded", demo, resolving, env)
        servers.append(flooded)
        asyncio.run(traffic(flooded.url, sequence[:64], args.concurrency, 4))  # the popular adapters resolved
        before = asyncio.run(_sequential(flooded.url, sequence[0], args.max_new_tokens))
        for honour in (True, False):
            metrics_before = rejected_total(flooded.url)
            result = asyncio.run(flood(flooded, sequence, clients, args.flood_seconds, args.max_new_tokens, honour))
            print(f"\nflood: {clients} clients (10 x (max_rolling_batch_size {args.max_batch} + job_queue_size "
                  f"{args.job_queue})) looping non-streamed requests ({args.max_new_tokens} tokens, Zipf adapters) "
                  f"for {args.flood_seconds:.0f}s, "
                  f"{'waiting Retry-After after a 503' if honour else 'retrying at once'}"
                  f"; from another process every 0.25s, /ping and one probe request; RSS sampled every 0.5s")
            print_table(["", "count", "p50 ms", "p99 ms", "max ms"], [
                ["flood: accepted", len(result["accepted"])] + _ms(result["accepted"]),
                ["flood: refused (503 + Retry-After)", len(result["rejected"])] + _ms(result["rejected"]),
                ["probe: /ping", len(result["pings"])] + _ms(result["pings"]),
                ["probe: request accepted", len(result["probe_accepted"])] + _ms(result["probe_accepted"]),
                ["probe: request refused", len(result["probe_refused"])] + _ms(result["probe_refused"]),
                ["one request before the floods", len(before)] + _ms(before),
                ["one request after this flood", len(result["after"])] + _ms(result["after"]),
            ])
            print(f"other answers: {len(result['other'])} {sorted(set(result['other']))}; refused per /metrics: "
                  f"{rejected_total(flooded.url) - metrics_before:.0f}; server RSS before {result['rss'][0]:.0f} MiB, "
                  f"peak {max(result['rss']):.0f} MiB, after {result['after_rss']:.0f} MiB")
    finally:
        for server in servers:
            server.stop()
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


def rejected_total(url: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith("lora_serving_requests_rejected_total"))


async def _sequential(url: str, adapter: str, max_new_tokens: int) -> list[float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        return [await one_request(client, adapter, max_new_tokens) for _ in range(5)]


def _ms(values: list[float]) -> list:
    if not values:
        return ["-", "-", "-"]
    return [round(percentile(values, 50) * 1000, 1), round(percentile(values, 99) * 1000, 1),
            round(max(values) * 1000, 1)]


if __name__ == "__main__":
    main()
