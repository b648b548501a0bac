"""The newer families (tests/models.py NEWER_FAMILIES) against transformers and PEFT in fp32, greedy: base
requests and requests of two adapters of mixed ranks (every module PEFT may target on the family, between
them) in one batch, over the paged KV cache with small blocks, prompts prefilled in chunks, and shared
prefixes served from the prefix cache on a second round."""

from __future__ import annotations

import random

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import ModelLoadError
from lora_serving.handler.models import MODEL_FAMILIES
from tests.adapters import make_peft_adapter, peft_greedy
from tests.engine.test_parity import random_prompts
from tests.models import NEWER_FAMILIES, peft_targets


def prompts_with_shared_prefixes(count: int, seed: int) -> list[list[int]]:
    """Half of them extend one 26-token prefix (longer than the tiny models' sliding windows)."""
    rng = random.Random(seed)
    prefix = random_prompts(1, seed=seed, min_len=25, max_len=25)[0]
    prompts = random_prompts(count, seed=seed + 1, min_len=3, max_len=30)
    return [prefix + prompt[1:] if index % 2 else prompt for index, prompt in enumerate(prompts)] + [prefix[: rng.randint(8, 20)]]


@pytest.mark.parametrize("family", NEWER_FAMILIES)
def test_family_matches_transformers_and_peft(tiny_models, tmp_path, family):
    base = tiny_models.get(family, family)
    targets = peft_targets(family)
    adapters = {
        "all-r8": make_peft_adapter(base, tmp_path / "all-r8", r=8, alpha=16, targets=targets, seed=11),
        # Rank 2 on most modules and 16 on the first: ranks mixed inside one adapter too.
        "mixed": make_peft_adapter(base, tmp_path / "mixed", r=2, alpha=4, targets=targets[::2] + targets[-1:],
                                   rank_pattern={targets[0]: 16}, seed=12),
    }
    engine = Engine(base, dtype="float32", enable_lora=True, max_loras=2, max_rolling_batch_size=6, block_size=4,
                    max_num_batched_tokens=24)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    prompts = prompts_with_shared_prefixes(7, seed=40)
    names = [(None, "all-r8", "mixed")[index % 3] for index in range(len(prompts))]
    max_new = [random.Random(index).randint(6, 14) for index in range(len(prompts))]
    params = [SamplingParams(max_new_tokens=n) for n in max_new]
    first = engine.generate(prompts, params, names)
    hits_before = engine.stats().prefix_cache_hit_tokens
    again = engine.generate(prompts[::-1], params[::-1], names[::-1])
    assert engine.stats().prefix_cache_hit_tokens > hits_before  # the second round reused cached blocks
    for prompt, name, new_tokens, result, repeat in zip(prompts, names, max_new, first, again[::-1]):
        expected = peft_greedy(base, adapters[name] if name else None, prompt, new_tokens)
        assert result.token_ids == expected == repeat.token_ids, f"{family} adapter {name}"
    # The adapters really change the answers (a test passing without LoRA would be worthless).
    changed = [result.token_ids != peft_greedy(base, None, prompt, n)
               for prompt, name, n, result in zip(prompts, names, max_new, first) if name]
    assert sum(changed) >= len(changed) - 1


def test_unknown_model_type_is_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelLoadError) as refused:
        Engine(tmp_path, dtype="float32")
    assert "'gpt2'" in str(refused.value)
    assert all(family in str(refused.value) for family in MODEL_FAMILIES)


def test_longrope_is_refused_naming_it(tiny_models):
    rotary_half = 16 * 3 // 4 // 2  # head_dim 16, partial_rotary_factor 0.75
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0] * rotary_half, "long_factor": [2.0] * rotary_half,
                "original_max_position_embeddings": 64}
    model_dir = tiny_models.get("phi3-longrope", "phi3", rope_parameters=longrope, original_max_position_embeddings=64)
    with pytest.raises(ModelLoadError, match="'longrope' is not supported"):
        Engine(model_dir, dtype="float32")
