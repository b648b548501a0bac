"""The real demo model, built once per test session (about a minute on one core)."""

from pathlib import Path

import pytest

from lora_serving.container.demo.build import ensure_demo_model


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="session")
def demo_model_dir(demo_cache_dir) -> Path:
    return ensure_demo_model(demo_cache_dir)
