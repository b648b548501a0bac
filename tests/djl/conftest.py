"""The real DJL Python worker, one per test module, over the tiny test model laid out as an LMI model
directory (serving.properties, `adapters/a1`, `adapters/a2`), driven by the test front end.

The worker comes from ../shared/third_party/djl-serving (or $DJL_SERVING_DIR). Where that copy is absent
the tests say so and skip; with LORA_SERVING_REQUIRE_DJL=1 (set by .ci/run) they fail instead.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.adapters import peft_greedy
from tests.djl.front_end import ClientRequest, DjlFrontEnd
from tests.djl.worker import djl_serving_dir
from tests.server.conftest import lmi_model_dir, server_adapters, server_base  # noqa: F401  (fixtures, reused)

PROMPT = "the white fish eats"
OTHER_PROMPT = "one two three four"
NEW_TOKENS = 8
# serving.properties of the model directory, as an LMI user writes it for this handler.
DJL_PROPERTIES = {
    "engine": "Python",
    "option.entryPoint": "lora_serving.handler.model",
    "option.dtype": "fp32",
    "option.enable_lora": "true",
    "option.max_loras": "2",
    "option.max_cpu_loras": "4",
    "option.max_lora_rank": "16",
    "option.max_model_len": "256",
    "option.cpu_kv_cache_mb": "64",
    "option.max_rolling_batch_size": "8",
}
MODES = {
    "rolling_batch": {"option.rolling_batch": "auto"},
    "async": {"option.rolling_batch": "disable", "option.async_mode": "true"},
    "plain": {"option.rolling_batch": "disable"},
}


@pytest.fixture(scope="session")
def djl_dir() -> Path:
    found = djl_serving_dir()
    if found is None:
        message = ("DJL Serving's Python worker was not found: these tests need ../shared/third_party/djl-serving "
                   "(or DJL_SERVING_DIR) holding engines/python/setup/djl_python_engine.py")
        if os.environ.get("LORA_SERVING_REQUIRE_DJL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
def djl_python_importable(djl_dir):
    """djl_python on sys.path, for tests that call the handler in this process."""
    setup_dir = str(djl_dir / "engines/python/setup")
    if setup_dir not in sys.path:
        sys.path.insert(0, setup_dir)
    return setup_dir


@contextmanager
def running_worker(djl_dir: Path, model_dir: Path, sock_dir: Path, extra_env: dict[str, str] | None = None):
    front_end = DjlFrontEnd(djl_dir, model_dir, sock_dir, extra_env=extra_env)
    try:
        front_end.start()
        yield front_end
    finally:
        front_end.stop()


def front_end_fixture(mode: str):
    """A module-scoped `front_end` fixture: a worker in `mode` over the tiny model with adapters a1, a2."""

    @pytest.fixture(scope="module")
    def front_end(djl_dir, server_base, server_adapters, tmp_path_factory):  # noqa: F811
        root = tmp_path_factory.mktemp(f"djl-{mode}")
        model_dir = djl_model_dir(server_base, server_adapters, root / "model", mode)
        with running_worker(djl_dir, model_dir, root) as running:
            yield running

    return front_end


def djl_model_dir(base: Path, adapters: dict[str, Path], out_dir: Path, mode: str, **extra: str) -> Path:
    properties = {**DJL_PROPERTIES, **MODES[mode], **{f"option.{key}": value for key, value in extra.items()}}
    return lmi_model_dir(base, out_dir, properties, adapters)


@pytest.fixture(scope="session")
def expected(server_base, server_adapters):  # noqa: F811
    """PEFT's greedy answer (token ids) for a prompt and adapter (None: the base model), computed once."""
    tokenizer = AutoTokenizer.from_pretrained(str(server_base))
    cache: dict[tuple, list[int]] = {}

    def greedy(prompt: str, adapter: str | None, new_tokens: int = NEW_TOKENS) -> list[int]:
        key = (prompt, adapter, new_tokens)
        if key not in cache:
            adapter_dir = server_adapters[adapter] if adapter else None
            cache[key] = peft_greedy(server_base, adapter_dir, tokenizer(prompt)["input_ids"], new_tokens)
        return cache[key]

    return greedy


def generate(prompt: str = PROMPT, adapter: str | None = None, new_tokens: int = NEW_TOKENS, *, stream: bool = False,
             **headers: str) -> ClientRequest:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "details": True}}
    if adapter is not None:
        body["adapters"] = adapter
    if stream:
        body["stream"] = True
    return ClientRequest.json(body, **headers)


def token_ids(answer: dict) -> list[int]:
    return [token["id"] for token in answer["details"]["tokens"]]


def streamed_ids(records: list[dict]) -> list[int]:
    return [record["token"]["id"] for record in records]
