"""TP=2 greedy answers equal TP=1's, base and LoRA, while slots are evicted and adapters come and go."""

from __future__ import annotations

import types

import pytest

from lora_serving.handler import SamplingParams
from lora_serving.handler.errors import AdapterNotFoundError
from tests.engine.test_parity import random_prompts
from tests.tp.conftest import assert_same_greedy

ADAPTER_CYCLE = [None, "r1", "r2", "r4", "r8", "r16", "r16-rslora"]


def test_mixed_adapter_batches_match_tp1(engines):
    prompts = random_prompts(14, seed=7, max_len=40)
    names = [ADAPTER_CYCLE[index % len(ADAPTER_CYCLE)] for index in range(len(prompts))]
    params = [SamplingParams(max_new_tokens=6 + index % 5) for index in range(len(prompts))]
    expected = engines.single.generate(prompts, params, names)
    slot_bytes_before = engines.parallel.ranks.comm.bytes_sent.get("adapter_weights", 0)
    actual = engines.parallel.generate(prompts, params, names)
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert_same_greedy(want, got, f"{engines.family} prompt {index} adapter {names[index]}")
    # Six adapters through three slots: slots were written again (and so sent to rank 1) during the run.
    written = engines.parallel.ranks.comm.bytes_sent["adapter_weights"] - slot_bytes_before
    largest_three = sorted(_adapter_bytes(engines.parallel, name) for name in ADAPTER_CYCLE[1:])[-3:]
    assert written > sum(largest_three)
    tiers = [info.tier for info in engines.parallel.list_adapters()]
    assert tiers.count("device") <= 3


def test_register_update_unregister_while_serving(engines):
    expected = _serve_while_changing_adapters(engines.single, engines.adapters)
    actual = _serve_while_changing_adapters(engines.parallel, engines.adapters)
    assert expected.keys() == actual.keys()
    for request_id in expected:
        assert_same_greedy(expected[request_id], actual[request_id], f"{engines.family} {request_id}")


def test_collectives_carry_what_the_sharding_plan_counts(engines):
    engine = engines.parallel
    plan = engine.model.plan
    [prompt] = random_prompts(1, seed=1000 + len(engines.family), min_len=20, max_len=20)  # not cached before
    comm = engine.ranks.comm
    for adapter, groups in ((None, ()), ("r8", ("o", "down"))):
        engine.generate([prompt[:5]], SamplingParams(max_new_tokens=1), [adapter])  # the adapter into a slot
        comm.bytes_sent.clear()
        engine.generate([prompt + [len(groups) + 3]], SamplingParams(max_new_tokens=1), [adapter])  # one step
        assert comm.bytes_sent == plan.step_all_reduce_bytes(len(prompt) + 1, 4, groups, max_lora_rank=16)
    assert comm.bytes_sent["lora_o"] * 64 // 16 == comm.bytes_sent["o"]  # R = 16 values a token, not hidden = 64


def _serve_while_changing_adapters(engine, adapters) -> dict[str, types.SimpleNamespace]:
    """Requests keep running while an adapter is registered, another updated to other files, and one
    unregistered with its request still running; the same script on any engine."""
    prompts = random_prompts(6, seed=21, min_len=4, max_len=12)
    results: dict[str, types.SimpleNamespace] = {}

    def add(request_id: str, prompt, adapter: str | None, new_tokens: int = 10) -> None:
        engine.add_request(request_id, prompt, SamplingParams(max_new_tokens=new_tokens), adapter=adapter)
        results[request_id] = types.SimpleNamespace(token_ids=[], log_probs=[])

    engine.register_adapter("swap", adapters["r4"])
    add("base", prompts[0], None, 16)
    add("r2", prompts[1], "r2", 16)
    add("swap-old", prompts[2], "swap")
    step = 0
    while engine.has_unfinished_requests():
        if step == 2:
            engine.register_adapter("late", adapters["r16"], preload=True)
            add("late", prompts[3], "late", 12)
        if step == 3:
            engine.update_adapter("swap", adapters["r8"])
            add("swap-new", prompts[4], "swap")
        if step == 5:
            engine.unregister_adapter("late")  # its running request finishes on the version it started with
            with pytest.raises(AdapterNotFoundError):
                engine.add_request("refused", prompts[5], SamplingParams(max_new_tokens=2), adapter="late")
        for output in engine.step():
            results[output.request_id].token_ids.extend(token.id for token in output.tokens)
            results[output.request_id].log_probs.extend(token.log_prob for token in output.tokens)
        step += 1
    engine.unregister_adapter("swap")
    assert all(len(result.token_ids) > 0 for result in results.values())
    return results


def _adapter_bytes(engine, name: str) -> int:
    info = engine.get_adapter(name)
    weights = engine.lora.host.get(info.content_hash)
    if weights is None:
        weights = engine.lora.loader.read(name, info.path)
    return weights.nbytes
