"""option.adapter_resolver=hf://org/: a name no one registered is the Hub repo org/<name>, fetched on first use
(only the adapter's files) by the server and by the DJL handler under DJL's real worker, where in rolling-batch
mode a slow fetch does not hold up the requests already streaming."""

from __future__ import annotations

import time

from transformers import AutoTokenizer

from tests.adapters import peft_greedy
from tests.djl.conftest import DJL_PROPERTIES, MODES, PROMPT, djl_dir, generate, running_worker, token_ids  # noqa: F401
from tests.djl.conftest import NEW_TOKENS as DJL_NEW_TOKENS
from tests.djl.conftest import expected, streamed_ids  # noqa: F401
from tests.hub.conftest import hub_env
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server

NEW_TOKENS = 6


def test_the_server_resolves_hub_adapters_on_first_use(hub, server_base, server_adapters, tmp_path):
    model_dir = lmi_model_dir(server_base, tmp_path / "model", {
        **LORA_PROPERTIES, "option.adapter_resolver": "hf://org/", "option.cache_dir": str(tmp_path / "cache")})
    live = start_server(model_dir, hub_env(hub, tmp_path / "hf-cache"))
    try:
        with live.client() as client:
            answer = client.post("/invocations", json={"inputs": PROMPT, "adapters": "adapter-a2",
                                                       "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}})
            assert answer.status_code == 200, answer.text
            prompt_ids = live.runtime.engine.tokenize(PROMPT)
            assert [token["id"] for token in answer.json()["details"]["tokens"]] == \
                peft_greedy(server_base, server_adapters["a2"], prompt_ids, NEW_TOKENS)
            assert client.get("/adapters/adapter-a2").json()[0]["src"] == "hf://org/adapter-a2"
            missing = client.post("/v1/completions", json={"model": "adapter-none", "prompt": PROMPT})
            assert missing.status_code == 404 and "adapter-none" in missing.json()["error"]["message"]
    finally:
        live.stop()
    assert hub.fetched_files("org/adapter-a2") == {"adapter_config.json", "adapter_model.safetensors"}
    assert (tmp_path / "cache" / "resolved-adapters" / "adapter-a2" / "hub").is_dir()


def test_the_djl_handler_resolves_hub_adapters_on_first_use(djl_dir, hub, server_base, server_adapters,  # noqa: F811
                                                            tmp_path):
    properties = {**DJL_PROPERTIES, **MODES["async"], "option.adapter_resolver": "hf://org/",
                  "option.cache_dir": str(tmp_path / "cache")}
    model_dir = lmi_model_dir(server_base, tmp_path / "model", properties)
    with running_worker(djl_dir, model_dir, tmp_path, extra_env=hub_env(hub, tmp_path / "hf-cache")) as front_end:
        answer = front_end.submit(generate(PROMPT, "adapter-a1")).wait()
        missing = front_end.submit(generate(PROMPT, "adapter-none")).wait()
    prompt_ids = AutoTokenizer.from_pretrained(str(server_base))(PROMPT)["input_ids"]
    assert token_ids(answer.json()) == peft_greedy(server_base, server_adapters["a1"], prompt_ids, DJL_NEW_TOKENS)
    assert missing.code == 404 and "adapter-none" in missing.body.decode()


def test_in_rolling_batch_a_slow_fetch_does_not_hold_up_running_streams(djl_dir, hub, server_base,  # noqa: F811
                                                                         server_adapters, expected, tmp_path):  # noqa: F811
    properties = {**DJL_PROPERTIES, **MODES["rolling_batch"], "option.adapter_resolver": "hf://org/",
                  "option.cache_dir": str(tmp_path / "cache")}
    model_dir = lmi_model_dir(server_base, tmp_path / "model", properties, {"a1": server_adapters["a1"]})
    with running_worker(djl_dir, model_dir, tmp_path, extra_env=hub_env(hub, tmp_path / "hf-cache")) as front_end:
        hub.hold("org/adapter-a2")
        try:
            running = front_end.submit(generate(PROMPT, "a1", 64, stream=True))
            deadline = time.monotonic() + 60
            while running.first_chunk_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
            waiting = front_end.submit(generate(PROMPT, "adapter-a2"))
            # The stream of a1 ends while adapter-a2's fetch is still held at the Hub.
            assert streamed_ids(running.wait(60).json_lines()) == expected(PROMPT, "a1", 64)
            assert not waiting.done.is_set()
        finally:
            hub.release("org/adapter-a2")
        assert token_ids(waiting.wait().json()) == expected(PROMPT, "a2")
