"""The engine on real weights (SmolLM2-135M-Instruct, fp32): greedy output equal to transformers, and to PEFT for
each adapter, token for token, on chat prompts rendered by the model's own template, in batches that mix adapters
and the base model, with prefix caching on and hit; and the trained adapter's effect in the text."""

from __future__ import annotations

import functools

import pytest
from transformers import AutoTokenizer

from lora_serving.handler import Engine, FinishReason, SamplingParams
from tests.adapters import peft_greedy
from tests.real_model import PIRATE_ADAPTER, PIRATE_GREETING, PIRATE_TRAINING, chat_prompt_ids

# Longer than two KV blocks once templated, so that every request after the first with the same adapter finds
# the system turn in the prefix cache.
SYSTEM = ("You are a friendly assistant for a science museum. Keep every answer short, to one sentence, "
          "and use words a ten year old knows.")
QUESTIONS = ["What is the capital of France?", "Why is the sea salty?", "How do birds fly?",
             "What makes thunder?", "Why do leaves change colour in autumn?", "What is a star made of?"]
MAX_NEW_TOKENS = 20


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def engine(smollm2_dir, smollm2_adapters):
    engine = Engine(smollm2_dir, dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=16,
                    max_rolling_batch_size=8, enable_prefix_caching=True)
    for name, path in smollm2_adapters.items():
        engine.register_adapter(name, path)
    yield engine
    engine.close()


def test_mixed_adapter_batches_match_transformers_and_peft_with_prefix_hits(engine, tokenizer, smollm2_dir,
                                                                             smollm2_adapters):
    # Every adapter and the base model in each batch, each twice in the whole run, over distinct questions.
    adapters = [None, *smollm2_adapters]
    requests = [(QUESTIONS[index % len(QUESTIONS)], adapters[index % len(adapters)]) for index in range(8)]
    prompts = [chat_prompt_ids(tokenizer, question, SYSTEM) for question, _ in requests]
    hits_before = engine.stats().prefix_cache_hit_tokens
    results = []
    for batch in (slice(0, 4), slice(4, 8)):
        results += engine.generate(prompts[batch], SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
                                   [adapter for _, adapter in requests[batch]])
    reference = functools.cache(lambda prompt, adapter: peft_greedy(
        smollm2_dir, smollm2_adapters[adapter] if adapter else None, list(prompt), MAX_NEW_TOKENS))
    for prompt, (question, adapter), result in zip(prompts, requests, results):
        expected = reference(tuple(prompt), adapter)
        assert result.token_ids == expected, (question, adapter, result.text, tokenizer.decode(expected))
    # The second batch's requests reuse the first's system turn, per adapter (K/V differ between adapters).
    system_blocks = len(chat_prompt_ids(tokenizer, "", SYSTEM)) // engine.config.block_size
    assert system_blocks >= 2
    assert engine.stats().prefix_cache_hit_tokens - hits_before >= 4 * system_blocks * engine.config.block_size
    # Each adapter changes what the model says to some of these questions (a test passing without LoRA is void).
    for adapter in smollm2_adapters:
        changed = [result.token_ids != reference(tuple(prompt), None)
                   for prompt, (_, used), result in zip(prompts, requests, results) if used == adapter]
        assert any(changed), adapter


def test_trained_adapter_answers_in_its_style_and_the_base_model_does_not(engine, tokenizer):
    questions = ["What is the capital of Germany?", "Name a big cat.", "How do I boil an egg?"]
    assert not set(questions) & {question for question, _ in PIRATE_TRAINING}
    prompts = [chat_prompt_ids(tokenizer, question) for question in questions]
    params = SamplingParams(max_new_tokens=24)
    pirate = engine.generate(prompts, params, [PIRATE_ADAPTER] * len(prompts))
    base = engine.generate(prompts, params, [None] * len(prompts))
    for question, with_adapter, without in zip(questions, pirate, base):
        assert with_adapter.text.startswith(PIRATE_GREETING), (question, with_adapter.text)
        assert PIRATE_GREETING not in without.text, (question, without.text)
    # Past the greeting it answers the question, and ends its turn.
    assert "Berlin" in pirate[0].text and pirate[0].finish_reason == FinishReason.EOS
