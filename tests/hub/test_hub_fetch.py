"""Fetching models and adapters by Hub id from the stand-in, through huggingface_hub over real HTTP: only the
files the engine reads, the revision asked for, tokens, the offline cache, and each failure named at once."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from safetensors import safe_open

from lora_serving.handler.hub import (
    HubAccessError,
    HubContentError,
    HubRepoNotFoundError,
    HubSettings,
    HubUnreachableError,
    fetch_adapter,
    fetch_model,
    is_hub_id,
    parse_hf_url,
    served_model_name,
)
from tests.hub.conftest import GOOD_TOKEN

ENGINE_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja"}


def weights_of(directory, name="model.safetensors"):
    with safe_open(str(directory / name), "pt") as weights:
        return {key: weights.get_tensor(key) for key in weights.keys()}


def test_a_model_fetch_takes_only_what_the_engine_reads(hub, settings, server_base):
    snapshot = fetch_model("org/tiny", "v1", settings)
    expected = {path.name for path in server_base.iterdir()} & ENGINE_FILES
    assert expected >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert {path.name for path in snapshot.iterdir()} == expected
    # Pickled weights, GGUF, ONNX, subfolders: listed by the repo, never downloaded.
    assert hub.fetched_files("org/tiny") == expected
    assert snapshot.name == hub.repos["org/tiny"].refs["v1"]


def test_a_revision_picks_its_commit(hub, settings, server_base, second_base):
    main = fetch_model("org/tiny", "", settings)
    tagged = fetch_model("org/tiny", "v1", settings)
    by_commit = fetch_model("org/tiny", hub.repos["org/tiny"].refs["v1"], settings)
    assert main != tagged and tagged == by_commit
    some_weight = next(iter(weights_of(server_base)))
    assert weights_of(main)[some_weight].equal(weights_of(second_base)[some_weight])
    assert weights_of(tagged)[some_weight].equal(weights_of(server_base)[some_weight])
    with pytest.raises(HubRepoNotFoundError, match=r"org/tiny.*no revision 'v9'"):
        fetch_model("org/tiny", "v9", settings)


def test_a_sharded_model_fetches_the_shards_its_index_names(hub, settings):
    snapshot = fetch_model("org/sharded", "", settings)
    fetched = hub.fetched_files("org/sharded")
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json"} <= fetched
    assert "consolidated.safetensors" not in fetched
    assert not (snapshot / "consolidated.safetensors").exists()


@pytest.mark.parametrize("repo_id", ["org/gated", "org/private"])
def test_a_token_opens_gated_and_private_repos(hub, settings, repo_id):
    snapshot = fetch_model(repo_id, "", dataclasses.replace(settings, token=GOOD_TOKEN))
    assert (snapshot / "model.safetensors").is_file()
    assert all(request.token == GOOD_TOKEN for request in hub.requests if f"/{repo_id}/" in request.path)


def attempts_on(hub, repo_id, action):
    """The requests an action made to one repo."""
    before = len(hub.requests)
    action()
    return [request for request in hub.requests[before:] if f"/{repo_id}/" in request.path]


@pytest.mark.parametrize("repo_id, token, error, message", [
    ("org/no-such-model", None, HubRepoNotFoundError, r"org/no-such-model.*no such repo.*HF_TOKEN is not set"),
    ("org/private", None, HubRepoNotFoundError, r"org/private.*no such repo, or it is private"),
    ("org/gated", None, HubAccessError, r"org/gated.*is gated: HF_TOKEN is not set"),
    ("org/gated", "hf_not_a_token_the_hub_knows", HubAccessError, r"org/gated.*refused the token in HF_TOKEN"),
    ("org/tiny", "hf_not_a_token_the_hub_knows", HubAccessError, r"org/tiny.*refused the token in HF_TOKEN"),
])
def test_a_refusal_is_named_and_not_retried(hub, settings, repo_id, token, error, message):
    def fetch():
        with pytest.raises(error, match=message) as raised:
            fetch_model(repo_id, "", dataclasses.replace(settings, token=token))
        assert hub.endpoint in str(raised.value)

    # One question to the Hub, answered once: a missing or gated repo will not change its mind on a retry.
    assert len(attempts_on(hub, repo_id, fetch)) == 1


def test_a_repo_without_safetensors_is_refused_naming_what_it_has(hub, settings):
    with pytest.raises(HubContentError, match=r"org/bin-only.*no safetensors weights.*pytorch_model.bin.*safetensors "
                                              r"only"):
        fetch_model("org/bin-only", "", settings)
    assert "pytorch_model.bin" not in hub.fetched_files("org/bin-only")


def test_offline_serves_the_cache_and_names_what_it_lacks(hub, settings):
    online = fetch_model("org/tiny", "v1", settings)
    offline = dataclasses.replace(settings, offline=True)
    assert attempts_on(hub, "org/tiny", lambda: fetch_model("org/tiny", "v1", offline)) == []
    assert fetch_model("org/tiny", "v1", offline) == online
    with pytest.raises(HubUnreachableError, match=r"org/tiny \(revision main.*not in the Hub cache.*HF_HUB_OFFLINE"):
        fetch_model("org/tiny", "main", offline)


def test_an_unreachable_hub_is_named_with_its_address(settings):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(HubUnreachableError, match=rf"org/tiny.*{dead}.*could not be reached"):
        fetch_model("org/tiny", "", dataclasses.replace(settings, endpoint=dead))


def test_an_adapter_fetch_takes_its_config_and_safetensors_only(hub, settings, server_adapters):
    snapshot = fetch_adapter("org/adapter-a1", "", settings, max_total_bytes=10**9)
    assert {path.name for path in snapshot.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert hub.fetched_files("org/adapter-a1") == {"adapter_config.json", "adapter_model.safetensors"}
    source = server_adapters["a1"] / "adapter_model.safetensors"
    assert (snapshot / "adapter_model.safetensors").read_bytes() == source.read_bytes()


def test_an_adapter_over_the_size_bound_is_refused_before_download(hub, settings):
    with pytest.raises(HubContentError, match=r"org/adapter-a2.*over the bound of 100"):
        fetch_adapter("org/adapter-a2", "", settings, max_total_bytes=100)
    assert hub.fetched_files("org/adapter-a2") == set()


def test_settings_follow_huggingface_hubs_variables(tmp_path):
    env = {"HF_HOME": str(tmp_path / "home"), "HF_TOKEN": " hf_x ", "HF_ENDPOINT": "http://mirror:8080/",
           "HF_HUB_OFFLINE": "1"}
    settings = HubSettings.from_env(env)
    assert settings == HubSettings("http://mirror:8080", "hf_x", tmp_path / "home" / "hub", True)
    assert HubSettings.from_env({**env, "HF_HUB_CACHE": str(tmp_path / "c")}).cache_dir == tmp_path / "c"
    assert HubSettings.from_env({"HUGGING_FACE_HUB_TOKEN": "hf_old"}).token == "hf_old"
    assert HubSettings.from_env({}).endpoint is None and not HubSettings.from_env({}).offline


def test_hub_ids_urls_and_served_names():
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("meta-llama/Llama-3.1-8B")
    for text in ("gpt2", "/models/x", "./org/name", "org/name/sub", "s3://b/k", "org/na..me", "org/-x", ""):
        assert not is_hub_id(text), text
    assert parse_hf_url("hf://org/name") == ("org/name", "main")
    assert parse_hf_url("hf://org/name@v1.2") == ("org/name", "v1.2")
    for bad in ("hf://name", "hf://org/name@", "hf://org/name/sub", "s3://org/name"):
        with pytest.raises(ValueError):
            parse_hf_url(bad)
    assert served_model_name("org/name") == "org/name"
    assert served_model_name("/cache/models--org--name/snapshots/abc123") == "org/name"
    assert served_model_name("/opt/ml/model/") == "model"
