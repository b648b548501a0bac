"""Tensor-parallel engines (TP=2 over gloo on this CPU) next to TP=1 engines of the same model, built once per
module: our TP=1 engine is itself checked token for token against transformers + PEFT (tests/engine,
tests/lora), so TP=2 is compared with it."""

from __future__ import annotations

import types

import pytest

from lora_serving.handler import Engine, GenerationResult
from tests.adapters import ALL_PROJECTIONS, make_peft_adapter

FAMILIES = ["llama", "mistral", "qwen2"]
# Ranks 1..16 on all seven projections, one rslora; more adapters than slots, so slots are evicted.
ADAPTER_RANKS = {"r1": 1, "r2": 2, "r4": 4, "r8": 8, "r16": 16}
ENGINE_OPTIONS = dict(dtype="float32", enable_lora=True, max_loras=3, max_cpu_loras=4, max_lora_rank=16,
                      max_rolling_batch_size=8, cpu_kv_cache_mb=16, max_model_len=256)
# A token chosen differently by the two engines is tolerated only when both log-probabilities are equal
# within float noise: a near-tie that the order of the ranks' partial sums can flip.
NEAR_TIE_LOG_PROB = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def engines(request, tiny_models, tmp_path_factory):
    """TP=1 and TP=2 engines of one tiny model family, with the same adapters registered in each."""
    family = request.param
    model_dir = tiny_models.get(family, family)
    root = tmp_path_factory.mktemp(f"tp-adapters-{family}")
    adapters = {name: make_peft_adapter(model_dir, root / name, r=rank, alpha=2 * rank, seed=rank,
                                        targets=ALL_PROJECTIONS)
                for name, rank in ADAPTER_RANKS.items()}
    adapters["r16-rslora"] = make_peft_adapter(model_dir, root / "r16-rslora", r=16, alpha=8, use_rslora=True,
                                               seed=99)
    single = Engine(model_dir, **ENGINE_OPTIONS)
    parallel = Engine(model_dir, tensor_parallel_degree=2, **ENGINE_OPTIONS)
    try:
        for name, path in adapters.items():
            single.register_adapter(name, path, preload=False)
            parallel.register_adapter(name, path, preload=False)
        yield types.SimpleNamespace(family=family, model_dir=model_dir, adapters=adapters, single=single,
                                    parallel=parallel)
    finally:
        parallel.close()
        single.close()


def assert_same_greedy(expected: GenerationResult, actual: GenerationResult, what: str) -> None:
    """Token for token, up to the first near-tie (after which the two continuations are not comparable)."""
    for index, (want, got) in enumerate(zip(expected.token_ids, actual.token_ids)):
        if want != got:
            assert abs(expected.log_probs[index] - actual.log_probs[index]) < NEAR_TIE_LOG_PROB, (
                f"{what}: token {index} differs ({want} vs {got}) and is not a near-tie: "
                f"{expected.token_ids} vs {actual.token_ids}")
            return
    assert expected.token_ids == actual.token_ids, what
