"""Each model family's offline throughput against transformers generate(), on the tests' tiny config of that
family (tests/models.py), one run each; then Mixtral-tiny's decode step time with the step's expert picks
spread over 1 or over 8 distinct experts (the same number of expert rows either way).

    .venv/bin/python scripts/bench_families.py [--requests 16] [--batch-size 8]

Tiny configs measure per-call overheads more than arithmetic: the rows say how the engine's fixed costs per
family compare with transformers' on the same model, not how a real checkpoint of that family runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_engine import transformers_throughput  # noqa: E402
from benchlib import engine_throughput, machine_description, print_table, workload  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lora_serving.container.demo.random_model import save_random_model  # noqa: E402
from lora_serving.container.demo.tokenizer import build_tokenizer  # noqa: E402
from lora_serving.handler import Engine, SamplingParams  # noqa: E402
from tests.models import FAMILY_OVERRIDES, TINY_SHAPE  # noqa: E402

MIXTRAL_STEP_SHAPE = dict(TINY_SHAPE, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                          num_local_experts=8, num_experts_per_tok=2)


def family_rows(root: Path, tokenizer, requests, batch_size: int) -> list[list]:
    """The first family runs twice and its first run is dropped: it pays the process's one-time costs (the C
    kernels' loading, the allocator's first growth), which made its row 2.5x slower than its second."""
    rows = []
    for family in ["llama", *FAMILY_OVERRIDES]:
        model_dir = save_random_model(root / family, family, tokenizer=tokenizer, **{**TINY_SHAPE, **FAMILY_OVERRIDES[family]})
        engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=batch_size)
        reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        reference.generation_config.eos_token_id = None
        pad_id = reference.config.pad_token_id
        engine.generate([requests[0].prompt_ids], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        transformers_throughput(reference, requests[:2], 2, pad_id)
        ours, _ = engine_throughput(engine, requests)
        theirs = transformers_throughput(reference, requests, batch_size, pad_id)
        rows.append([family, ours, theirs, ours / theirs])
        engine.close()
    return rows[1:]


def forced_routing(model, distinct: int):
    """Replace the router's choice: pick j of token t goes to expert (k * t + j) mod `distinct`."""
    route = model.route

    def routed(router_logits: torch.Tensor):
        weights, _ = route(router_logits)
        picks = torch.arange(weights.numel()).view_as(weights) % distinct
        return weights, picks

    return routed


def mixtral_step_ms(root: Path, tokenizer, batch: int, steps: int) -> list[list]:
    model_dir = save_random_model(root / "mixtral-step", "mixtral", tokenizer=tokenizer, **MIXTRAL_STEP_SHAPE)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=batch)
    prompts = [r.prompt_ids for r in workload(batch, min_len=32, max_len=32, vocab_size=1000)]
    results = {}
    for distinct in (1, 8, 1, 8):  # alternating, best of two each
        engine.model.route = forced_routing(engine.model, distinct)
        for index, prompt in enumerate(prompts):
            engine.add_request(f"{distinct}-{index}-{time.perf_counter()}", prompt,
                               SamplingParams(max_new_tokens=steps + 4, ignore_eos=True))
        engine.step()  # the prefills
        engine.step()
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = (time.perf_counter() - started) / steps
        results[distinct] = min(results.get(distinct, float("inf")), elapsed)
        while engine.has_unfinished_requests():
            engine.step()
    engine.close()
    return [[f"{distinct} distinct expert{'s' if distinct > 1 else ''}", results[distinct] * 1e3] for distinct in (1, 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--step-batch", type=int, default=8, help="decoding sequences in Mixtral's timed steps")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    requests = workload(args.requests, min_len=16, max_len=64, vocab_size=1000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tokenizer", vocab_size=TINY_SHAPE["vocab_size"])
        rows = family_rows(root, tokenizer, requests, args.batch_size)
        step_rows = mixtral_step_ms(root, tokenizer, args.step_batch, args.steps)
    print(f"# bench_families: {machine_description('cpu')}; {args.requests} requests (prompts and outputs "
          f"16..64 tokens, eos ignored), batch size {args.batch_size}, one run each, fp32")
    print_table(["family (tests' tiny config)", "engine tok/s", "transformers tok/s", "engine / transformers"], rows)
    print(f"\n# Mixtral-tiny {MIXTRAL_STEP_SHAPE}: decode step of {args.step_batch} sequences "
          f"({2 * args.step_batch} expert rows a layer), routing forced, best of 2 alternating runs of {args.steps} steps")
    print_table(["expert picks of the step spread over", "step (ms)"], step_rows)


if __name__ == "__main__":
    main()
