"""What the generation parameters cost: a batch mixing plain, penalised, top-5-log-prob and JSON-schema
requests next to the same batch all plain, and the per-step cost of the grammar mask.

Same model (the ~50M-parameter benchmark Llama, vocab 32000), same prompts and output lengths (eos ignored;
the schema asks for an array of at least 200 integers, so no JSON request ends before its max_new_tokens),
the two batches run alternately, rounds times. Then the grammar mask alone, per step: filling the bitmasks
of R grammar rows and applying them to [R, 32000] logits.

    .venv/bin/python scripts/bench_generation_params.py [--requests 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import bench_model_dir, machine_description, print_table, workload  # noqa: E402

from lora_serving.handler import Engine, SamplingParams  # noqa: E402
from lora_serving.handler.sequence import StructuredOutput  # noqa: E402
from lora_serving.handler.structured_output import StructuredOutputCompiler, apply_masks, fill_masks  # noqa: E402

LONG_JSON = StructuredOutput("json_schema", json.dumps({
    "type": "object",
    "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                              "minItems": 200}},
    "required": ["values"], "additionalProperties": False,
}), source="bench")


def mixed_params(index: int, max_new_tokens: int) -> SamplingParams:
    kind = index % 4
    common = dict(max_new_tokens=max_new_tokens, ignore_eos=True)
    if kind == 1:
        return SamplingParams(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, **common)
    if kind == 2:
        return SamplingParams(top_n_tokens=5, **common)
    if kind == 3:
        return SamplingParams(structured=LONG_JSON, **common)
    return SamplingParams(**common)


def throughput(engine: Engine, requests, mixed: bool) -> tuple[float, float]:
    """Generated tokens per second of wall time, and per second of this process's CPU time (which others'
    work on a shared machine disturbs less)."""
    params = [mixed_params(i, r.max_new_tokens) if mixed else SamplingParams(max_new_tokens=r.max_new_tokens,
                                                                              ignore_eos=True)
              for i, r in enumerate(requests)]
    started, cpu_started = time.perf_counter(), time.process_time()
    results = engine.generate([r.prompt_ids for r in requests], params)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert all(result.finish_reason.value == "length" for result in results), [r.error for r in results][:3]
    tokens = sum(len(result.token_ids) for result in results)
    return tokens / elapsed, tokens / cpu


def mask_step_seconds(engine: Engine, rows: int, steps: int = 100) -> tuple[float, float]:
    """Seconds per step to fill `rows` bitmasks and to apply them, the grammars advancing as a request's
    would (each takes a token its mask allows)."""
    compiler = StructuredOutputCompiler(engine.tokenizer, engine.model.vocab_size, engine.eos_token_ids,
                                        threading.Lock())
    matchers = [compiler.matcher(LONG_JSON) for _ in range(rows)]
    vocab_size = engine.model.vocab_size
    logits = torch.randn(rows, vocab_size)
    fill_time = apply_time = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        bitmasks = fill_masks(matchers, vocab_size)
        filled = time.perf_counter()
        masked = logits.clone()
        apply_masks(masked, bitmasks)
        applied = time.perf_counter()
        fill_time += filled - started
        apply_time += applied - filled
        for matcher, token in zip(matchers, masked.argmax(dim=-1).tolist()):
            assert matcher.accept(token)
    return fill_time / steps, apply_time / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(machine_description())
    engine = Engine(bench_model_dir(), dtype="float32", max_rolling_batch_size=args.batch_size,
                    max_model_len=512)
    requests = workload(args.requests, min_len=32, max_len=96)
    throughput(engine, requests[:4], mixed=True)  # warm-up: oneDNN shapes, the grammar's first compile
    rows = []
    for round_index in range(args.rounds):
        plain, plain_cpu = throughput(engine, requests, mixed=False)
        mixed, mixed_cpu = throughput(engine, requests, mixed=True)
        rows.append([round_index + 1, plain, mixed, mixed / plain, plain_cpu, mixed_cpu, mixed_cpu / plain_cpu])
    rows.append(["median", *(statistics.median(row[i] for row in rows) for i in range(1, 7))])
    print(f"\n{args.requests} requests, batch {args.batch_size}, outputs {sum(r.max_new_tokens for r in requests)} "
          "tokens; mixed = 1/4 each plain, penalised, top-5 log-probs, JSON schema")
    print_table(["round", "all plain tok/s", "mixed tok/s", "mixed / plain", "plain tok/CPU-s", "mixed tok/CPU-s",
                 "mixed / plain (CPU)"], rows)

    print("\nGrammar mask per step (JSON schema, vocab 32000)")
    mask_step_seconds(engine, 1)  # warm-up: the lexer states llguidance builds lazily, then shares
    mask_rows = []
    for count in (1, 8, 32):
        fill, apply = mask_step_seconds(engine, count)
        mask_rows.append([count, fill * 1e6, apply * 1e6, (fill + apply) * 1e6 / count])
    print_table(["grammar rows", "fill us", "apply us", "us per row"], mask_rows)


if __name__ == "__main__":
    main()
