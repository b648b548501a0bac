"""Faults while requests are in flight, over HTTP: an adapter whose files break after registration while
requests wait for it, a KV cache far too small for the concurrent load, and an adapter unregistered while
streams use it. The requests the fault concerns get an error answer or finish as promised; every other
request gets exactly the greedy answer transformers + PEFT give; at the end nothing is held."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.adapters import make_peft_adapter, peft_greedy
from tests.hardening.conftest import adapter_names, assert_json_error, assert_still_serving, token_ids
from tests.lora.test_registry import first_key, rewrite_tensors
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server
from tests.server.test_metrics_and_disconnects import scrape, value, wait_until_idle

PROMPTS = ["the red cat sees a dog", "one two three four", "a bird reads the book", "hello there"]
NEW_TOKENS = 12


def generate(live, prompt: str, adapter: str, **parameters):
    with live.client() as client:
        return client.post("/invocations", json={"inputs": prompt, "adapters": adapter, "parameters": {
            "max_new_tokens": NEW_TOKENS, "details": True, **parameters}})


def stream_records(live, body: dict, on_first_record=None) -> list[dict]:
    """Every jsonlines record of a streamed /invocations answer; `on_first_record()` runs once the first
    arrives, with the stream still open."""
    records = []
    with live.client() as client, client.stream("POST", "/invocations", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line:
                records.append(json.loads(line))
                if len(records) == 1 and on_first_record is not None:
                    on_first_record()
    return records


def expected_ids(server_base, server_adapters, live, prompt: str, adapter: str, new_tokens=NEW_TOKENS):
    prompt_ids = live.runtime.engine.tokenize(prompt)
    return peft_greedy(server_base, server_adapters[adapter] if adapter else None, prompt_ids, new_tokens)


def assert_nothing_held(client) -> None:
    samples = scrape(client)
    assert value(samples, "lora_serving_running_sequences") == 0
    assert value(samples, "lora_serving_queue_depth") == 0
    assert value(samples, "lora_serving_kv_cache_usage_ratio") == 0
    assert value(samples, "lora_serving_adapter_slots_busy") == 0


def test_an_adapter_that_fails_to_load_fails_only_its_waiting_requests(lora_server, client, server_base,
                                                                       server_adapters):
    model_dir = Path(lora_server.runtime.config.model_id)
    # Content of its own: a name sharing another's content is served from that one's cached weights.
    fragile = make_peft_adapter(server_base, model_dir / "fragile", r=4, alpha=8, seed=99)
    response = client.post("/adapters", json={"name": "fragile", "src": str(fragile), "preload": False})
    assert response.status_code == 200, response.text
    # Changed on disk after registration: the load that the first request for it starts must fail.
    rewrite_tensors(fragile, lambda tensors: tensors[first_key(tensors, "q_proj.lora_A")].mul_(2))

    with ThreadPoolExecutor(max_workers=10) as pool:
        broken = [pool.submit(generate, lora_server, prompt, "fragile") for prompt in PROMPTS[:3]]
        broken_stream = pool.submit(stream_records, lora_server, {"inputs": PROMPTS[3], "adapters": "fragile"})
        others = {(prompt, adapter): pool.submit(generate, lora_server, prompt, adapter)
                  for prompt in PROMPTS for adapter in ("a1", "", "a2")}

    for future in broken:
        assert_json_error(future.result(), 500, "Adapter fragile failed to load", "changed since registration")
    last = broken_stream.result()[-1]
    assert last["details"]["finish_reason"] == "error"
    assert "Adapter fragile failed to load" in last["error"]
    for (prompt, adapter), future in others.items():
        assert future.result().status_code == 200, future.result().text
        assert token_ids(future.result().json()) == expected_ids(server_base, server_adapters, lora_server,
                                                                 prompt, adapter)
    wait_until_idle(lora_server.runtime.engine)
    assert_nothing_held(client)
    assert_still_serving(client)


def test_unregistering_an_adapter_while_streams_use_it(lora_server, client, server_base, server_adapters):
    model_dir = Path(lora_server.runtime.config.model_id)
    victim = shutil.copytree(server_adapters["a1"], model_dir / "victim")
    assert client.post("/adapters", json={"name": "victim", "src": str(victim)}).status_code == 200
    new_tokens = 40
    body = {"adapters": "victim", "parameters": {"max_new_tokens": new_tokens, "details": True}}
    deleted = []

    def delete_victim() -> None:
        response = client.delete("/adapters/victim")
        deleted.append(response.json())

    # Deleted once every stream has its first token, so that all of them run on after it.
    all_started = threading.Barrier(3, action=delete_victim, timeout=60)
    with ThreadPoolExecutor(max_workers=3) as pool:
        streams = [pool.submit(stream_records, lora_server, {**body, "inputs": prompt}, all_started.wait)
                   for prompt in PROMPTS[:3]]
        for prompt, stream in zip(PROMPTS, streams):
            records = stream.result()
            assert records[-1]["details"]["finish_reason"] in ("length", "eos_token")
            assert [record["token"]["id"] for record in records] == expected_ids(
                server_base, server_adapters, lora_server, prompt, "a1", new_tokens)
    assert deleted == [{"status": "Adapter victim unregistered"}]

    refused = generate(lora_server, PROMPTS[0], "victim")
    assert_json_error(refused, 400, "Adapter victim is not registered")
    assert "victim" not in adapter_names(client)
    wait_until_idle(lora_server.runtime.engine)
    assert_nothing_held(client)


@pytest.fixture(scope="module")
def tiny_kv_server(server_base, server_adapters, tmp_path_factory):
    """A KV cache of 12 blocks of 4 tokens: two or three of the concurrent requests fit at a time."""
    root = tmp_path_factory.mktemp("tiny-kv")
    live = start_server(lmi_model_dir(server_base, root / "model", {
        **LORA_PROPERTIES, "option.cache_dir": str(root / "cache"), "option.max_model_len": "48",
        "option.num_kv_blocks": "12", "option.block_size": "4", "option.max_rolling_batch_size": "8"},
        server_adapters))
    yield live
    live.stop()


def test_kv_cache_exhaustion_preempts_and_every_answer_stays_exact(tiny_kv_server, server_base, server_adapters):
    jobs = [(prompt, adapter) for prompt in PROMPTS for adapter in ("a1", "", "a2")]
    new_tokens = 20
    with tiny_kv_server.client() as client:
        preemptions_before = value(scrape(client), "lora_serving_preemptions_total")
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            answers = [pool.submit(generate, tiny_kv_server, prompt, adapter, max_new_tokens=new_tokens)
                       for prompt, adapter in jobs]
        for (prompt, adapter), answer in zip(jobs, answers):
            assert answer.result().status_code == 200, answer.result().text
            assert token_ids(answer.result().json()) == expected_ids(server_base, server_adapters, tiny_kv_server,
                                                                     prompt, adapter, new_tokens)
        assert value(scrape(client), "lora_serving_preemptions_total") > preemptions_before
        wait_until_idle(tiny_kv_server.runtime.engine)
        assert_nothing_held(client)
