"""The sampler's cost per decode step on CPU for greedy rows: the C pass over the logits (kernels/cpu_logits.c:
argmax and log-normalizer per row) against torch's max + log_softmax, which serve with $LORA_SERVING_CPU_LOGITS=off.

Each case is fp32 logits [rows, vocab] as the LM head leaves them (49152: SmolLM2's vocabulary; 128256: Llama 3's),
sampled by handler/sampler.py's Sampler for that many greedy sequences, the two sides alternating round by round,
best of --rounds each; "agree" says whether both chose the same tokens with log-probabilities within 1e-5.

    .venv/bin/python scripts/bench_sampler.py [--rows 1 8 32 64] [--vocab 49152 128256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_description, print_table  # noqa: E402

from lora_serving.handler import SamplingParams  # noqa: E402
from lora_serving.handler.sampler import Sampler  # noqa: E402
from lora_serving.handler.sequence import Sequence  # noqa: E402

SWITCH = "LORA_SERVING_CPU_LOGITS"


def greedy_sequences(count: int) -> list[Sequence]:
    return [Sequence(f"bench-{index}", [1, 2, 3], SamplingParams(max_new_tokens=8)) for index in range(count)]


def time_side(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], kernel: bool, calls: int):
    os.environ[SWITCH] = "auto" if kernel else "off"
    started = time.perf_counter()
    for _ in range(calls):
        result = sampler.sample(logits, seqs)
    return (time.perf_counter() - started) / calls, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sampler = Sampler(torch.device("cpu"))
    table = []
    for vocab in args.vocab:
        for rows in args.rows:
            logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 4
            seqs = greedy_sequences(rows)
            calls = max(5, 4000 // rows)
            best = {True: float("inf"), False: float("inf")}
            results = {}
            for round_index in range(args.rounds):
                for kernel in ((True, False) if round_index % 2 == 0 else (False, True)):
                    seconds, results[kernel] = time_side(sampler, logits, seqs, kernel, calls)
                    best[kernel] = min(best[kernel], seconds)
            agree = results[True].token_ids == results[False].token_ids and torch.allclose(
                torch.tensor(results[True].log_probs), torch.tensor(results[False].log_probs), atol=1e-5)
            table.append([vocab, rows, round(best[False] * 1e6), round(best[True] * 1e6),
                          round(best[False] / best[True], 2), "yes" if agree else "NO"])
    os.environ.pop(SWITCH, None)
    print(f"# bench_sampler: {machine_description()}; greedy rows, best of {args.rounds} alternating rounds")
    print_table(["vocab", "rows", "torch (us)", "kernel (us)", "torch / kernel", "agree"], table)


if __name__ == "__main__":
    main()
