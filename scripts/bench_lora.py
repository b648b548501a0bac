"""Multi-LoRA throughput: our engine with N adapters against itself on the base model and against PEFT.

Same model and workload as bench_engine.py (64 requests, prompt and output lengths 16..128, eos ignored).
Adapters of rank 8 and 16 on all seven projections; each request's adapter is drawn Zipf(1.0) from N.
  (a) our engine with LoRA, (b) our engine on the base model alone, (c) PEFT with all N adapters loaded,
  generating static batches of the same size with `adapter_names` (PEFT's mixed-batch inference).
Then the time to first token of a request whose adapter is on disk only, next to one whose adapter is
resident in a device slot.

The engine runs with its default prefix cache: each side runs once uncounted, so in the counted runs the
prompts come from the cache and the table measures mostly decode, where LoRA costs the most against the base
(--no-prefix-caching computes every prompt in every run; PEFT always does).

    .venv/bin/python scripts/bench_lora.py [--adapters 1 8 64 512] [--peft-max 64] [--no-prefix-caching]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from lora_serving import handler  # noqa: F401  (before torch: it sets how torch's OpenMP threads wait)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    BENCH_CACHE,
    bench_model_dir,
    engine_throughput,
    left_padded_batch,
    machine_description,
    measure_memory_bandwidth,
    print_table,
    resolve_device,
    workload,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lora_serving.handler import Engine, SamplingParams  # noqa: E402
from lora_serving.handler.lora.peft_adapter import SERVABLE_MODULES  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model_dir: Path, count: int) -> list[Path]:
    """PEFT-format adapters (adapter_config.json + adapter_model.safetensors with PEFT's tensor names),
    ranks alternating 8 and 16, random weights; built once and cached."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    root = BENCH_CACHE / f"{model_dir.name}-adapters"
    paths = [root / f"adapter-{index:03d}" for index in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").is_file()]
    if not missing:
        return paths
    templates = {}
    for rank in (8, 16):
        # PEFT writes one adapter of each rank; the others reuse its config and tensor names.
        template_dir = root / f"template-r{rank}"
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
        get_peft_model(base, config).save_pretrained(str(template_dir))
        with safe_open(str(template_dir / "adapter_model.safetensors"), framework="pt") as handle:
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
        templates[rank] = (shapes, json.loads((template_dir / "adapter_config.json").read_text()))
    for path in missing:
        index = int(path.name.split("-")[1])
        rank = 8 if index % 2 == 0 else 16
        shapes, config = templates[rank]
        generator = torch.Generator().manual_seed(index)
        tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(config))
    return paths


def zipf_choices(count: int, num_adapters: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(num_adapters)]
    return rng.choices(range(num_adapters), weights=weights, k=count)


def peft_run(model_dir: Path, adapter_paths: list[Path], requests, choices, batch_size: int, device: str) -> float:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_paths[0]), adapter_name="a0")
    for index, path in enumerate(adapter_paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    model.eval().to(device)
    pad = base.config.pad_token_id
    model.generation_config.eos_token_id = None
    useful = 0
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        names = [f"a{choices[start + i]}" for i in range(len(batch))]
        ids, mask = left_padded_batch(batch, pad, device)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, do_sample=False,
                           max_new_tokens=max(r.max_new_tokens for r in batch), pad_token_id=pad)
        useful += sum(r.max_new_tokens for r in batch)
    return useful / (time.perf_counter() - started)


class LoraTraffic:
    """What the LoRA ops of each step must at least read and compute, counted while the engine runs: every
    adapter used in the step is read once and every token's delta is computed, at the adapter's real ranks
    (as the CPU kernel reads a slot's compact copy of lora_a, lora_serving/kernels/cpu_native.py CompactA)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.steps = self.bytes = self.flops = 0
        slots = engine.lora.slots
        self.host_ranks = slots.host_ranks  # [layers, modules, slots]
        shapes = engine.model.lora_module_shapes()
        self.in_features = torch.tensor([shapes[m][0] for m in SERVABLE_MODULES])[None, :, None]
        self.out_features = torch.tensor([shapes[m][1] for m in SERVABLE_MODULES])[None, :, None]
        self.element = torch.empty((), dtype=engine.dtype).element_size()
        self._original = engine.lora.admission.step_plan
        engine.lora.admission.step_plan = self._counting_step_plan

    def close(self) -> None:
        self.engine.lora.admission.step_plan = self._original

    def _counting_step_plan(self, step):
        plan = self._original(step)
        token_slots = [self.engine.lora.admission.slot_for(seq) for seq in step.decode_seqs]
        for seq in step.prefill_seqs:
            token_slots += [self.engine.lora.admission.slot_for(seq)] * seq.num_tokens
        used = torch.tensor(sorted({slot for slot in token_slots if slot >= 0}), dtype=torch.long)
        if used.numel():
            ranks = self.host_ranks[:, :, used].long()  # [layers, modules, used slots]
            weights = ranks * (self.in_features + self.out_features)  # per (layer, module, slot)
            self.bytes += int(weights.sum()) * self.element
            with_adapter = torch.tensor([slot for slot in token_slots if slot >= 0])
            tokens = torch.bincount(with_adapter, minlength=self.host_ranks.shape[2])[used]
            self.flops += int((2 * weights.sum(dim=(0, 1)) * tokens).sum())
        self.steps += 1
        return plan


def time_to_first_token(engine: Engine, prompt_ids, adapter: str) -> float:
    engine.add_request(f"ttft-{adapter}", prompt_ids, SamplingParams(max_new_tokens=1, ignore_eos=True),
                       adapter=adapter)
    started = time.perf_counter()
    while True:
        if any(out.tokens for out in engine.step()):
            return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--peft-max", type=int, default=64, help="skip PEFT above this many adapters")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=32)
    parser.add_argument("--max-cpu-loras", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8,
                        help="rounds of one LoRA and one base run, alternating which goes first")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="the engine's and PEFT's")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="compute every prompt in every run (by default, as the engine's default, the cache serves "
                             "each run's prompts after that side's first run, so the runs are mostly decode)")
    args = parser.parse_args()
    device = resolve_device(args.device)

    model_dir = bench_model_dir()
    requests = workload(args.requests)
    all_paths = make_adapters(model_dir, max(args.adapters))
    engine = Engine(model_dir, dtype="float32", device=device, max_rolling_batch_size=args.batch_size, enable_lora=True,
                    max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=16,
                    enable_prefix_caching=not args.no_prefix_caching)
    engine.generate([requests[0].prompt_ids], SamplingParams(max_new_tokens=4, ignore_eos=True))

    bandwidth = measure_memory_bandwidth(device=device)
    rows, floors = [], []
    for count in args.adapters:
        for name in [info.name for info in engine.list_adapters()]:
            engine.unregister_adapter(name)
        for index, path in enumerate(all_paths[:count]):
            engine.register_adapter(f"a{index}", path, preload=False)
        choices = zipf_choices(len(requests), count)
        # One LoRA run first, uncounted: it loads the adapters from disk, as a server's first minutes would;
        # and one base run, uncounted, so that both sides start alike: with the prefix cache on, every run
        # after a side's first takes that side's prompts from the cache (a base run that followed only LoRA
        # runs computed its prompts while the LoRA run beside it did not, and the first round's ratio favoured
        # LoRA). Then rounds of one LoRA and one base run, the order alternating. This VM's speed drifts by
        # more than LoRA costs over minutes (other tenants), so (a)/(b) is the median of each round's ratio of
        # two neighbouring runs, not a ratio of bests taken minutes apart; the tok/s columns keep each side's best.
        lora_names = [f"a{c}" for c in choices]
        engine_throughput(engine, requests, lora_names)
        engine_throughput(engine, requests, None)
        lora_rates, base_rates = [], []
        for round_index in range(args.repeats):
            sides = [(lora_rates, lora_names), (base_rates, None)]
            for rates, names in sides if round_index % 2 == 0 else reversed(sides):
                rate, tokens = engine_throughput(engine, requests, names)
                rates.append(rate)
        ratios = sorted(lora / base for lora, base in zip(lora_rates, base_rates))
        ratio = statistics.median(ratios)
        lora_throughput, base_throughput = max(lora_rates), max(base_rates)
        traffic = LoraTraffic(engine)
        engine_throughput(engine, requests, lora_names)
        traffic.close()
        overhead_ms = statistics.median(tokens / lora - tokens / base
                                        for lora, base in zip(lora_rates, base_rates)) / traffic.steps * 1e3
        floors.append([count, traffic.bytes / traffic.steps / 1e6, traffic.flops / traffic.steps / 1e9,
                       traffic.bytes / traffic.steps / bandwidth * 1e3, overhead_ms,
                       overhead_ms / (traffic.bytes / traffic.steps / bandwidth * 1e3)])
        peft_throughput = (peft_run(model_dir, all_paths[:count], requests, choices, args.batch_size, device)
                           if count <= args.peft_max else None)
        # The rounds' middle half: how far one round moves on this machine (on a quiet one the columns agree).
        quarter = len(ratios) // 4
        rows.append([count, len(set(choices)), lora_throughput, base_throughput, ratio,
                     f"{ratios[quarter]:.3f}-{ratios[-1 - quarter]:.3f}",
                     peft_throughput if peft_throughput else "skipped",
                     lora_throughput / peft_throughput if peft_throughput else ""])

    # Time to first token: an adapter on disk only, next to one resident in a device slot.
    probe = requests[1].prompt_ids
    resident = "a0"
    engine.generate([probe], SamplingParams(max_new_tokens=1), [resident])
    engine.register_adapter("cold-probe", all_paths[-1], preload=False)
    cold = time_to_first_token(engine, probe, "cold-probe")
    warm = time_to_first_token(engine, probe, resident)

    print(f"# bench_lora: {machine_description(device)}, on {device}")
    print(f"# {args.requests} requests, batch size {args.batch_size}, max_loras {args.max_loras}, "
          f"max_cpu_loras {args.max_cpu_loras}; adapters rank 8/16 on all 7 projections, Zipf(1.0); prefix cache "
          f"{'off: every prompt computed' if args.no_prefix_caching else 'on: prompts from the cache after a warm-up run of each side'}; "
          f"{args.repeats} rounds of a LoRA and a base run, alternating; tok/s: each side's best; (a)/(b): the "
          "median of the rounds' ratios")
    print_table(["adapters N", "distinct used", "(a) LoRA tok/s", "(b) base tok/s", "(a)/(b)", "(a)/(b) middle half",
                 "(c) PEFT tok/s", "(a)/(c)"], rows)
    print()
    print_table(["time to first token", "ms"], [["adapter on disk only", cold * 1e3],
                                                 ["adapter resident in a slot", warm * 1e3]])
    print()
    print(f"# The LoRA ops' floor per step: the adapters a step uses, read once at {bandwidth / 1e9:.1f} GB/s "
          "(this run's copy bandwidth), next to the measured LoRA cost per step (the median over rounds of the LoRA "
          "run's time less the base run's, over the LoRA run's steps)")
    print_table(["adapters N", "adapter MB/step", "LoRA GFLOP/step", "floor ms/step", "measured ms/step",
                 "measured / floor"], floors)


if __name__ == "__main__":
    main()
