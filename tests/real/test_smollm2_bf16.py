"""The engine in bf16 on real weights (SmolLM2-135M-Instruct) against transformers in bf16.

Two bf16 computations of the same model differ in rounding (summation orders, where each product is rounded),
so greedy runs may part at a near-tie and token equality proves little after that. The comparison is
therefore made along the engine's own long greedy runs: transformers scores each run in one forward pass
(teacher forcing), and at every generated position
- top-1 agreement: the engine's token is transformers' argmax at >= MIN_TOP1_AGREEMENT of the positions, and
  wherever it is not, it is a near-tie in transformers' logits (within NEAR_TIE of its top-1);
- log-probabilities: the engine's log-prob of its token is within MAX_LOG_PROB_DIFFERENCE of transformers'.
The fp32 tests (tests/real/test_smollm2_engine.py) keep token-for-token equality.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.cpu_dtype import native_bf16
from lora_serving.kernels import cpu_attention
from tests.real_model import chat_prompt_ids

QUESTIONS = ["Why is the sea salty?", "How do birds fly?", "Tell me about volcanoes.", "What is a star made of?"]
NEW_TOKENS = 128
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
    agreeing = total = 0
    for (_, tokens, _), log_probs in zip(runs, reference_log_probs):
        assert len(tokens) == NEW_TOKENS
        chosen = torch.tensor(tokens)
        best = log_probs.argmax(dim=-1)
        agreeing += int((best == chosen).sum())
        total += len(tokens)
        # Wherever transformers would have picked another token, the engine's pick is a near-tie there.
        gaps = log_probs.max(dim=-1).values - log_probs.gather(1, chosen[:, None]).squeeze(1)
        assert float(gaps.max()) <= NEAR_TIE, float(gaps.max())
    assert agreeing / total >= MIN_TOP1_AGREEMENT, f"{agreeing}/{total}"


def test_log_probs_are_within_the_stated_tolerance_of_transformers_bf16(runs, reference_log_probs):
    worst = 0.0
    for (_, tokens, engine_log_probs), log_probs in zip(runs, reference_log_probs):
        reference = log_probs.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        worst = max(worst, float((torch.tensor(engine_log_probs) - reference).abs().max()))
    assert worst <= MAX_LOG_PROB_DIFFERENCE, worst
