"""Shared by the benchmark scripts: the benchmark model, the workload, the machine's memory bandwidth, waiting
for a server the script started."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import httpx
import torch

from lora_serving.container.demo.random_model import save_random_model
from lora_serving.handler import SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_CACHE = Path(os.environ.get("BENCH_CACHE_DIR", REPO_ROOT / ".cache" / "bench"))

# A Llama of about 50M parameters (hidden 512, 8 layers, vocab 32000), random weights.
BENCH_MODEL_SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)


def bench_model_dir(name: str = "llama-50m", **shape) -> Path:
    """Build (once, cached) the benchmark model directory."""
    model_dir = BENCH_CACHE / name
    if not (model_dir / "config.json").is_file():
        save_random_model(model_dir, "llama", tokenizer_vocab_size=32000, init_std=0.02,
                          **{**BENCH_MODEL_SHAPE, **shape})
    return model_dir


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int


def named_model_dir(name: str) -> Path:
    """A benchmark's --model: llama-50m (bench_model_dir), smollm2 (the real SmolLM2-135M-Instruct that
    tests/real_model.py builds from its PyPI package) or a model directory."""
    if name == "llama-50m":
        return bench_model_dir()
    if name == "smollm2":
        sys.path.insert(0, str(REPO_ROOT))
        from tests.real_model import TEST_CACHE_DIR, build_smollm2, missing_requirements

        if missing_requirements():
            sys.exit(missing_requirements())
        return build_smollm2(TEST_CACHE_DIR)
    if not (Path(name) / "config.json").is_file():
        sys.exit(f"--model {name}: not llama-50m, smollm2 or a model directory (no config.json there)")
    return Path(name)


def workload(num_requests: int = 64, min_len: int = 16, max_len: int = 128, seed: int = 0,
             vocab_size: int = 18000) -> list[Request]:
    """Prompt and output lengths drawn uniformly from min_len..max_len (outputs ignore eos)."""
    rng = random.Random(seed)
    return [
        Request([rng.randrange(3, vocab_size) for _ in range(rng.randint(min_len, max_len))],
                rng.randint(min_len, max_len))
        for _ in range(num_requests)
    ]


def left_padded_batch(batch: list[Request], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a static batch for generate(), prompts left-padded to the longest."""
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch], device=device)
    return ids, mask


def resolve_device(name: str) -> str:
    """--device auto|cpu|cuda: auto is CUDA where torch sees a GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is available on this machine")
    return name


def engine_throughput(engine, requests: list[Request], adapters=None) -> tuple[float, int]:
    """Generated tokens per second of engine.generate over all requests (eos ignored), and the token count."""
    params = [SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True) for r in requests]
    started = time.perf_counter()
    results = engine.generate([r.prompt_ids for r in requests], params, adapters)
    elapsed = time.perf_counter() - started
    assert all(result.finish_reason.value == "length" for result in results), [r.error for r in results][:3]
    tokens = sum(len(result.token_ids) for result in results)
    assert tokens == sum(r.max_new_tokens for r in requests)
    return tokens / elapsed, tokens


def engine_decode_step_seconds(engine, prompt_ids, new_tokens: int, request_id: str = "decode-probe") -> float:
    """One request alone: the mean time of its decode steps after its prefill."""
    return engine_decode_steps(engine, [prompt_ids], new_tokens, request_id)[0]


def engine_decode_steps(engine, prompts: list[list[int]], new_tokens: int, tag: str) -> tuple[float, list[list[int]]]:
    """All prompts added at once: the mean time of the decode steps once every request has its first token (the
    prefills not timed), and each request's tokens, in prompt order."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        request_id = tag if len(prompts) == 1 else f"{tag}-{index}"
        engine.add_request(request_id, prompt, params)
        outputs[request_id] = []

    def step() -> None:
        for output in engine.step():
            outputs[output.request_id].extend(token.id for token in output.tokens)

    while any(not tokens for tokens in outputs.values()):
        step()
    started, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        step()
        steps += 1
    return (time.perf_counter() - started) / steps, list(outputs.values())


def measure_memory_bandwidth(size_mb: int = 512, repeats: int = 5, device="cpu") -> float:
    """Bytes per second of a large tensor copy (read + write) on `device`, best of a few runs."""
    source = torch.ones(size_mb * 1024 * 1024 // 4, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        if source.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        if source.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best


def model_weight_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def machine_description(device: str = "cpu") -> str:
    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    threads = torch.get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads{gpu}"


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in headers]] + [[_format(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print("\n".join(lines))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def wait_until_serving(url: str, process: subprocess.Popen | None, log_path: Path | None, *, seconds: float,
                       path: str = "/ping", poll_seconds: float = 0.5, what: str = "the server") -> None:
    """Until GET `url``path` answers 200; the script exits naming the log if `process` ends first or after
    `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            sys.exit(f"{what} exited with status {process.returncode}; its log: {log_path}")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_seconds)
    sys.exit(f"{what} at {url} did not answer {path} within {seconds} s; its log: {log_path}")
