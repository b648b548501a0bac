"""The compiled decode step (handler/runner/compiled_decode.py) answers as the eager forward does, token for token in
fp32: in mixed batches of adapters and base requests, with the prefix cache and chunked prefill putting prefill
chunks and decodes in the same steps, across changes of torch's thread count; steps outside its buckets (prefills,
batches above max_compiled_batch_size) run eagerly; a compile that fails leaves every step eager.

The models are wider than the other engine tests' (hidden 256), so that their larger projections are packed for
oneDNN and reach the graph as the projection op, while the smaller ones are traced as plain matmuls: both forms.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lora_serving.container.demo.random_model import save_random_model
from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import ConfigError
from lora_serving.handler.runner.compiled_decode import CompiledDecode
from tests.adapters import make_peft_adapter
from tests.engine.test_parity import random_prompts
from tests.engine.test_prefix_cache import run_staggered
from tests.models import FAMILY_OVERRIDES, TINY_SHAPE

WIDE = dict(hidden_size=256, intermediate_size=768)


@pytest.fixture(scope="module")
def wide_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled-decode")
    built = {}

    def get(family: str):
        if family not in built:
            options = {**TINY_SHAPE, **FAMILY_OVERRIDES[family], **WIDE}
            built[family] = save_random_model(root / family, family, tokenizer=tiny_models.tokenizer, **options)
        return built[family]

    return get


@pytest.fixture(scope="module")
def llama_with_adapters(wide_models, tmp_path_factory):
    base = wide_models("llama")
    root = tmp_path_factory.mktemp("compiled-adapters")
    return base, {
        "all": make_peft_adapter(base, root / "all", r=8, alpha=16, seed=3),
        "attn": make_peft_adapter(base, root / "attn", r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                                  seed=4),
    }


def engine_for(base, adapters=None, **options) -> Engine:
    options = {"dtype": "float32", "max_rolling_batch_size": 6, "block_size": 4, **options}
    if adapters:
        options.update(enable_lora=True, max_loras=2)
    engine = Engine(base, **options)
    for name, path in (adapters or {}).items():
        engine.register_adapter(name, path)
    return engine


def mixed_jobs(seed: int) -> list[tuple[list[int], str | None, int]]:
    """Prompts that share a prefix (prefix cache hits), some long enough to be prefilled in chunks, each under an
    adapter or none, with different lengths so that the batch grows and shrinks."""
    prompts = random_prompts(10, seed=seed, min_len=4, max_len=40)
    shared = prompts[0][:20]
    prompts += [shared + prompt[1:9] for prompt in prompts[:4]]
    adapters = ("all", None, "attn")
    return [(prompt, adapters[index % 3], 6 + (5 * index) % 13) for index, prompt in enumerate(prompts)]


class EagerDecodeCounter:
    """Counts the decode-only steps that the eager forward ran (the compiled ones do not go through it)."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        forward = engine.runner.model.forward

        def counting(input_ids, ctx, kv_cache):
            if not ctx.prefills:
                self.count += 1
            return forward(input_ids, ctx, kv_cache)

        engine.runner.model.forward = counting


def test_compiled_equals_eager_with_lora_prefix_cache_and_chunked_prefill(llama_with_adapters):
    base, adapters = llama_with_adapters
    options = dict(max_num_batched_tokens=24, enable_prefix_caching=True)
    compiled = engine_for(base, adapters, enforce_eager="false", **options)
    eager = engine_for(base, adapters, enforce_eager="true", **options)
    assert compiled.runner.compiled_decode.ready and eager.runner.compiled_decode is None
    counter = EagerDecodeCounter(compiled)
    jobs = mixed_jobs(seed=1)
    assert run_staggered(compiled, jobs) == run_staggered(eager, jobs)
    assert compiled.stats().prefix_cache_hit_tokens > 0
    # Every decode-only step ran compiled; the steps with prefill chunks (beside decodes or not) ran eagerly.
    assert compiled.runner.compiled_decode.steps >= 8 and counter.count == 0


def test_a_decode_batch_above_the_buckets_runs_eagerly(llama_with_adapters):
    base, adapters = llama_with_adapters
    compiled = engine_for(base, adapters, enforce_eager="false", max_compiled_batch_size=2)
    eager = engine_for(base, adapters, enforce_eager="true")
    counter = EagerDecodeCounter(compiled)
    prompts = random_prompts(5, seed=7, min_len=5, max_len=12)
    params = [SamplingParams(max_new_tokens=3 + 4 * index) for index in range(5)]
    names = ["all", None, "attn", "all", None]
    expected = [result.token_ids for result in eager.generate(prompts, params, names)]
    assert [result.token_ids for result in compiled.generate(prompts, params, names)] == expected
    assert counter.count > 0  # five, four, three decodes at once: the eager forward
    assert compiled.runner.compiled_decode.steps > 0  # two and one: compiled


def test_the_thread_count_can_change_between_compiled_steps(llama_with_adapters):
    """The CPU-thread policy changes torch's thread count under load: the compiled graphs must serve on."""
    base, adapters = llama_with_adapters
    compiled = engine_for(base, adapters, enforce_eager="false", cpu_threads="1")
    eager = engine_for(base, adapters, enforce_eager="true", cpu_threads="1")
    prompts = random_prompts(3, seed=9, min_len=5, max_len=20)
    params = SamplingParams(max_new_tokens=10)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 1):
            torch.set_num_threads(count)
            steps = compiled.runner.compiled_decode.steps
            answers = compiled.generate(prompts, params, ["all", None, "attn"])
            assert compiled.runner.compiled_decode.steps > steps
            assert [a.token_ids for a in answers] == [a.token_ids for a in eager.generate(prompts, params,
                                                                                          ["all", None, "attn"])]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma3_text", "phi3"])
def test_families_compiled_equal_eager(wide_models, family):
    """Sliding windows (mistral, qwen3's second layer), q/k norms (qwen3), sandwich norms, a scaled embedding and
    two RoPE tables (gemma3), partial rotary and fused checkpoint projections (phi3)."""
    base = wide_models(family)
    compiled = engine_for(base, enforce_eager="false")
    eager = engine_for(base, enforce_eager="true")
    prompts = random_prompts(4, seed=11, min_len=4, max_len=30)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    expected = [r.token_ids for r in eager.generate(prompts, params)]
    assert [r.token_ids for r in compiled.generate(prompts, params)] == expected
    assert compiled.runner.compiled_decode.steps >= 19


def test_a_failed_compile_leaves_every_step_eager(llama_with_adapters, monkeypatch, caplog):
    base, _ = llama_with_adapters

    def untraceable(self, *inputs):
        raise RuntimeError("no graph here")

    monkeypatch.setattr(CompiledDecode, "_forward", untraceable)
    with caplog.at_level(logging.WARNING):
        engine = engine_for(base, enforce_eager="false")
    assert not engine.runner.compiled_decode.ready
    assert "compiling the decode step failed" in caplog.text
    prompts = random_prompts(2, seed=13, min_len=4, max_len=10)
    eager = engine_for(base, enforce_eager="true")
    params = SamplingParams(max_new_tokens=6)
    expected = [r.token_ids for r in eager.generate(prompts, params)]
    assert [r.token_ids for r in engine.generate(prompts, params)] == expected


def test_which_engines_compile(tiny_models, wide_models, caplog):
    tiny = tiny_models.get("llama")
    assert Engine(tiny, dtype="float32").runner.compiled_decode is None  # auto: a model of a few MB stays eager
    # Gemma 2's soft-capped attention logits are not the C kernel's form: asked for, it says why it stays eager.
    with caplog.at_level(logging.WARNING):
        engine = Engine(tiny_models.get("gemma2", "gemma2"), dtype="float32", enforce_eager="false")
    assert engine.runner.compiled_decode is None
    assert "soft-capped attention logits" in caplog.text
    with pytest.raises(ConfigError, match="enforce_eager"):
        Engine(tiny, enforce_eager="sometimes")
