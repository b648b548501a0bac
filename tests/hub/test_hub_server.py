"""The server and the DJL handler given a Hub id, as SageMaker users configure them (`HF_MODEL_ID`,
`OPTION_MODEL_ID`, `option.model_id` + `option.revision`, `HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`), and
adapters registered from `hf://` sources; every failure answered by /ping (start-up) or the route, by name."""

from __future__ import annotations

import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from lora_serving.container.app import create_app
from lora_serving.handler.djl.properties import engine_config
from tests.hub.conftest import GOOD_TOKEN, hub_env
from tests.models import reference_greedy
from tests.server.conftest import BASE_PROPERTIES, LORA_PROPERTIES, start_server

PROMPT = "the blue bird"
LORA_ENV = {f"OPTION_{key[len('option.'):].upper()}": value for key, value in LORA_PROPERTIES.items()}


def greedy_ids(client, adapter: str | None = None, model: str | None = None) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}}
    if adapter:
        body["adapters"] = adapter
    response = client.post("/invocations", json=body)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def expected_ids(model_dir, tokenizer_client) -> list[int]:
    prompt_ids = tokenizer_client.runtime.engine.tokenizer(PROMPT)["input_ids"]
    return reference_greedy(model_dir, prompt_ids, 6)


@pytest.fixture(scope="module")
def hub_server(hub, server_adapters, tmp_path_factory):
    """OPTION_MODEL_ID (a Hub id) with an empty model directory, LoRA on, as on SageMaker; the test adapters'
    directory is an allowed local root, to register the same adapter from disk and from the Hub."""
    root = tmp_path_factory.mktemp("hub-server")
    (root / "model").mkdir()
    env = hub_env(hub, root / "hf-cache", OPTION_MODEL_ID="org/tiny", OPTION_CACHE_DIR=str(root / "cache"),
                  OPTION_ADAPTER_SOURCE_ROOTS=str(server_adapters["a2"].parent), HF_TOKEN=GOOD_TOKEN, **LORA_ENV)
    live = start_server(root / "model", env)
    yield live
    live.stop()


def test_a_hub_id_is_served_as_transformers_answers(hub_server, second_base):
    with hub_server.client() as client:
        assert greedy_ids(client) == expected_ids(second_base, hub_server)
        models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "org/tiny"  # the Hub id is the served name, as vLLM names it


def test_option_revision_and_hf_model_id(hub, server_base, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "serving.properties").write_text("option.revision=v1\noption.dtype=fp32\n")
    live = start_server(model_dir, hub_env(hub, tmp_path / "hf-cache", HF_MODEL_ID="org/tiny"))
    try:
        with live.client() as client:
            assert greedy_ids(client) == expected_ids(server_base, live)
    finally:
        live.stop()


def test_offline_starts_from_the_cache_without_asking_the_hub(hub, hub_server, second_base, tmp_path):
    cache = hub_server.runtime.config.model_id.split("/models--")[0]
    before = len(hub.requests)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    live = start_server(model_dir, {"OPTION_MODEL_ID": "org/tiny", "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1",
                                    "OPTION_DTYPE": "fp32", "HF_ENDPOINT": hub.endpoint})
    try:
        with live.client() as client:
            assert greedy_ids(client) == expected_ids(second_base, live)
    finally:
        live.stop()
    assert hub.requests[before:] == []


def failed_start(model_dir, env) -> tuple[int, dict]:
    """Start a server whose start-up fails; /ping's answer once it has."""
    app = create_app(model_dir, env)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=5) as client:
            for _ in range(300):
                if app.state.server.startup_error:
                    ping = client.get("/ping")
                    return ping.status_code, ping.json()
                time.sleep(0.1)
        raise AssertionError("start-up neither failed nor finished")
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("model_id, token, message", [
    ("org/no-such-model", None, r"org/no-such-model.*no such repo"),
    ("org/gated", None, r"org/gated.*is gated: HF_TOKEN is not set"),
    ("org/gated", "hf_wrong", r"org/gated.*refused the token in HF_TOKEN"),
    ("org/bin-only", None, r"org/bin-only.*no safetensors weights.*pytorch_model.bin"),
])
def test_a_start_up_that_cannot_get_its_model_says_why_on_ping(hub, tmp_path, model_id, token, message):
    (tmp_path / "model").mkdir()
    env = hub_env(hub, tmp_path / "hf-cache", OPTION_MODEL_ID=model_id, **({"HF_TOKEN": token} if token else {}))
    status, body = failed_start(tmp_path / "model", env)
    assert status == 503 and body["status"] == "Failed"
    assert re.search(message, body["error"]), body["error"]


def test_a_model_id_that_is_no_path_url_or_hub_id_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    status, body = failed_start(tmp_path / "model", {"OPTION_MODEL_ID": "not/a/hub/id"})
    assert status == 503 and "option.model_id='not/a/hub/id'" in body["error"]
    assert "Hugging Face Hub id" in body["error"]


def test_an_adapter_from_the_hub_serves_as_the_same_adapter_from_disk(hub, hub_server, server_adapters):
    with hub_server.client() as client:
        from_disk = client.post("/adapters", json={"name": "disk-a2", "src": str(server_adapters["a2"])})
        assert from_disk.status_code == 200, from_disk.text
        from_hub = client.post("/adapters", json={"name": "hub-a2", "src": "hf://org/adapter-a2@main"})
        assert from_hub.status_code == 200, from_hub.text
        assert greedy_ids(client, "hub-a2") == greedy_ids(client, "disk-a2") != greedy_ids(client)
        described = client.get("/adapters/hub-a2").json()
    assert "hf://org/adapter-a2@main" in str(described)
    assert hub.fetched_files("org/adapter-a2") == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize("src, status, message", [
    ("hf://org/no-such-adapter", 404, r"org/no-such-adapter.*no such repo"),
    ("hf://org/adapter-a1@v7", 404, r"no revision 'v7'"),
    ("hf://org/gated-adapter", 200, None),  # the server's HF_TOKEN opens it
    ("hf://org/tiny", 400, r"not a LoRA adapter.*adapter_config.json"),
    ("hf://just-a-name", 400, r"expected hf://org/name"),
])
def test_hub_adapter_sources_are_answered_by_name(hub_server, src, status, message):
    name = "x" + str(abs(hash(src)) % 10**6)
    with hub_server.client() as client:
        response = client.post("/adapters", json={"name": name, "src": src})
    assert response.status_code == status, response.text
    if message:
        assert re.search(message, response.json()["error"]), response.json()["error"]


def test_the_djl_handler_fetches_a_hub_model_id(hub, tmp_path):
    env = hub_env(hub, tmp_path / "hf-cache", HF_TOKEN=GOOD_TOKEN)
    config = engine_config({"model_id": "org/gated", "revision": "main", "model_dir": str(tmp_path),
                            "device_id": "-1", **{key[len("option."):]: value for key, value in BASE_PROPERTIES.items()}},
                           env)
    assert config.model_id.startswith(str(tmp_path / "hf-cache"))
    assert hub.fetched_files("org/gated") >= {"config.json", "model.safetensors"}
