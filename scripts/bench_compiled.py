"""The compiled decode step against the eager forward (handler/runner/compiled_decode.py), in one process.

Two engines on the same model and dtype, `enforce_eager=true` and `enforce_eager=false`, take turns round by round
(the order alternating), each keeping its best round: the decode steps of 32 requests decoding at once (their
prefills done first and not timed; 64 new tokens each, eos ignored), as tokens per second and ms per step, and of
one request alone (batch-1 decode, ms per step after its prefill). Beside them: the start (the compiled engine's includes compiling
both graphs; less when inductor's cache has them) and whether the greedy outputs agree token for token (expected
in fp32; in bf16 the rounding differences of two summation orders can flip a near-tie).

    .venv/bin/python scripts/bench_compiled.py [--model smollm2|llama-50m|DIR] [--dtype float32|bfloat16]
                                               [--rounds 3] [--cpu-threads auto] [--compare compiled|huge-pages]

--compare huge-pages: the same two-engine comparison for huge pages (handler/runner/huge_pages.py): both engines as
configured by default (compiled where `enforce_eager=auto` compiles), one built with $LORA_SERVING_HUGE_PAGES=off
(its weights and KV cache in the allocator's 4 KB pages), the other with them collapsed into huge pages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    engine_decode_step_seconds,
    engine_decode_steps,
    machine_description,
    named_model_dir,
    print_table,
)

from lora_serving.handler import Engine  # noqa: E402

BATCH, NEW_TOKENS, PROMPT_LEN = 32, 64, 64
# Per --compare: each side's Engine options and $LORA_SERVING_HUGE_PAGES while it is built; the first is the base.
COMPARISONS = {
    "compiled": {"eager": ({"enforce_eager": "true"}, "auto"), "compiled": ({"enforce_eager": "false"}, "auto")},
    "huge-pages": {"4 KB pages": ({}, "off"), "huge pages": ({}, "auto")},
}


def prompts(vocab_size: int, round_index: int) -> list[list[int]]:
    """BATCH different prompts of PROMPT_LEN tokens, new each round (no prefix-cache hits between rounds)."""
    base = [(7919 * i) % (vocab_size - 200) + 100 for i in range(PROMPT_LEN)]
    shift = round_index * BATCH
    return [base[(i + shift) % PROMPT_LEN:] + base[: (i + shift) % PROMPT_LEN] for i in range(BATCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-threads", default="auto")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="compiled")
    args = parser.parse_args()

    model_dir = named_model_dir(args.model)
    engines, starts = {}, {}
    for side, (options, huge_pages) in COMPARISONS[args.compare].items():
        os.environ["LORA_SERVING_HUGE_PAGES"] = huge_pages  # read as the engine allocates
        started = time.perf_counter()
        engines[side] = Engine(model_dir, dtype=args.dtype, max_rolling_batch_size=BATCH, cpu_threads=args.cpu_threads,
                               enable_prefix_caching=False, **options)
        starts[side] = time.perf_counter() - started
    os.environ.pop("LORA_SERVING_HUGE_PAGES")
    if "compiled" in engines and not (engines["compiled"].runner.compiled_decode
                                      and engines["compiled"].runner.compiled_decode.ready):
        sys.exit("the decode step did not compile on this engine (see the log)")
    sides = list(engines)
    first = sides[0]
    vocab = engines[first].model.vocab_size
    throughput = {side: 0.0 for side in sides}
    step = {side: float("inf") for side in sides}
    outputs: dict[str, list] = {side: [] for side in sides}
    for round_index in range(args.rounds):
        batch = prompts(vocab, round_index)
        for side in sides[round_index % 2:] + sides[: round_index % 2]:
            engine = engines[side]
            seconds, tokens = engine_decode_steps(engine, batch, NEW_TOKENS, f"batch-{round_index}")
            throughput[side] = max(throughput[side], BATCH / seconds)
            outputs[side].append(tokens)
            step[side] = min(step[side], engine_decode_step_seconds(engine, batch[0], 128, f"probe-{round_index}"))
    equal = sum(a == b for runs in zip(outputs[sides[0]], outputs[sides[1]]) for a, b in zip(*runs))
    print(f"# bench_compiled --compare {args.compare}: {machine_description()}; model {model_dir.name}, {args.dtype}, cpu_threads "
          f"{args.cpu_threads}; {BATCH} requests x {NEW_TOKENS} tokens after {PROMPT_LEN}-token prompts; best of "
          f"{args.rounds} alternating rounds")
    print_table(
        ["side", "start (s)", f"decode tok/s at batch {BATCH}", f"batch-{BATCH} step (ms)", f"vs {first}",
         "batch-1 step (ms)", f"vs {first}"],
        [[side, starts[side], throughput[side], BATCH / throughput[side] * 1e3, throughput[first] / throughput[side],
          step[side] * 1e3, step[side] / step[first]] for side in sides],
    )
    print(f"greedy outputs equal to {first}'s: {equal}/{BATCH * args.rounds}")


if __name__ == "__main__":
    main()
