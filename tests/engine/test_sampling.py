"""Per-request sampling: seeds, filters, penalties, stop strings and log-probs."""

from __future__ import annotations

import pytest
import torch

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.sampler import greedy_choices
from tests.engine.test_parity import random_prompts
from tests.models import reference_greedy, reference_model


@pytest.fixture(scope="module")
def llama(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    return model_dir, Engine(model_dir, dtype="float32", max_rolling_batch_size=16)


def test_same_seed_same_output_whatever_shares_the_batch(llama):
    _, engine = llama
    prompt = random_prompts(1, seed=10)[0]
    seeded = SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.3, top_p=0.95, seed=1234)
    [alone] = engine.generate([prompt], seeded)
    others = random_prompts(6, seed=11)
    mixed = engine.generate(
        others[:3] + [prompt] + others[3:],
        [SamplingParams(max_new_tokens=25, do_sample=True, temperature=1.0)] * 3
        + [seeded]
        + [SamplingParams(max_new_tokens=9)] * 3,
    )
    assert mixed[3].token_ids == alone.token_ids
    [other_seed] = engine.generate([prompt], SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.3,
                                                            top_p=0.95, seed=99))
    assert other_seed.token_ids != alone.token_ids


def test_sampling_degenerates_to_greedy(llama):
    model_dir, engine = llama
    prompt = random_prompts(1, seed=12)[0]
    greedy = reference_greedy(model_dir, prompt, 15)
    for params in (
        SamplingParams(max_new_tokens=15, do_sample=True, top_k=1, seed=3),
        SamplingParams(max_new_tokens=15, do_sample=True, temperature=0.0),
        SamplingParams(max_new_tokens=15, do_sample=False, temperature=5.0),  # LMI: do_sample=false is greedy
        SamplingParams(max_new_tokens=15, do_sample=True, top_p=1e-6, seed=4),
    ):
        assert engine.generate([prompt], params)[0].token_ids == greedy


def test_extreme_parameters_never_fail_the_step(llama):
    """Scaled logits that overflow to infinity (a tiny temperature or repetition penalty) take their limit
    instead of making NaN probabilities, which would fail every request in the step."""
    model_dir, engine = llama
    prompts = random_prompts(6, seed=16)
    extreme = [
        SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e-300, seed=7),
        SamplingParams(max_new_tokens=8, do_sample=True, repetition_penalty=1e-300, seed=8),
        SamplingParams(max_new_tokens=8, do_sample=True, repetition_penalty=1e300, temperature=1e-30, seed=9),
        SamplingParams(max_new_tokens=8, do_sample=True, temperature=1e300, top_p=1e-300, seed=10),
        SamplingParams(max_new_tokens=8, do_sample=True, temperature=float("inf"), top_k=2, seed=11),
    ]
    results = engine.generate(prompts, extreme + [SamplingParams(max_new_tokens=8)])
    assert [result.finish_reason.value for result in results] == ["length"] * 6
    assert results[0].token_ids == reference_greedy(model_dir, prompts[0], 8)  # the limit of temperature -> 0
    assert results[5].token_ids == reference_greedy(model_dir, prompts[5], 8)


def test_top_k_only_draws_from_the_k_most_likely_tokens(llama):
    model_dir, engine = llama
    prompt = random_prompts(1, seed=13)[0]
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=12, do_sample=True, top_k=3,
                                                        temperature=5.0, seed=5))
    reference = reference_model(model_dir)
    ids = torch.tensor([prompt + result.token_ids])
    logits = reference(ids).logits[0, len(prompt) - 1 : -1]
    top3 = logits.topk(3, dim=-1).indices
    assert all(token in top3[step].tolist() for step, token in enumerate(result.token_ids))
    assert len(set(result.token_ids)) > 1


def test_repetition_penalty_matches_transformers(llama):
    model_dir, engine = llama
    reference = reference_model(model_dir)
    for prompt in random_prompts(2, seed=14):
        [result] = engine.generate([prompt], SamplingParams(max_new_tokens=20, repetition_penalty=1.8))
        ids = torch.tensor([prompt])
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                      repetition_penalty=1.8, pad_token_id=2)[0, len(prompt):].tolist()
        assert result.token_ids == expected
        assert result.token_ids != reference_greedy(model_dir, prompt, 20)


def test_log_probs_are_the_models_log_softmax(llama):
    model_dir, engine = llama
    prompt = random_prompts(1, seed=15)[0]
    [result] = engine.generate([prompt], SamplingParams(max_new_tokens=10))
    ids = torch.tensor([prompt + result.token_ids])
    logits = reference_model(model_dir)(ids).logits[0, len(prompt) - 1 : -1].float()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(result.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(result.log_probs), expected, atol=1e-4)


def test_cpu_logits_kernel_gives_torchs_choices_and_log_probs(llama, monkeypatch):
    """The sampler's C pass over the logits (kernels/cpu_logits.py) against torch's argmax and log_softmax, which
    serve with the kernel switched off: greedy, sampled and processed rows in one batch."""
    from lora_serving.kernels import cpu_logits

    _, engine = llama
    prompts = random_prompts(4, seed=16)
    params = [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, do_sample=True, seed=5),
              SamplingParams(max_new_tokens=8, repetition_penalty=1.3), SamplingParams(max_new_tokens=8, top_n_tokens=2)]
    calls = []
    inner = cpu_logits.row_summaries
    monkeypatch.setattr(cpu_logits, "row_summaries", lambda logits: calls.append(logits.shape) or inner(logits))
    with_kernel = engine.generate(prompts, params)
    assert calls, "the sampler did not take the kernel on CPU"
    monkeypatch.setenv("LORA_SERVING_CPU_LOGITS", "off")
    calls.clear()
    with_torch = engine.generate(prompts, params)
    assert not calls
    for ours, theirs in zip(with_kernel, with_torch):
        assert ours.token_ids == theirs.token_ids
        assert torch.allclose(torch.tensor(ours.log_probs), torch.tensor(theirs.log_probs), atol=1e-5)


def test_stop_sequence_ends_generation_and_is_not_returned(llama):
    _, engine = llama
    prompt = "the model answers the question"
    [free] = engine.generate([prompt], SamplingParams(max_new_tokens=40, ignore_eos=True))
    text = free.text
    assert len(text) > 12
    stop = text[8:11]
    cut = text.find(stop)
    [stopped] = engine.generate([prompt], SamplingParams(max_new_tokens=40, stop=["zzzz-never", stop]))
    assert stopped.finish_reason.value == "stop_sequence"
    assert stopped.text == text[:cut]
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert len(stopped.token_ids) < 40


def test_streamed_pieces_add_up_to_the_final_text(llama):
    _, engine = llama
    engine.add_request("stream", "hello world 中文 🚀", SamplingParams(max_new_tokens=30, stop=["\n\n"]))
    pieces, finished = [], False
    while not finished:
        for output in engine.step():
            pieces.extend(token.text for token in output.tokens)
            finished = output.finished
    [again] = engine.generate(["hello world 中文 🚀"], SamplingParams(max_new_tokens=30, stop=["\n\n"]))
    assert "".join(pieces) == again.text


def test_greedy_choices_are_argmax_with_its_ties_and_nan():
    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = logits[0, 40000] = 100.0  # a tie: the first
    logits[1, 30000:] = 100.0
    logits[2, 5] = float("nan")  # NaN wins, as in argmax
    logits[3] = 0.0
    assert torch.equal(greedy_choices(logits), logits.argmax(dim=-1))
    assert greedy_choices(logits)[:4].tolist() == [7, 30000, 5, 0]
