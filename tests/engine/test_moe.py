"""Mixtures of experts beyond parity (tests/engine/test_families.py): an expert without tokens in a step
costs nothing; LoRA on the experts, which PEFT writes through `target_parameters`, equals PEFT in batches
mixed with base requests; LoRA on the router is refused at registration with the parameter named."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import InvalidAdapterError
from lora_serving.handler.lora.peft_adapter import load_peft_adapter
from tests.adapters import make_peft_adapter, peft_greedy
from tests.engine.test_parity import random_prompts


class CountingProjection:
    def __init__(self, projection, calls: list[int], expert: int) -> None:
        self.projection, self.calls, self.expert = projection, calls, expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.expert)
        return self.projection(x)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_only_experts_with_tokens_are_computed(tiny_models, family):
    engine = Engine(tiny_models.get(family, family), dtype="float32")
    model = engine.model
    calls: list[list[int]] = [[] for _ in model.layers]
    for layer, layer_calls in zip(model.layers, calls):
        layer.expert_gate_up = [CountingProjection(p, layer_calls, e) for e, p in enumerate(layer.expert_gate_up)]
    routed: list[set[int]] = []  # per layer, in order: the experts the step's tokens were routed to
    route = model.route
    model.route = lambda logits: routed.append(set(route(logits)[1].flatten().tolist())) or route(logits)
    [prompt] = random_prompts(1, seed=50, min_len=30, max_len=30)
    engine.add_request("one", prompt, SamplingParams(max_new_tokens=2))
    for step in ("prefill of 31 tokens", "one decode token"):
        engine.step()
        for layer_calls, experts in zip(calls, routed):
            # Each routed expert once, for all its tokens together; no other expert at all.
            assert sorted(layer_calls) == sorted(experts), step
        assert len(routed) == len(model.layers)
        if step == "one decode token":
            assert all(len(experts) == model.top_k < model.num_experts for experts in routed)
        for layer_calls in calls:
            layer_calls.clear()
        routed.clear()


EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_lora_on_experts_matches_peft(tiny_models, tmp_path, family):
    base = tiny_models.get(family, family)
    adapters = {
        "experts-r4": make_peft_adapter(base, tmp_path / "experts-r4", r=4, alpha=8, targets=["q_proj"],
                                        target_parameters=EXPERT_PARAMETERS, seed=61),
        "down-r8": make_peft_adapter(base, tmp_path / "down-r8", r=8, alpha=8, targets=["v_proj", "o_proj"],
                                     target_parameters=EXPERT_PARAMETERS[1:], seed=62),
    }
    engine = Engine(base, dtype="float32", enable_lora=True, max_loras=2, max_rolling_batch_size=6,
                    max_num_batched_tokens=24, block_size=4)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    assert engine.get_adapter("experts-r4").target_modules == ["experts.down_proj", "experts.gate_up_proj", "q_proj"]
    prompts = random_prompts(6, seed=63, min_len=10, max_len=40)
    names = [None, "experts-r4", "down-r8"] * 2
    results = engine.generate(prompts, SamplingParams(max_new_tokens=10), names)
    for prompt, name, result in zip(prompts, names, results):
        expected = peft_greedy(base, adapters[name] if name else None, prompt, 10)
        assert result.token_ids == expected, f"{family} adapter {name}"
        if name:  # the adapter really changes the answer
            assert result.token_ids != peft_greedy(base, None, prompt, 10)


def test_lora_on_the_router_is_refused_naming_it(tiny_models, tmp_path):
    base = tiny_models.get("mixtral", "mixtral")
    path = make_peft_adapter(base, tmp_path / "router", r=4, targets=["q_proj"], target_parameters=["mlp.gate.weight"])
    engine = Engine(base, dtype="float32", enable_lora=True)
    with pytest.raises(InvalidAdapterError, match=r"mlp\.gate\.weight.*servable: q_proj, k_proj, v_proj, o_proj and the "
                                                  r"experts' gate_up_proj, down_proj"):
        engine.register_adapter("router", path)
    assert engine.list_adapters() == []
    # Under tensor parallelism (where MixtralModel.expert_lora offers no expert parameters) expert LoRA is refused.
    experts = make_peft_adapter(base, tmp_path / "experts", r=4, targets=["q_proj"], target_parameters=EXPERT_PARAMETERS)
    sharded = dataclasses.replace(engine.lora.base, expert_parameters={},
                                  expert_lora_refusal="expert LoRA is not served under tensor parallelism")
    with pytest.raises(InvalidAdapterError, match=r"mlp\.experts\.(gate_up|down)_proj.*not served under tensor parallelism"):
        load_peft_adapter("experts", experts, sharded, 16, torch.float32)
