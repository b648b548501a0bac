import pytest

from lora_serving.container.demo.tokenizer import build_tokenizer
from tests.models import TinyModelFactory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModelFactory:
    root = tmp_path_factory.mktemp("tiny-models")
    tokenizer = build_tokenizer(root / "tokenizer", vocab_size=1024)
    return TinyModelFactory(root, tokenizer)
