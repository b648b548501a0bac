"""Mixtures of experts beyond parity (tests/engine/test_families.py): an expert without tokens in a step
costs nothing, and LoRA on the experts, which PEFT writes through `target_parameters`, is refused at
registration with the module named."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import InvalidAdapterError
from tests.adapters import _fresh_copy
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


def test_lora_on_experts_is_refused_naming_the_module(tiny_models, tmp_path):
    base = tiny_models.get("mixtral", "mixtral")
    config = LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"],
                        init_lora_weights=False)
    get_peft_model(_fresh_copy(base), config).save_pretrained(str(tmp_path / "experts"))
    engine = Engine(base, dtype="float32", enable_lora=True)
    with pytest.raises(InvalidAdapterError, match=r"mlp\.experts\.gate_up_proj.*servable: q_proj, k_proj, v_proj, o_proj"):
        engine.register_adapter("experts", tmp_path / "experts")
    assert engine.list_adapters() == []
