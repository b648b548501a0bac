"""Penalties, biases, min_p, typical_p and min_tokens against transformers' own logits processors, on the
same logits; and the same parameters through the engine against transformers' generate()."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TypicalLogitsWarper,
)

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.logits_processors import process_rows, warp_row
from lora_serving.handler.sequence import Sequence
from tests.engine.test_parity import random_prompts
from tests.models import reference_greedy, reference_model

VOCAB = 1024
PROMPT = [0, 5, 9, 9, 40, 7]
OUTPUT = [9, 33, 33, 33, 700]


def _seq(**params) -> Sequence:
    seq = Sequence("r", list(PROMPT), SamplingParams(max_new_tokens=20, **params))
    seq.output_token_ids = list(OUTPUT)
    return seq


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _processed(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
    rows = torch.stack([torch.zeros_like(logits), logits])  # a row without processors next to it
    process_rows(rows, [Sequence("plain", [1], SamplingParams()), seq])
    assert torch.equal(rows[0], torch.zeros_like(logits))
    return rows[1]


def _input_ids() -> torch.Tensor:
    return torch.tensor([PROMPT + OUTPUT])


def test_logit_bias_is_transformers_sequence_bias():
    bias = {5: 7.5, 33: -100.0, 1000: 0.25}
    logits = _logits(1)
    expected = SequenceBiasLogitsProcessor({(token,): value for token, value in bias.items()})(_input_ids(), logits[None])
    assert torch.allclose(_processed(_seq(logit_bias=bias), logits), expected[0])


def test_repetition_penalty_is_transformers():
    logits = _logits(2)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(_input_ids(), logits[None])
    assert torch.allclose(_processed(_seq(repetition_penalty=1.7), logits), expected[0])


def test_presence_and_frequency_penalties_follow_openais_formula():
    """transformers has no such processor: OpenAI's documented rule, over the generated tokens only."""
    logits = _logits(3)
    counts = torch.bincount(torch.tensor(OUTPUT), minlength=VOCAB).float()
    expected = logits - counts * 0.6 - (counts > 0).float() * 1.1
    assert torch.allclose(_processed(_seq(presence_penalty=1.1, frequency_penalty=0.6), logits), expected)


def test_min_tokens_is_transformers_min_new_tokens():
    logits = _logits(4)
    eos = [1, 700]
    seq = _seq(min_tokens=7, stop_token_ids=[700])
    seq.min_tokens_suppressed = (1, 700)
    expected = MinNewTokensLengthLogitsProcessor(len(PROMPT), 7, eos)(_input_ids(), logits[None])
    assert torch.equal(_processed(seq, logits), expected[0])
    seq.output_token_ids += [3, 4]  # 7 generated: nothing suppressed any more
    assert torch.equal(_processed(seq, logits), logits)


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_is_transformers(min_p):
    logits = _logits(5)
    expected = MinPLogitsWarper(min_p)(_input_ids(), TemperatureLogitsWarper(0.8)(_input_ids(), logits[None]))
    assert torch.equal(warp_row(logits, _seq(do_sample=True, temperature=0.8, min_p=min_p)), expected[0])


@pytest.mark.parametrize("typical_p", [0.2, 0.6, 0.95])
def test_typical_p_is_transformers(typical_p):
    logits = _logits(6)
    top_k = TopKLogitsWarper(200)(_input_ids(), logits[None])
    expected = TypicalLogitsWarper(typical_p)(_input_ids(), top_k)
    assert torch.equal(warp_row(logits, _seq(do_sample=True, top_k=200, typical_p=typical_p)), expected[0])


@pytest.fixture(scope="module")
def llama(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    return model_dir, Engine(model_dir, dtype="float32", max_rolling_batch_size=16)


def test_greedy_with_bias_and_min_tokens_matches_transformers_generate(llama):
    """Through the engine, in one batch with plain requests: the same tokens as generate() with the same
    processors, and the plain requests' tokens are those they get alone."""
    model_dir, engine = llama
    reference = reference_model(model_dir)
    prompts = random_prompts(4, seed=30)
    plain = [reference_greedy(model_dir, prompt, 12) for prompt in prompts[2:]]
    bias = {int(plain[0][0]): -100.0, 17: 12.0}
    results = engine.generate(prompts, [
        SamplingParams(max_new_tokens=12, logit_bias=bias),
        SamplingParams(max_new_tokens=12, min_tokens=12, repetition_penalty=1.3),
        SamplingParams(max_new_tokens=12),
        SamplingParams(max_new_tokens=12),
    ])
    generate = dict(attention_mask=None, max_new_tokens=12, do_sample=False, pad_token_id=2)
    ids = torch.tensor([prompts[0]])
    expected = reference.generate(ids, sequence_bias={(token,): value for token, value in bias.items()},
                                  **generate)[0, ids.shape[1]:].tolist()
    assert results[0].token_ids == expected
    ids = torch.tensor([prompts[1]])
    expected = reference.generate(ids, min_new_tokens=12, repetition_penalty=1.3, **generate)[0, ids.shape[1]:]
    assert results[1].token_ids == expected.tolist()
    assert [result.token_ids for result in results[2:]] == plain


def test_stop_token_ids_end_the_answer(llama):
    model_dir, engine = llama
    prompt = random_prompts(1, seed=31)[0]
    free = reference_greedy(model_dir, prompt, 10, stop_at_eos=False)
    [stopped] = engine.generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True,
                                                         stop_token_ids=[free[4]]))
    cut = free.index(free[4])
    assert stopped.token_ids == free[: cut + 1]
    assert stopped.finish_reason.value == "stop_sequence"
    # The stop token's text is not part of the answer (vLLM and TGI leave it out too).
    assert stopped.text == engine.tokenizer.decode(free[:cut], skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)
    assert engine.tokenizer.decode([free[4]]) and not stopped.text.endswith(engine.tokenizer.decode([free[4]]))


def test_top_log_probs_are_transformers_output_scores(llama):
    model_dir, engine = llama
    reference = reference_model(model_dir)
    prompt = random_prompts(1, seed=32)[0]
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=6, top_n_tokens=5, ignore_eos=True))
    ids = torch.tensor([prompt])
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=2)
    assert result.token_ids == out.sequences[0, len(prompt):].tolist()
    for step_logits, top, log_prob in zip(out.logits, result.top_tokens, result.log_probs):
        expected = torch.log_softmax(step_logits[0].float(), dim=-1).topk(5)
        assert [token.id for token in top] == expected.indices.tolist()
        assert torch.allclose(torch.tensor([token.log_prob for token in top]), expected.values, atol=1e-4)
        assert top[0].log_prob == log_prob  # greedy: the chosen token is the best, one value for it in both
        assert all(isinstance(token.text, str) for token in top)


def test_prompt_log_probs_are_a_transformers_forward_pass(llama):
    model_dir, engine = llama
    prompts = random_prompts(2, seed=33)
    results = engine.generate(prompts, [SamplingParams(max_new_tokens=3, prompt_log_probs=True),
                                        SamplingParams(max_new_tokens=3)])
    ids = torch.tensor([prompts[0]])
    log_probs = torch.log_softmax(reference_model(model_dir)(ids).logits[0, :-1].float(), dim=-1)
    expected = log_probs.gather(1, ids[0, 1:, None]).squeeze(1)
    scored = results[0].prompt_log_probs
    assert scored[0] is None and len(scored) == len(prompts[0])
    assert torch.allclose(torch.tensor(scored[1:]), expected, atol=1e-4)
    assert results[1].prompt_log_probs is None
