"""The real demo build (about a minute on one core, once per session): the LMI layout, PEFT-loadable
adapters that each change the greedy answer to the shared prompts, and a cache hit on the second call."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from lora_serving.container.demo import build
from lora_serving.container.demo.build import BUILD_COMPLETE_MARKER, DEMO_MODEL_DIR_NAME, ensure_demo_model
from lora_serving.container.demo.examples import (
    BASE_MODEL,
    DEMO_PROMPTS,
    DEMO_SENTENCES,
    EXAMPLE_CHAT_REQUESTS,
    EXAMPLE_REQUESTS,
    intended_answer,
)
from lora_serving.container.demo.prompts import chat_prompt
from lora_serving.container.demo.recipe import ADAPTERS, ADAPTER_NAMES, SERVING_PROPERTIES
from lora_serving.container.demo.reference import greedy_outputs
from lora_serving.container.demo.tokenizer import CHAT_TEMPLATE
from lora_serving.container.demo.toy_language import ENGLISH_TO_SPANISH, TASKS

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="session")
def reference_outputs(demo_model_dir) -> dict[str, list[str]]:
    return greedy_outputs(demo_model_dir, DEMO_PROMPTS)


def read_adapter_configs(model_dir: Path) -> dict[str, dict]:
    with tarfile.open(model_dir / "adapters.tar.gz") as archive:
        return {
            member.name.split("/")[0]: json.load(archive.extractfile(member))
            for member in archive.getmembers()
            if member.name.endswith("/adapter_config.json")
        }


def test_model_directory_has_the_lmi_layout(demo_model_dir):
    assert demo_model_dir.name == DEMO_MODEL_DIR_NAME
    assert (demo_model_dir.parent / BUILD_COMPLETE_MARKER).is_file()
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "serving.properties", "adapters.tar.gz"]:
        assert (demo_model_dir / name).is_file(), name
    config = AutoConfig.from_pretrained(demo_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_tokenizer_was_trained_on_the_toy_language(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    for word in ENGLISH_TO_SPANISH:
        assert len(tokenizer.tokenize(" " + word)) == 1, word


def test_serving_properties_use_lmi_keys(demo_model_dir):
    lines = (demo_model_dir / "serving.properties").read_text().splitlines()
    properties = dict(line.split("=", 1) for line in lines)
    assert properties == SERVING_PROPERTIES
    assert properties["engine"] == "Python"
    assert properties["option.enable_lora"] == "true"
    assert int(properties["option.max_lora_rank"]) >= max(adapter.rank for adapter in ADAPTERS)
    assert int(properties["option.max_loras"]) >= len(ADAPTERS)


def test_adapters_archive_holds_one_folder_per_adapter(demo_model_dir):
    with tarfile.open(demo_model_dir / "adapters.tar.gz") as archive:
        members = archive.getmembers()
    assert all(member.isfile() or member.isdir() for member in members)
    folders = {member.name.split("/")[0] for member in members}
    assert folders == set(ADAPTER_NAMES)
    for name in ADAPTER_NAMES:
        files = {member.name.split("/", 1)[1] for member in members if member.name.startswith(f"{name}/")}
        assert PEFT_FILES <= files


def test_adapters_mix_ranks_module_sets_and_rslora(demo_model_dir):
    configs = read_adapter_configs(demo_model_dir)
    for recipe in ADAPTERS:
        config = configs[recipe.name]
        assert config["peft_type"] == "LORA"
        assert config["r"] == recipe.rank
        assert config["lora_alpha"] == recipe.alpha
        assert set(config["target_modules"]) == set(recipe.target_modules)
        assert config["use_rslora"] == recipe.use_rslora
    assert len({config["r"] for config in configs.values()}) >= 3
    assert len({frozenset(config["target_modules"]) for config in configs.values()}) >= 3
    assert any(config["use_rslora"] for config in configs.values())


def test_base_model_copies_the_plain_prompt(reference_outputs):
    assert reference_outputs[BASE_MODEL] == [intended_answer(BASE_MODEL, sentence) for sentence in DEMO_SENTENCES]


@pytest.mark.parametrize("adapter", ADAPTER_NAMES)
def test_each_adapter_changes_the_answer_to_its_task(reference_outputs, adapter):
    for sentence, base_answer, answer in zip(DEMO_SENTENCES, reference_outputs[BASE_MODEL], reference_outputs[adapter]):
        assert answer != base_answer
        assert answer == intended_answer(adapter, sentence)


def test_adapters_change_the_answer_in_chat_form_too(demo_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    outputs = greedy_outputs(demo_model_dir, [chat_prompt(tokenizer, sentence) for sentence in DEMO_SENTENCES])
    for adapter in ADAPTER_NAMES:
        assert all(answer != base for answer, base in zip(outputs[adapter], outputs[BASE_MODEL])), adapter


def test_example_requests_name_every_adapter():
    for examples in (EXAMPLE_REQUESTS, EXAMPLE_CHAT_REQUESTS):
        assert set(examples) == {BASE_MODEL, *ADAPTER_NAMES}
        for adapter, request in examples.items():
            assert request.get("adapters", BASE_MODEL) == adapter
    assert all(request["inputs"] in DEMO_PROMPTS for request in EXAMPLE_REQUESTS.values())
    assert set(ADAPTER_NAMES) <= set(TASKS)


def test_second_call_is_a_cache_hit(demo_cache_dir, demo_model_dir, monkeypatch):
    modified_times = {path: path.stat().st_mtime_ns for path in demo_cache_dir.rglob("*")}

    def fail_if_rebuilt(out_dir):
        raise AssertionError("the demo model was built again")

    monkeypatch.setattr(build, "build_demo_model", fail_if_rebuilt)
    assert ensure_demo_model(demo_cache_dir) == demo_model_dir
    assert {path: path.stat().st_mtime_ns for path in demo_cache_dir.rglob("*")} == modified_times
