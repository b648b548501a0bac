import pytest

from tests.adapters import make_peft_adapter

# Six adapters of mixed ranks (1, 8, 16), targets and alpha; one rslora; one with per-module patterns.
ADAPTER_SPECS = {
    "r8-all": dict(r=8, alpha=16),
    "r1-qv": dict(r=1, alpha=4, targets=["q_proj", "v_proj"]),
    "r16-rslora": dict(r=16, alpha=8, use_rslora=True, targets=["o_proj", "up_proj", "down_proj"]),
    "r16-attn": dict(r=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r8-mlp": dict(r=8, alpha=8, targets=["gate_proj", "up_proj", "down_proj"]),
    "patterns": dict(r=4, alpha=8, rank_pattern={"k_proj": 16, "layers.1.mlp.down_proj": 1},
                     alpha_pattern={"q_proj": 2}),
}


@pytest.fixture(scope="session")
def lora_base(tiny_models):
    return tiny_models.get("llama", "llama")


@pytest.fixture(scope="session")
def adapters(lora_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(lora_base, root / name, seed=index, **spec)
            for index, (name, spec) in enumerate(ADAPTER_SPECS.items())}
