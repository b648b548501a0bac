"""Greedy output of the engine equals transformers' generate(), token for token, in fp32."""

from __future__ import annotations

import random

import pytest

from lora_serving.handler import Engine, SamplingParams
from tests.models import reference_greedy

FAMILIES = ["llama", "mistral", "qwen2"]


def random_prompts(count: int, seed: int, min_len: int = 3, max_len: int = 60, vocab_size: int = 1024):
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def run_staggered(engine: Engine, prompts, max_new_tokens, join_every: int = 2, per_join: int = 3):
    """Add a few requests every few steps, so sequences join a running batch at different steps."""
    pending = list(enumerate(prompts))
    results: dict[int, list[int]] = {}
    finished: set[int] = set()
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % join_every == 0:
            for _ in range(per_join):
                if pending:
                    index, prompt = pending.pop(0)
                    engine.add_request(str(index), prompt, SamplingParams(max_new_tokens=max_new_tokens[index]))
                    results[index] = []
        for output in engine.step():
            results[int(output.request_id)].extend(token.id for token in output.tokens)
            if output.finished:
                finished.add(int(output.request_id))
        step += 1
    assert finished == set(range(len(prompts)))
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("family", FAMILIES)
def test_single_prompts_match_transformers(tiny_models, family):
    model_dir = tiny_models.get(family, family)
    engine = Engine(model_dir, dtype="float32")
    text_prompt = "hello world, the model answers 中文 🚀"
    text_ids = engine.tokenizer(text_prompt)["input_ids"]
    for prompt, prompt_ids in [(text_prompt, text_ids)] + [(p, p) for p in random_prompts(2, seed=1)]:
        [result] = engine.generate([prompt], SamplingParams(max_new_tokens=24))
        assert result.prompt_token_ids == prompt_ids
        assert result.token_ids == reference_greedy(model_dir, prompt_ids, 24)


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_prompts_joining_at_different_steps(tiny_models, family):
    model_dir = tiny_models.get(family, family)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=8)
    prompts = random_prompts(18, seed=2)
    max_new = [random.Random(i).randint(4, 30) for i in range(len(prompts))]
    outputs = run_staggered(engine, prompts, max_new)
    for prompt, new_tokens, output in zip(prompts, max_new, outputs):
        assert output == reference_greedy(model_dir, prompt, new_tokens)
    assert engine.stats().num_free_kv_blocks == engine.stats().num_kv_blocks


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_preemption_under_a_tiny_kv_cache_keeps_outputs_exact(tiny_models, family):
    model_dir = tiny_models.get(family, family)
    # 64 cache tokens for 16 requests of up to ~45 tokens each: the newest must be preempted repeatedly.
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=8, num_kv_blocks=16, block_size=4)
    prompts = random_prompts(16, seed=3, min_len=5, max_len=25)
    max_new = [random.Random(100 + i).randint(10, 20) for i in range(len(prompts))]
    outputs = run_staggered(engine, prompts, max_new, join_every=1, per_join=4)
    assert engine.stats().preemptions > 0
    for prompt, new_tokens, output in zip(prompts, max_new, outputs):
        assert output == reference_greedy(model_dir, prompt, new_tokens)
    assert engine.stats().num_free_kv_blocks == 16


def test_eos_stops_generation_like_transformers(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    prompt = random_prompts(1, seed=4)[0]
    free_run = reference_greedy(model_dir, prompt, 20, stop_at_eos=False)
    # Declare the 6th greedy token the end-of-sequence token: both must stop right there, eos included.
    eos_dir = tiny_models.get("llama-eos", "llama", eos_token_id=free_run[5])
    engine = Engine(eos_dir, dtype="float32")
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=20))
    assert result.token_ids == reference_greedy(eos_dir, prompt, 20) == free_run[:6]
    assert result.finish_reason.value == "eos_token"
    [ignored] = engine.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert ignored.token_ids == free_run
    assert ignored.finish_reason.value == "length"


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("tied", {"tie_word_embeddings": True}),
        ("rope-linear", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
        ("rope-llama3", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}}),
        ("mha-bias", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    ],
)
def test_config_variants_match_transformers(tiny_models, name, overrides):
    model_dir = tiny_models.get(name, "llama", **overrides)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=4)
    prompts = random_prompts(4, seed=5, max_len=80)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=16))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(model_dir, prompt, 16)


def test_qwen2_sliding_window_layers_match_transformers(tiny_models):
    model_dir = tiny_models.get("qwen2-sliding", "qwen2", use_sliding_window=True, sliding_window=10,
                                max_window_layers=1)
    engine = Engine(model_dir, dtype="float32")
    assert engine.model.sliding_windows == [None, 10]
    prompts = random_prompts(3, seed=6, min_len=20, max_len=40)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=20))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(model_dir, prompt, 20)


def test_projections_packed_for_onednn_match_transformers(tiny_models):
    # Wide enough that the projections are packed for oneDNN (lora_serving/handler/models/projection.py), so that
    # decodes of one to four sequences go through the C matrix-vector kernel and larger batches through oneDNN.
    model_dir = tiny_models.get("llama-packed", "llama", hidden_size=256, intermediate_size=512)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=8)
    lm_head = engine.model.lm_head
    if lm_head.backend != "onednn" or lm_head.matvec_rows == 0:
        pytest.skip("no oneDNN prepacked linear or no C kernel here: the tiny models' test covers the dense path")
    prompts = random_prompts(7, seed=7, max_len=40)
    [alone] = engine.generate(prompts[:1], SamplingParams(max_new_tokens=20))
    assert alone.token_ids == reference_greedy(model_dir, prompts[0], 20)
    max_new = [random.Random(200 + i).randint(6, 24) for i in range(len(prompts))]
    outputs = run_staggered(engine, prompts, max_new, join_every=3, per_join=2)  # batches of 1 to 7
    for prompt, new_tokens, output in zip(prompts, max_new, outputs):
        assert output == reference_greedy(model_dir, prompt, new_tokens)
