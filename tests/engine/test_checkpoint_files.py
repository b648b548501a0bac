"""Which safetensors files of a model directory the engine reads: a sharded checkpoint's index decides, so a
copy in another layout beside the shards (Mistral's consolidated.safetensors) is never read as well."""

from __future__ import annotations

import pytest

from lora_serving.handler import Engine, SamplingParams
from lora_serving.handler.errors import ModelLoadError
from tests.engine.test_parity import random_prompts
from tests.hub.conftest import sharded_copy
from tests.models import reference_greedy


def test_a_sharded_checkpoint_reads_the_shards_its_index_names(tiny_models, tmp_path):
    model_dir = sharded_copy(tiny_models.get("llama", "llama"), tmp_path / "sharded")
    assert (model_dir / "consolidated.safetensors").is_file()  # unreadable: opening it fails the load
    engine = Engine(model_dir, dtype="float32")
    prompts = random_prompts(2, seed=40)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    assert [result.token_ids for result in results] == [reference_greedy(model_dir, prompt, 6) for prompt in prompts]


def test_an_index_naming_a_missing_shard_is_refused_naming_it(tiny_models, tmp_path):
    model_dir = sharded_copy(tiny_models.get("llama", "llama"), tmp_path / "sharded")
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="names shards that are not in .*model-00002-of-00002.safetensors"):
        Engine(model_dir, dtype="float32")
