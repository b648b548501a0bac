"""TP=2 against TP=1 on the newer families (fused Phi-3 checkpoints and LoRA, Gemma's soft caps and sandwich
norms, per-head q/k norms): base and LoRA requests of mixed ranks in one batch. TP=1 itself is checked
against transformers and PEFT in tests/engine/test_families.py."""

from __future__ import annotations

import pytest

from lora_serving.handler import Engine, SamplingParams
from tests.adapters import make_peft_adapter
from tests.engine.test_parity import random_prompts
from tests.models import NEWER_FAMILIES, peft_targets
from tests.tp.conftest import assert_same_greedy

OPTIONS = dict(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, max_rolling_batch_size=8,
               cpu_kv_cache_mb=16, max_model_len=256, max_num_batched_tokens=32)


@pytest.mark.parametrize("family", NEWER_FAMILIES)
def test_tensor_parallel_family_matches_tp1(tiny_models, tmp_path, family):
    base = tiny_models.get(family, family)
    targets = peft_targets(family)
    adapters = {"r16": make_peft_adapter(base, tmp_path / "r16", r=16, alpha=8, targets=targets, seed=21),
                "r2": make_peft_adapter(base, tmp_path / "r2", r=2, alpha=4, targets=targets, seed=22)}
    prompts = random_prompts(6, seed=23, max_len=40)
    names = [None, "r16", "r2"] * 2
    params = SamplingParams(max_new_tokens=8)
    results = []
    for degree in (1, 2):
        engine = Engine(base, tensor_parallel_degree=degree, **OPTIONS)
        try:
            for name, path in adapters.items():
                engine.register_adapter(name, path)
            results.append(engine.generate(prompts, params, names))
        finally:
            engine.close()
    for index, (want, got) in enumerate(zip(*results)):
        assert_same_greedy(want, got, f"{family} prompt {index} adapter {names[index]}")
