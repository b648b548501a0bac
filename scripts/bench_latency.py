"""Time to first token and inter-token latency seen by streaming clients of a running server.

For each concurrency level, that many clients each stream `--requests` LMI requests one after another
(`"stream": true`, jsonlines parsed line by line) through POST /invocations, cycling over the base model
and the server's adapters so that batches mix adapters. Time to first token: from sending the request to
its first token line. Inter-token latency: between consecutive token lines of one request.

    scripts/serve &                          # the demo model and its adapters, on port 8080
    .venv/bin/python scripts/bench_latency.py [--url http://127.0.0.1:8080] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import print_table  # noqa: E402

PROMPTS = ("the red cat sees a small dog\n", "the old horse follows a happy boy today\n", "the bird reads a new book\n")


@dataclass
class Timings:
    first_token: list[float] = field(default_factory=list)
    between_tokens: list[float] = field(default_factory=list)
    tokens: int = 0


async def stream_one(client: httpx.AsyncClient, body: dict, timings: Timings) -> None:
    sent = time.perf_counter()
    previous = None
    async with client.stream("POST", "/invocations", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line:
                continue
            json.loads(line)["token"]  # every line carries a token; fail loudly if not
            now = time.perf_counter()
            if previous is None:
                timings.first_token.append(now - sent)
            else:
                timings.between_tokens.append(now - previous)
            previous = now
            timings.tokens += 1


async def run_level(url: str, clients: int, requests_per_client: int, adapters: list[str], max_new_tokens: int,
                    timings: Timings) -> float:
    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        for number in range(requests_per_client):
            turn = index * requests_per_client + number
            body = {"inputs": PROMPTS[turn % len(PROMPTS)], "stream": True, "adapters": adapters[turn % len(adapters)],
                    "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}}
            await stream_one(client, body, timings)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(index, client) for index in range(clients)))
        return time.perf_counter() - started


def percentile(values: list[float], fraction: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1] if len(values) > 1 \
        else values[0]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    adapters = [""] + [adapter["name"] for adapter in httpx.get(f"{args.url}/adapters", timeout=30).json()["adapters"]]
    warmup = Timings()
    asyncio.run(run_level(args.url, len(adapters), 1, adapters, 4, warmup))

    print(f"server {args.url}, adapters cycled: base + {', '.join(adapters[1:]) or 'none'}; "
          f"{args.max_new_tokens} tokens per request, {args.requests} requests per client")
    print(f"client machine: {os.cpu_count()} CPUs ({cpu_name()}), shared with the server\n")
    rows = []
    for clients in args.concurrency:
        timings = Timings()
        elapsed = asyncio.run(run_level(args.url, clients, args.requests, adapters, args.max_new_tokens, timings))
        ms = 1000.0
        rows.append([clients, clients * args.requests,
                     percentile(timings.first_token, 0.5) * ms, percentile(timings.first_token, 0.9) * ms,
                     percentile(timings.between_tokens, 0.5) * ms, percentile(timings.between_tokens, 0.9) * ms,
                     timings.tokens / elapsed])
    print_table(["clients", "requests", "TTFT p50 ms", "TTFT p90 ms", "ITL p50 ms", "ITL p90 ms", "tokens/s"], rows)


if __name__ == "__main__":
    main()
