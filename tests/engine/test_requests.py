"""Requests that cannot be served are refused with a reason; aborts free everything; nobody else is hurt."""

from __future__ import annotations

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import InvalidRequestError
from tests.engine.test_parity import random_prompts
from tests.models import reference_greedy


@pytest.fixture(scope="module")
def small_cache(tiny_models):
    model_dir = tiny_models.get("llama", "llama")
    return model_dir, Engine(model_dir, dtype="float32", max_model_len=128, num_kv_blocks=12, block_size=8)


@pytest.mark.parametrize(
    "prompt,params,message",
    [
        (list(range(3, 140)), SamplingParams(max_new_tokens=1), "more than the model's maximum length 128"),
        (list(range(3, 100)), SamplingParams(max_new_tokens=40), "exceeds the model's maximum length 128"),
        ([0, 5, 99999], SamplingParams(), "token id 99999 is outside the vocabulary"),
        ([], SamplingParams(), "the prompt is empty"),
        ("", SamplingParams(), "the prompt is empty"),
        ([0, "a"], SamplingParams(), "string or a list of token ids"),
    ],
)
def test_unservable_requests_are_refused_with_the_reason(small_cache, prompt, params, message):
    _, engine = small_cache
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


def test_a_request_larger_than_the_whole_cache_is_refused(tiny_models):
    engine = Engine(tiny_models.get("llama", "llama"), dtype="float32", num_kv_blocks=4, block_size=8)
    with pytest.raises(InvalidRequestError, match=r"can never fit in the KV cache \(32 tokens\)"):
        engine.add_request("huge", list(range(3, 30)), SamplingParams(max_new_tokens=10))


@pytest.mark.parametrize(
    "field,value",
    [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
     ("repetition_penalty", 0.0), ("seed", -1), ("seed", 2**64), ("stop", [""]), ("max_new_tokens", "10")],
)
def test_bad_sampling_parameters_name_the_parameter(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})


def test_duplicate_request_ids_are_refused(small_cache):
    _, engine = small_cache
    engine.add_request("dup", [0, 5, 6], SamplingParams(max_new_tokens=2))
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("dup", [0, 5, 6], SamplingParams(max_new_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()


def test_abort_frees_blocks_and_leaves_other_requests_exact(small_cache):
    model_dir, engine = small_cache
    prompts = random_prompts(3, seed=20, min_len=10, max_len=20)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, SamplingParams(max_new_tokens=12))
    engine.abort("never-existed")
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    reasons = {}
    step = 0
    while engine.has_unfinished_requests():
        if step == 3:
            engine.abort("r1")
        for output in engine.step():
            outputs[output.request_id].extend(t.id for t in output.tokens)
            if output.finished:
                reasons[output.request_id] = output.finish_reason.value
        step += 1
    assert reasons == {"r0": "length", "r1": "aborted", "r2": "length"}
    assert len(outputs["r1"]) == 3
    for name in ("r0", "r2"):
        assert outputs[name] == reference_greedy(model_dir, prompts[int(name[1])], 12)
    stats = engine.stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks and stats.num_running == stats.num_waiting == 0
