"""The engine in bf16 on real weights (SmolLM2-135M-Instruct) against transformers in bf16.

Two bf16 computations of the same model differ in rounding (summation orders, where each product is rounded),
so greedy runs may part at a near-tie and token equality proves little after that. The comparison is
therefore made along the engine's own long greedy runs: transformers scores each run in one forward pass
(teacher forcing), and at every generated position
- top-1 agreement: the engine's token is transformers' argmax at >= MIN_TOP1_AGREEMENT of the positions, and
  wherever it is not, it is a near-tie in transformers' logits (within NEAR_TIE of its top-1);
- log-probabilities: the engine's log-prob of its token is within MAX_LOG_PROB_DIFFERENCE of transformers'.
The same holds with adapters, against PEFT on transformers in bf16 (the bf16 LoRA kernel serves the decodes).
The fp32 tests (tests/real/test_smollm2_engine.py) keep token-for-token equality.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.cpu_dtype import native_bf16
from lora_serving.kernels import cpu_attention, torch_path
from tests.real_model import chat_prompt_ids

QUESTIONS = ["Why is the sea salty?", "How do birds fly?", "Tell me about volcanoes.", "What is a star made of?"]
NEW_TOKENS = 128
LORA_NEW_TOKENS = 64
# Stated tolerances. bf16 keeps 8 significant bits: logits of magnitude ~20 are 0.06-0.125 apart on its grid,
# and 30 layers of differently-rounded sums move them by a few such steps.
MIN_TOP1_AGREEMENT = 0.97
NEAR_TIE = 0.5
MAX_LOG_PROB_DIFFERENCE = 0.5


@pytest.fixture(scope="module")
def runs(smollm2_dir):
    """(prompt ids, the engine's greedy tokens, their log-probs) for each question, and the engine's dtype."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [chat_prompt_ids(tokenizer, question) for question in QUESTIONS]
    engine = Engine(smollm2_dir, dtype="bfloat16", max_rolling_batch_size=len(prompts), max_model_len=512)
    try:
        assert engine.dtype == torch.bfloat16
        model, runner = engine.model, engine.runner
        # The bf16 paths this test is about: oneDNN's bf16 projections and the C kernel's bf16 attention,
        # where this CPU has them (elsewhere torch's generic routes, which must agree all the same).
        expected_backend = "onednn" if native_bf16() else "dense"
        assert model.layers[0].qkv.backend == expected_backend and model.lm_head.backend == expected_backend
        assert runner.decode_form == ("kernel" if cpu_attention.serves(torch.bfloat16, "cpu") else "auto")
        results = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    finally:
        engine.close()
    return [(prompt, result.token_ids, result.log_probs) for prompt, result in zip(prompts, results)]


@pytest.fixture(scope="module")
def reference_log_probs(smollm2_dir, runs):
    """transformers' bf16 log-probs ([new tokens, vocab], fp32) at each generated position of each run."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
    scored = []
    with torch.no_grad():
        for prompt, tokens, _ in runs:
            ids = torch.tensor([prompt + tokens])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            scored.append(torch.log_softmax(logits, dim=-1))
    return scored


def test_long_greedy_runs_agree_with_transformers_bf16_at_top1(runs, reference_log_probs):
    agreeing = 0
    for (_, tokens, engine_log_probs), log_probs in zip(runs, reference_log_probs):
        assert len(tokens) == NEW_TOKENS
        same, gap, _ = agreement(tokens, engine_log_probs, log_probs)
        # Wherever transformers would have picked another token, the engine's pick is a near-tie there.
        assert gap <= NEAR_TIE, gap
        agreeing += same
    assert agreeing / (len(runs) * NEW_TOKENS) >= MIN_TOP1_AGREEMENT, agreeing


def test_log_probs_are_within_the_stated_tolerance_of_transformers_bf16(runs, reference_log_probs):
    worst = max(agreement(tokens, engine_log_probs, log_probs)[2]
                for (_, tokens, engine_log_probs), log_probs in zip(runs, reference_log_probs))
    assert worst <= MAX_LOG_PROB_DIFFERENCE, worst


def agreement(tokens: list[int], engine_log_probs: list[float], log_probs: torch.Tensor) -> tuple[int, float, float]:
    """(positions where the engine's token is the reference's argmax, the largest near-tie gap, the largest
    log-prob difference) along one run."""
    chosen = torch.tensor(tokens)
    picked = log_probs.gather(1, chosen[:, None]).squeeze(1)
    return (int((log_probs.argmax(dim=-1) == chosen).sum()), float((log_probs.max(dim=-1).values - picked).max()),
            float((torch.tensor(engine_log_probs) - picked).abs().max()))


def test_adapters_in_bf16_agree_with_peft_bf16(smollm2_dir, smollm2_adapters, monkeypatch):
    kernel_calls = []
    original = torch_path.cpu_native.add
    monkeypatch.setattr(torch_path.cpu_native, "add", lambda *args: kernel_calls.append(1) or original(*args))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    names = sorted(smollm2_adapters)
    prompts = [chat_prompt_ids(tokenizer, QUESTIONS[index % len(QUESTIONS)]) for index in range(len(names))]
    engine = Engine(smollm2_dir, dtype="bfloat16", enable_lora=True, max_loras=len(names), max_lora_rank=16,
                    max_rolling_batch_size=len(names), max_model_len=512)
    try:
        for name in names:
            engine.register_adapter(name, smollm2_adapters[name])
        results = engine.generate(prompts, SamplingParams(max_new_tokens=LORA_NEW_TOKENS, ignore_eos=True), names)
    finally:
        engine.close()
    assert kernel_calls, "the decodes' LoRA did not go through the C kernel"
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, smollm2_adapters[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(smollm2_adapters[name], adapter_name=name)
    agreeing = 0
    with torch.no_grad():
        for name, prompt, result in zip(names, prompts, results):
            model.set_adapter(name)
            logits = model(input_ids=torch.tensor([prompt + result.token_ids])).logits[0, len(prompt) - 1 : -1]
            same, gap, difference = agreement(result.token_ids, result.log_probs,
                                              torch.log_softmax(logits.float(), dim=-1))
            assert gap <= NEAR_TIE and difference <= MAX_LOG_PROB_DIFFERENCE, (name, gap, difference)
            agreeing += same
    assert agreeing / (len(names) * LORA_NEW_TOKENS) >= MIN_TOP1_AGREEMENT, agreeing
