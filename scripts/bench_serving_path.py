"""Where a decode step's time goes at N concurrent streams, engine and serving path, in one process.

    .venv/bin/python scripts/bench_serving_path.py [--model DIR] [--streams 64] [--repeats 5]
    .venv/bin/python scripts/bench_serving_path.py --budgets 1024,2048,4096 [--output-len 64] [--repeats 1]

For one decode step of N streams (each a token): the engine's step (model, sampling at temperature 1, text),
the same with the sampler drawing row by row as it did before (the two alternate, step by step), and apart
from it, on the same shapes: drawing N sampled tokens row by row (each row's own multinomial, as
the sampler did before), the sampler's whole work for N sampled rows now, detokenizing N tokens, building and encoding N
OpenAI completion chunks as server-sent events, and handing N outputs from a thread to N coroutines waiting
on their queues (what handler/engine_loop.py does each step). The measures take turns, `--repeats` times,
and each keeps its median. Model: as scripts/bench_serving.py picks it.

With `--budgets`: how the step budget (`max_num_batched_tokens`, which decides how many waiting prompts
each step starts prefilling) trades first tokens against throughput when N prompts arrive at once, the
engine alone: per budget, the median and 90th percentile time from adding the prompts to each one's first
token, and output tokens/s; the budgets take turns, `--repeats` times, each keeping its best run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import threading
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))

# The handler first: it sets OpenMP's wait policy up, which must happen before torch is imported.
from lora_serving.handler import Engine, SamplingParams  # noqa: E402  isort: skip
import torch  # noqa: E402  isort: skip

from lora_serving.handler.api.openai_completions import CompletionChunks  # noqa: E402
from lora_serving.handler.detokenizer import IncrementalDetokenizer  # noqa: E402
from lora_serving.handler.api.generation import Generation  # noqa: E402
from lora_serving.handler.api.lmi_answer import encode_stream_record  # noqa: E402
from lora_serving.handler.sampler import Sampler  # noqa: E402
from lora_serving.handler.sequence import RequestOutput, Sequence, TokenOutput  # noqa: E402

PROMPT_LEN = 128
SAMPLED = dict(do_sample=True, temperature=1.0, ignore_eos=True)


def decode_step(engine: Engine, streams: int, rng: random.Random) -> float:
    """Seconds of one engine step while `streams` sequences decode (prefilled first, untimed)."""
    vocab = engine.tokenizer.vocab_size
    for index in range(streams):
        engine.add_request(f"r{time.monotonic_ns()}-{index}", [rng.randrange(100, vocab) for _ in range(PROMPT_LEN)],
                           SamplingParams(max_new_tokens=8, **SAMPLED))
    started_requests: set[str] = set()
    while len(started_requests) < streams:  # every prompt prefilled: each has its first token
        started_requests.update(output.request_id for output in engine.step() if output.tokens)
    started = time.perf_counter()
    steps = 0
    for _ in range(3):
        engine.step()
        steps += 1
    elapsed = (time.perf_counter() - started) / steps
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


class RowByRowSampler(Sampler):
    """The sampler drawing as it did before the inverse transform: row by row, torch.multinomial from each
    row's own generator, with a check of each row's softmax."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._row_generator = torch.Generator().manual_seed(0)

    def _draw(self, scores: torch.Tensor, uniforms: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        drawn = fallback.clone()
        for row in range(scores.shape[0]):
            probs = torch.softmax(scores[row], dim=-1)
            if bool(torch.isfinite(probs).all()):
                drawn[row] = int(torch.multinomial(probs, 1, generator=self._row_generator).item())
        return drawn


def with_sampler(engine: Engine, sampler: Sampler, measure):
    def run():
        engine.runner.sampler = sampler
        return measure()
    return run


def draws(streams: int, vocab: int) -> tuple[callable, callable]:
    """The sampler's choice of `streams` sampled tokens, and the same drawn as it was before it drew by
    inverse transform: row by row, torch.multinomial from each row's own generator."""
    logits = torch.randn(streams, vocab)
    seqs = [Sequence(f"u{index}", [1], SamplingParams(max_new_tokens=4, **SAMPLED)) for index in range(streams)]
    generators = [torch.Generator().manual_seed(index) for index in range(streams)]
    sampler = Sampler(torch.device("cpu"))

    def row_by_row():
        for row, generator in zip(logits, generators):
            probs = torch.softmax(row, dim=-1)
            bool(torch.isfinite(probs).all())
            int(torch.multinomial(probs, 1, generator=generator).item())
    return row_by_row, (lambda: sampler.sample(logits, seqs))


def detokenize(engine: Engine, streams: int, rng: random.Random):
    vocab = engine.tokenizer.vocab_size
    detokenizers = [IncrementalDetokenizer(engine.tokenizer, [rng.randrange(100, vocab) for _ in range(8)])
                    for _ in range(streams)]
    tokens = [rng.randrange(100, vocab) for _ in range(streams)]
    return lambda: [detokenizer.add(token) for detokenizer, token in zip(detokenizers, tokens)]


def frame(streams: int):
    params = SamplingParams(max_new_tokens=64)
    chunkers = [CompletionChunks(Generation("p", [1, 2], params=params), completion_id=f"cmpl-{index}", model="m",
                                 created=0, logprobs=False, include_usage=True) for index in range(streams)]
    output = RequestOutput(request_id="x", tokens=[TokenOutput(id=5, text=" token", log_prob=-1.0)], finished=False)

    def run():
        for chunker in chunkers:
            for chunk in chunker.for_output(output):
                encode_stream_record(chunk, "sse")
    return run


def hand_off(streams: int, steps: int = 20) -> float:
    """Seconds per step to hand `streams` outputs from a thread to the coroutines waiting for them."""
    async def run() -> float:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in range(streams)]

        async def consume(queue):
            for _ in range(steps):
                await queue.get()

        def dispatch(step):
            for queue in queues:
                queue.put_nowait(step)

        consumers = [asyncio.ensure_future(consume(queue)) for queue in queues]
        producer = threading.Thread(target=lambda: [loop.call_soon_threadsafe(dispatch, step) for step in range(steps)])
        started = time.perf_counter()
        producer.start()
        await asyncio.gather(*consumers)
        producer.join()
        return (time.perf_counter() - started) / steps
    return asyncio.run(run())


def arrival_at_once(engine: Engine, streams: int, output_len: int, rng: random.Random) -> tuple[float, float, float]:
    """(TTFT p50 s, TTFT p90 s, output tok/s) of `streams` sampled prompts added at once and stepped to the end."""
    vocab = engine.tokenizer.vocab_size
    started = time.perf_counter()
    for index in range(streams):
        engine.add_request(f"a{time.monotonic_ns()}-{index}", [rng.randrange(100, vocab) for _ in range(PROMPT_LEN)],
                           SamplingParams(max_new_tokens=output_len, **SAMPLED))
    first_token: dict[str, float] = {}
    generated = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            generated += len(output.tokens)
            if output.tokens:
                first_token.setdefault(output.request_id, time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    ttfts = sorted(first_token.values())
    return statistics.median(ttfts), ttfts[int(0.9 * (len(ttfts) - 1))], generated / elapsed


def compare_budgets(model_dir: Path, args) -> None:
    from benchlib import machine_description, print_table

    budgets = [int(budget) for budget in args.budgets.split(",")]
    engines = {budget: Engine(model_dir, dtype="float32", max_rolling_batch_size=args.streams, max_model_len=512,
                              cpu_kv_cache_mb=1024, max_num_batched_tokens=budget) for budget in budgets}
    rng = random.Random(0)
    best: dict[int, tuple[float, float, float]] = {}
    for round_index in range(args.repeats):
        for budget in budgets if round_index % 2 == 0 else list(reversed(budgets)):
            result = arrival_at_once(engines[budget], args.streams, args.output_len, rng)
            print(f"round {round_index + 1} budget {budget}: TTFT p50 {result[0]:.2f} s, p90 {result[1]:.2f} s, "
                  f"{result[2]:.0f} tok/s", flush=True)
            if budget not in best or result[2] > best[budget][2]:
                best[budget] = result
    print(f"\n# bench_serving_path --budgets: {machine_description()}; {model_dir.name}, fp32; {args.streams} prompts "
          f"of {PROMPT_LEN} tokens added at once, {args.output_len} out, sampled; engine alone; best of {args.repeats}")
    print_table(["max_num_batched_tokens", "TTFT p50 s", "TTFT p90 s", "output tok/s"],
                [[budget, f"{p50:.2f}", f"{p90:.2f}", f"{rate:.0f}"] for budget, (p50, p90, rate) in best.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets", help="step budgets to compare with N prompts arriving at once, e.g. 1024,2048")
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    from bench_serving import bench_model
    from benchlib import machine_description, print_table

    model_dir = bench_model(args)
    if args.budgets:
        compare_budgets(model_dir, args)
        return
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=args.streams, max_model_len=512,
                    cpu_kv_cache_mb=1024)
    rng = random.Random(0)
    per_row, batched = draws(args.streams, engine.model.vocab_size)
    step = lambda: decode_step(engine, args.streams, rng)  # noqa: E731
    measures = {
        "engine step (model, sampling, text)": with_sampler(engine, engine.runner.sampler, step),
        "engine step, drawing row by row (before)": with_sampler(engine, RowByRowSampler(torch.device("cpu")), step),
        "drawing the tokens: a multinomial per row": per_row,
        "the sampler (argmax, log-probs, inverse-transform draw)": batched,
        "detokenizing the step's tokens": detokenize(engine, args.streams, rng),
        "chunks built, JSON + SSE encoded": frame(args.streams),
        "thread -> event loop -> queues": lambda: hand_off(args.streams),
    }
    times: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(args.repeats):
        for name, measure in measures.items():
            started = time.perf_counter()
            result = measure()
            times[name].append(result if isinstance(result, float) else time.perf_counter() - started)
    step = statistics.median(times["engine step (model, sampling, text)"])
    rows = [[name, f"{statistics.median(values) * 1e3:.2f}", f"{statistics.median(values) / step:.1%}"]
            for name, values in times.items()]
    print(f"\n# bench_serving_path: {machine_description()}; {model_dir.name}, fp32; {args.streams} streams, "
          f"prompts of {PROMPT_LEN} tokens; median of {args.repeats}")
    print_table(["per decode step", "ms", "of the engine step"], rows)


if __name__ == "__main__":
    main()
