"""A Hub stand-in (tests/hub/standin.py) publishing the tiny test model and PEFT adapters as Hub repos, with
the files a real Hub repo carries besides them (pickled weights, GGUF and ONNX copies, subfolders) so that the
tests can see they are never fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lora_serving.handler.hub import HubSettings
from tests.hub.standin import HubStandin
from tests.server.conftest import server_adapters, server_base  # noqa: F401  (fixtures, reused)

GOOD_TOKEN = "hf_good_token_for_the_standin"
# Files a real repo may carry that the engine never reads: they must never be downloaded.
EXTRA_FILES = {
    "pytorch_model.bin": 20_000,
    "model.gguf": 12_000,
    "onnx/model.onnx": 11_000,
    "onnx/config.json": 2,
    "original/consolidated.00.pth": 15_000,
    "README.md": 100,
}


def with_extra_files(source: Path, out_dir: Path, extra: dict[str, int] = EXTRA_FILES) -> Path:
    shutil.copytree(source, out_dir)
    for name, size in extra.items():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_bytes(b"{}" if name.endswith(".json") else bytes(size))
    return out_dir


def sharded_copy(source: Path, out_dir: Path) -> Path:
    """The model with its weights in two shards and an index, plus a stray full copy the index does not name
    (as Mistral's repos carry consolidated.safetensors beside their shards)."""
    shutil.copytree(source, out_dir, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, shard_names in halves.items():
        save_file({name: tensors[name].contiguous() for name in shard_names}, out_dir / shard,
                  metadata={"format": "pt"})
        weight_map.update({name: shard for name in shard_names})
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    # Not even readable as safetensors: opening it at all fails the load.
    (out_dir / "consolidated.safetensors").write_bytes(b"a copy in a layout this engine does not read")
    return out_dir


@pytest.fixture(scope="session")
def second_base(tiny_models) -> Path:
    """The tiny model's architecture and tokenizer with other weights: a second commit of the same repo."""
    return tiny_models.get("llama-second-commit", "llama", seed=7)


@pytest.fixture(scope="module")
def hub(server_base, second_base, server_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-repos")
    standin = HubStandin().start()
    first = with_extra_files(server_base, root / "tiny-v1")
    standin.add_repo("org/tiny", first, refs=("v1",))
    standin.add_repo("org/tiny", with_extra_files(second_base, root / "tiny-main"), refs=("main",))
    standin.add_repo("org/sharded", sharded_copy(server_base, root / "sharded"))
    standin.add_repo("org/gated", server_base, gated=True, tokens=(GOOD_TOKEN,))
    standin.add_repo("org/private", server_base, private=True, tokens=(GOOD_TOKEN,))
    no_weights = with_extra_files(server_base, root / "no-weights", {"pytorch_model.bin": 20_000})
    (no_weights / "model.safetensors").unlink()
    standin.add_repo("org/bin-only", no_weights)
    for name, adapter_dir in server_adapters.items():
        standin.add_repo(f"org/adapter-{name}", with_extra_files(adapter_dir, root / f"adapter-{name}",
                                                                 {"adapter_model.bin": 20_000, "README.md": 10}))
    standin.add_repo("org/gated-adapter", server_adapters["a1"], gated=True, tokens=(GOOD_TOKEN,))
    yield standin
    standin.close()


@pytest.fixture
def settings(hub, tmp_path) -> HubSettings:
    """A fresh Hub cache per test, so that each test sees its own downloads."""
    return HubSettings(endpoint=hub.endpoint, token=None, cache_dir=tmp_path / "hf-cache", offline=False)


def hub_env(hub: HubStandin, cache_dir: Path, **extra: str) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache_dir), **extra}
