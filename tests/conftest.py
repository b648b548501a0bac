from pathlib import Path

import pytest

from lora_serving.container.demo.tokenizer import build_tokenizer
from tests.models import TinyModelFactory
from tests.real_model import TEST_CACHE_DIR, build_smollm2, build_smollm2_adapters, missing_requirements


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModelFactory:
    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = build_tokenizer(root / "tokenizer", vocab_size=1024)
    return TinyModelFactory(root, tokenizer)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HuggingFaceTB/SmolLM2-135M-Instruct as its Hub repo holds it, built once per machine (tests/real_model.py)."""
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    return build_smollm2(TEST_CACHE_DIR)


@pytest.fixture(scope="session")
def smollm2_adapters(smollm2_dir) -> dict[str, Path]:
    """PEFT adapters for SmolLM2 by name, built once per machine: two random, one trained (PIRATE_ADAPTER)."""
    return build_smollm2_adapters(TEST_CACHE_DIR, smollm2_dir)
