"""Soak test: N concurrent clients against one server for a bounded time, then the checks that say nothing was
lost, leaked or broken.

The clients mix every way of asking (scripts/soak_traffic.py): LMI /invocations whole, batched (a list of
inputs, one adapter each), with the adapter header, streamed as jsonlines and as SSE; OpenAI completions and
streamed chat; TGI generate and generate_stream; sampled requests; clients that leave mid-stream or before a
whole answer; invalid requests. Greedy answers must equal transformers + PEFT's, token for token.

With `--churn-every S`, adapter names are registered, updated to other files and unregistered every S
seconds while the clients also send requests naming them (scripts/soak_churn.py): each answer must be
the one of the version registered when the server accepted the request.

Then it checks: every valid request got a whole answer equal to the reference where greedy; no 5xx (seen
by the clients or counted by the server); at the end the server holds no request, KV block or adapter slot;
the server's RSS after warm-up grew by no more than the allowed bound. It prints a table and exits 1 when a
check fails.

    .venv/bin/python scripts/soak.py --clients 32 --duration 600        # the demo model, built once
    .venv/bin/python scripts/soak.py --clients 32 --duration 600 --churn-every 3
    .venv/bin/python scripts/soak.py --model-dir ./model --clients 8 --duration 30
    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8080 --pid 1234 --model-dir ./model
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latency import cpu_name, percentile  # noqa: E402
from benchlib import print_table, wait_until_serving  # noqa: E402
from soak_churn import Churn, build_churn, change, churn_kinds, churn_loop, churn_prompts  # noqa: E402
from soak_reference import chat_prompt, greedy_references  # noqa: E402
from soak_traffic import REQUEST_TIMEOUT_SECONDS, Case, Outcome, Traffic, one_request, request_deck  # noqa: E402

from lora_serving.container.demo.examples import DEMO_MAX_NEW_TOKENS, DEMO_SENTENCES  # noqa: E402
from lora_serving.container.demo.prompts import plain_prompt  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_SECONDS = 600
IDLE_WAIT_SECONDS = 60
RSS_SAMPLE_SECONDS = 1.0


@dataclass
class Run:
    outcomes: dict[str, list[Outcome]] = field(default_factory=lambda: defaultdict(list))
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)


# ---- the server -------------------------------------------------------------------------------------------

def start_server(model_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    log = log_path.open("w")
    return subprocess.Popen([sys.executable, "-m", "lora_serving", "--model-dir", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def sample_rss(pid: int, run: Run, started: float, stop: threading.Event) -> None:
    while not stop.wait(RSS_SAMPLE_SECONDS):
        run.rss_samples.append((time.monotonic() - started, rss_bytes(pid)))


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def wait_until_idle(url: str) -> dict[tuple[str, tuple], float]:
    """The metrics once the server holds no request (or after IDLE_WAIT_SECONDS, whatever they say)."""
    deadline = time.monotonic() + IDLE_WAIT_SECONDS
    while True:
        samples = scrape(url)
        busy = samples[("lora_serving_running_sequences", ())] + samples[("lora_serving_queue_depth", ())]
        if busy == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


# ---- references and load ----------------------------------------------------------------------------------

def greedy_cases(url: str, model_dir: Path, max_new_tokens: int) -> tuple[list[Case], list[Case], str, dict[str, Path]]:
    """Every (prompt, adapter) with its reference answer, plain and chat; the base model's OpenAI name; the
    adapters' directories."""
    adapters = httpx.get(f"{url}/adapters", params={"limit": 1000}, timeout=30).json()["adapters"]
    adapter_dirs = {adapter["name"]: Path(adapter["src"]) for adapter in adapters if Path(adapter["src"]).is_dir()}
    prompts = [plain_prompt(sentence) for sentence in DEMO_SENTENCES]
    references = greedy_references(model_dir, adapter_dirs, prompts, max_new_tokens)
    cases = [Case(prompt, adapter, expected) for (prompt, adapter), expected in references.items()]
    chat_cases = []
    chat_prompts = {sentence: chat_prompt(model_dir, sentence) for sentence in DEMO_SENTENCES}
    if all(chat_prompts.values()):
        chat_references = greedy_references(model_dir, adapter_dirs, list(chat_prompts.values()), max_new_tokens)
        chat_cases = [Case(sentence, adapter, chat_references[chat_prompts[sentence], adapter])
                      for sentence in DEMO_SENTENCES for adapter in ["", *adapter_dirs]]
    base_model_name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    return cases, chat_cases, base_model_name, adapter_dirs


async def drive(url: str, clients: int, duration: float, traffic_args: dict, seed: int, run: Run,
                churn: Churn | None, churn_every: float) -> None:
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_SECONDS, limits=limits) as client:
        traffic = Traffic(client=client, **traffic_args)
        deck = request_deck(with_chat=bool(traffic.chat_cases), extra=churn_kinds(churn) if churn else [])
        deadline = time.monotonic() + duration
        churning = []
        if churn is not None:
            churn_rng = random.Random(seed)
            for name in churn.names:  # each starts registered
                await change(client, churn, name, churn_rng, run.outcomes)
            churning.append(churn_loop(client, churn, churn_every, deadline, churn_rng, run.outcomes))

        async def client_loop(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline:
                dealt = list(deck)
                rng.shuffle(dealt)
                for name, kind in dealt:
                    if time.monotonic() >= deadline:
                        return
                    run.outcomes[name].append(await one_request(traffic, kind, rng))

        await asyncio.gather(*(client_loop(index) for index in range(clients)), *churning)


# ---- report -----------------------------------------------------------------------------------------------

def report_requests(run: Run) -> list[str]:
    """The table of requests by kind; the failed requests (a few of each kind)."""
    failures, rows, latencies = [], [], []
    for name in sorted(run.outcomes):
        outcomes = run.outcomes[name]
        failed = [outcome for outcome in outcomes if not outcome.ok]
        timed = [outcome.seconds * 1000 for outcome in outcomes if outcome.ok and outcome.counts_latency]
        latencies += timed
        rows.append([name, len(outcomes), len(failed), sum(1 for outcome in outcomes if (outcome.status or 0) >= 500),
                     *_p50_p99(timed)])
        failures += [f"{name}: {outcome.problem}" for outcome in failed[:3]]
        if len(failed) > 3:
            failures.append(f"{name}: ... {len(failed) - 3} more")
    rows.append(["all", sum(row[1] for row in rows), sum(row[2] for row in rows), sum(row[3] for row in rows),
                 *_p50_p99(latencies)])
    print_table(["kind", "requests", "failed", "5xx", "p50 ms", "p99 ms"], rows)
    return failures


def _p50_p99(milliseconds: list[float]) -> list:
    return [percentile(milliseconds, 0.5), percentile(milliseconds, 0.99)] if milliseconds else ["-", "-"]


def report_server(before: dict, final: dict) -> list[str]:
    """What the server counted during the run (`final` less `before`) and holds at the end; what is wrong."""
    served_5xx = {f"{dict(labels)['route']} {dict(labels)['status']}": value - before.get((name, labels), 0)
                  for (name, labels), value in final.items()
                  if name == "lora_serving_requests_total" and dict(labels)["status"].startswith("5")
                  and value > before.get((name, labels), 0)}
    held = {"running sequences": final[("lora_serving_running_sequences", ())],
            "queued requests": final[("lora_serving_queue_depth", ())],
            "KV blocks in use": round(final[("lora_serving_kv_cache_usage_ratio", ())]
                                      * final[("lora_serving_kv_cache_blocks", ())]),
            "busy adapter slots": final.get(("lora_serving_adapter_slots_busy", ()), 0)}
    counted = {what: final[(name, ())] - before[(name, ())] for name, what in (
        ("lora_serving_preemptions_total", "preemptions"), ("lora_serving_generated_tokens_total", "tokens generated"),
        ("lora_serving_prefix_cache_hits_total", "prompt tokens from the prefix cache"),
        ("lora_serving_chunked_prefill_steps_total", "chunked prefill steps"))}
    print(f"\nserver: {sum(served_5xx.values()):.0f} answers 5xx; at the end "
          + ", ".join(f"{value:.0f} {what}" for what, value in held.items()) + "; during the run "
          + ", ".join(f"{value:.0f} {what}" for what, value in counted.items()))
    failures = [f"the server answered 5xx: {served_5xx}"] if served_5xx else []
    return failures + [f"{value:.0f} {what} at the end" for what, value in held.items() if value]


def check_rss(samples: list[tuple[float, int]], warmup: float, limit_mb: float, limit_percent: float) -> list[str]:
    after_warmup = [rss for seconds, rss in samples if seconds >= warmup]
    if len(after_warmup) < 2:
        return ["too few RSS samples after warm-up: run longer than --warmup"]
    start, end, peak = after_warmup[0], after_warmup[-1], max(after_warmup)
    allowed = max(limit_mb * 2**20, start * limit_percent / 100)
    mb = 2**20
    print(f"server RSS: {start / mb:.0f} MB after warm-up ({warmup:.0f} s), {end / mb:.0f} MB at the end "
          f"({(end - start) / mb:+.1f} MB, {100 * (end - start) / start:+.1f}%), peak {peak / mb:.0f} MB; "
          f"allowed growth {allowed / mb:.0f} MB")
    return [f"server RSS grew by {(end - start) / mb:.1f} MB after warm-up, over {allowed / mb:.0f} MB"] \
        if end - start > allowed else []


# ---- main -------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="the model directory (default: the demo model, built once)")
    parser.add_argument("--url", help="a running server on this machine to attach to (needs --model-dir, --pid)")
    parser.add_argument("--pid", type=int, help="the attached server's process id, for its RSS")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--warmup", type=float, help="seconds before the RSS baseline (default: a fifth, at most 60)")
    parser.add_argument("--max-new-tokens", type=int, default=DEMO_MAX_NEW_TOKENS, help="of greedy requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--churn-every", type=float, default=0,
                        help="seconds between adapter registrations / updates / unregistrations (0: none)")
    parser.add_argument("--churn-names", type=int, default=3, help="adapter names churned")
    parser.add_argument("--rss-limit-mb", type=float, default=50, help="allowed RSS growth after warm-up ...")
    parser.add_argument("--rss-limit-percent", type=float, default=10, help="... or this share, if larger")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("OPTION_CACHE_DIR",
                                                                              Path.home() / ".cache" / "lora-serving")))
    args = parser.parse_args()
    if args.url and not (args.model_dir and args.pid):
        parser.error("--url needs --model-dir (for the reference answers) and --pid (for the RSS)")
    cmdline = Path(f"/proc/{args.pid}/cmdline")
    if args.pid and not (cmdline.exists() and b"lora_serving" in cmdline.read_bytes()):
        parser.error(f"process {args.pid} is not `python -m lora_serving`: give the server's own process id")
    return args


def main() -> int:
    args = parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 5)
    model_dir = args.model_dir
    if model_dir is None:
        from lora_serving.container.demo.build import ensure_demo_model

        model_dir = ensure_demo_model(args.cache_dir)
    process = log_path = None
    url, pid = args.url, args.pid
    if url is None:
        log_path = Path(os.environ.get("SOAK_SERVER_LOG", "/tmp/soak-server.log"))
        port = free_port()
        process = start_server(model_dir, port, log_path)
        url, pid = f"http://127.0.0.1:{port}", process.pid
    try:
        wait_until_serving(url, process, log_path, seconds=SERVER_START_SECONDS)
        cases, chat_cases, base_model_name, adapter_dirs = greedy_cases(url, model_dir, args.max_new_tokens)
        churn = None
        if args.churn_every:
            if len(adapter_dirs) < 2:
                sys.exit("--churn-every needs at least two adapters with local directories to churn between")
            prompts = churn_prompts(list(DEMO_SENTENCES))
            churn = build_churn(greedy_references(model_dir, adapter_dirs, prompts, args.max_new_tokens),
                                {name: str(path) for name, path in adapter_dirs.items()}, args.churn_names)
        print(f"soak: {args.clients} clients for {args.duration:.0f} s against {url} ({model_dir}); "
              f"{len(cases)} greedy cases, {len(chat_cases)} chat cases"
              + (f"; {args.churn_names} adapter names churned every {args.churn_every:g} s" if churn else "")
              + f"; {datetime.datetime.now().isoformat(timespec='seconds')}")
        print(f"machine: {os.cpu_count()} CPUs ({cpu_name()}), shared by the server and the clients\n")
        before = scrape(url)
        run = Run()
        stop = threading.Event()
        started = time.monotonic()
        sampler = threading.Thread(target=sample_rss, args=(pid, run, started, stop), daemon=True)
        sampler.start()
        traffic_args = dict(cases=cases, chat_cases=chat_cases, base_model_name=base_model_name,
                            max_new_tokens=args.max_new_tokens)
        asyncio.run(drive(url, args.clients, args.duration, traffic_args, args.seed, run, churn, args.churn_every))
        final = wait_until_idle(url)
        run.rss_samples.append((time.monotonic() - started, rss_bytes(pid)))
        stop.set()
        failures = (report_requests(run) + report_server(before, final)
                    + check_rss(run.rss_samples, warmup, args.rss_limit_mb, args.rss_limit_percent))
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    print("\nPASS" if not failures else "\nFAIL:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
