"""Greedy output of every request in a mixed multi-adapter batch equals PEFT with that adapter alone."""

from __future__ import annotations

import random

import pytest
import torch

from lora_serving import kernels

from lora_serving.handler import Engine, SamplingParams
from tests.adapters import make_peft_adapter, peft_greedy
from tests.engine.test_parity import random_prompts


def test_mixed_batch_with_evicting_slots_and_host_cache_matches_peft(lora_base, adapters):
    engine = Engine(lora_base, dtype="float32", enable_lora=True, max_loras=2, max_cpu_loras=3,
                    max_rolling_batch_size=8)
    for name, path in adapters.items():
        engine.register_adapter(name, path, preload=False)
    names = list(adapters)
    # Adapters and base-only requests interleaved, each adapter several times.
    request_adapters = [names[i % len(names)] if i % 4 != 3 else None for i in range(20)]
    prompts = random_prompts(len(request_adapters), seed=30, max_len=30)
    max_new = [random.Random(i).randint(6, 16) for i in range(len(prompts))]
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in max_new], request_adapters)
    for prompt, adapter, new_tokens, result in zip(prompts, request_adapters, max_new, results):
        expected = peft_greedy(lora_base, adapters[adapter] if adapter else None, prompt, new_tokens)
        assert result.token_ids == expected, f"adapter {adapter}"
    # The adapters really change the output (a test passing without LoRA would be worthless).
    base_outputs = {tuple(peft_greedy(lora_base, None, p, n)) for p, n in zip(prompts, max_new)}
    assert sum(tuple(r.token_ids) not in base_outputs for r in results) >= 12
    # Six adapters through two slots and three host places: both tiers evicted during the run.
    tiers = [info.tier for info in engine.list_adapters()]
    assert tiers.count("device") <= 2 and tiers.count("disk") >= 3
    assert sum(info.tokens_served for info in engine.list_adapters()) == sum(
        len(r.token_ids) for r, a in zip(results, request_adapters) if a)
    stats = engine.stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    # Every slot write refreshed the CPU kernel's compact copy of A (kernels.LoraGroup.slot_written): the copies
    # hold the ranks each slot holds now, so the outputs above came from them.
    slots = engine.lora.slots
    checked = 0
    for layer_index, layer_groups in enumerate(slots.groups):
        for group_name, group in layer_groups.items():
            if group.compact_ranks is None:
                continue
            _, _, rank_tensors = slots.group_args[layer_index][group_name]
            live = torch.stack([ranks.long() for ranks in rank_tensors], dim=1)
            assert torch.equal(group.compact_ranks, live), (layer_index, group_name)
            checked += int(live.sum() > 0)
    assert checked or not kernels.cpu_kernel_enabled()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_match_peft(tiny_models, tmp_path, family):
    base = tiny_models.get(family, family)
    adapter = make_peft_adapter(base, tmp_path / "adapter", r=8, alpha=16, seed=7)
    engine = Engine(base, dtype="float32", enable_lora=True, max_loras=2)
    engine.register_adapter("a", adapter)
    prompts = random_prompts(4, seed=31, min_len=15, max_len=30)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=12), ["a", None, "a", None])
    for prompt, adapter_name, result in zip(prompts, ["a", None, "a", None], results):
        assert result.token_ids == peft_greedy(base, adapter if adapter_name else None, prompt, 12)


def test_adapter_saved_as_bin_matches_peft(lora_base, tmp_path):
    from peft import PeftModel

    from tests.adapters import _fresh_copy

    source = make_peft_adapter(lora_base, tmp_path / "source", r=4, alpha=8, seed=8)
    PeftModel.from_pretrained(_fresh_copy(lora_base), str(source)).save_pretrained(
        str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    engine = Engine(lora_base, dtype="float32", enable_lora=True)
    engine.register_adapter("bin", tmp_path / "bin")
    prompt = random_prompts(1, seed=32)[0]
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=12), ["bin"])
    assert result.token_ids == peft_greedy(lora_base, source, prompt, 12)
