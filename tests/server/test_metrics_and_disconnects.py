"""Prometheus /metrics (names and values), and a client that leaves mid-answer frees its sequence at once."""

from __future__ import annotations

import json
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

# Long enough that a request left alone runs for seconds on a CPU; far beyond what an abort lets through.
LONG_ANSWER = {"max_new_tokens": 200, "ignore_eos_token": True}


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def increase(before, after, name: str, **labels) -> float:
    """How much a counter grew between two scrapes (from 0 if the first had no such sample)."""
    return value(after, name, **labels) - before.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_and_adapters(client):
    before = scrape(client)
    for adapter in ("a1", "a1", "a2"):
        response = client.post("/invocations", json={"inputs": "one two", "adapters": adapter,
                                                     "parameters": {"max_new_tokens": 5, "ignore_eos_token": True}})
        assert response.status_code == 200
    assert client.post("/invocations", json={"inputs": 3}).status_code == 400
    after = scrape(client)

    def delta(name, **labels):
        return increase(before, after, name, **labels)

    assert delta("lora_serving_requests_total", route="/invocations", status="200") == 3
    assert delta("lora_serving_requests_total", route="/invocations", status="400") == 1
    assert delta("lora_serving_generated_tokens_total") == 15
    assert delta("lora_serving_adapter_tokens_served_total", adapter="a1") == 10
    assert delta("lora_serving_adapter_tokens_served_total", adapter="a2") == 5
    assert delta("lora_serving_time_to_first_token_seconds_count") == 3
    assert delta("lora_serving_inter_token_latency_seconds_count") == 12
    assert value(after, "lora_serving_queue_depth") == 0
    assert value(after, "lora_serving_running_sequences") == 0
    assert 0 <= value(after, "lora_serving_kv_cache_usage_ratio") <= 1
    for adapter in ("a1", "a2"):
        tiers = {tier: value(after, "lora_serving_adapter_resident", adapter=adapter, tier=tier)
                 for tier in ("device", "host", "disk")}
        assert sum(tiers.values()) == 1
        assert tiers["device"] == 1  # both fit in the two slots and were just used
        assert value(after, "lora_serving_adapter_load_seconds", adapter=adapter) > 0
        assert value(after, "lora_serving_adapter_pinned", adapter=adapter) == 0
    assert value(after, "lora_serving_adapters_registered") >= 2


def test_metrics_count_prefix_cache_hits(client):
    before = scrape(client)
    prompt = " ".join(["the red cat sees a small dog"] * 8)  # several full blocks of 16 tokens
    for _ in range(2):
        response = client.post("/invocations", json={"inputs": prompt, "adapters": "a2",
                                                     "parameters": {"max_new_tokens": 2}})
        assert response.status_code == 200
    after = scrape(client)
    queried = increase(before, after, "lora_serving_prefix_cache_queries_total")
    hits = increase(before, after, "lora_serving_prefix_cache_hits_total")
    # The second request reuses every full block of the first's prompt but the one holding its last token.
    assert queried > 2 * 16 and hits >= queried / 2 - 16
    assert 0 < value(after, "lora_serving_prefix_cache_hit_rate") <= 1
    assert value(after, "lora_serving_kv_cache_cached_blocks") >= hits // 16
    assert value(after, "lora_serving_kv_cache_usage_ratio") == 0  # cached blocks are held by no sequence
    assert value(after, "lora_serving_chunked_prefill_steps_total") == 0  # prompts far under the step's budget


def wait_until_idle(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished_requests(), "the request was not aborted"


def wait_until_running(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats().num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.stats().num_running == 1


@pytest.mark.parametrize("path,body", [
    ("/invocations", {"inputs": "the red cat", "adapters": "a1", "stream": True, "parameters": LONG_ANSWER}),
    ("/generate_stream", {"inputs": "the red cat", "parameters": {**LONG_ANSWER, "adapter_id": "a2"}}),
    ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                              "max_tokens": 200, "ignore_eos": True}),
])
def test_a_client_that_leaves_mid_stream_frees_its_sequence(lora_server, path, body):
    engine = lora_server.runtime.engine
    generated_before = engine.stats().generated_tokens
    with lora_server.client() as client, client.stream("POST", path, json=body) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip((line for line in lines if line), range(3))]
        assert len(received) == 3
    # The connection is closed: the engine must drop the request and free its KV blocks.
    wait_until_idle(engine)
    stats = engine.stats()
    assert stats.num_running == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert stats.generated_tokens - generated_before < LONG_ANSWER["max_new_tokens"]


def test_a_client_that_leaves_before_a_whole_answer_frees_its_sequence(lora_server):
    engine = lora_server.runtime.engine
    generated_before = engine.stats().generated_tokens
    host, port = lora_server.url.removeprefix("http://").split(":")
    body = json.dumps({"inputs": "the red cat", "parameters": LONG_ANSWER}).encode()
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_until_running(engine)
    wait_until_idle(engine)
    assert engine.stats().generated_tokens - generated_before < LONG_ANSWER["max_new_tokens"]
    with lora_server.client() as client:
        assert client.get("/ping").status_code == 200
        samples = scrape(client)
    assert value(samples, "lora_serving_requests_total", route="/invocations", status="499") >= 1
