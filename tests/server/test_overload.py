"""job_queue_size over real HTTP: once max_rolling_batch_size requests run and job_queue_size more wait, a
generation request is answered at once (503 + Retry-After on the LMI, SageMaker and OpenAI routes, 429 on the
TGI routes, each with its API's JSON error), /ping stays healthy through a flood, the accepted requests finish
whole, the metrics count what waited and what was refused, and the server takes requests again afterwards."""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import BASE_PROPERTIES, lmi_model_dir, start_server

PROMPT = "the old dog reads a book"
NEW_TOKENS = 8
RUNNING, QUEUE = 2, 2


@pytest.fixture(scope="module")
def small_queue_server(server_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    model_dir = lmi_model_dir(server_base, root / "model", {
        **BASE_PROPERTIES, "option.max_rolling_batch_size": str(RUNNING), "job_queue_size": str(QUEUE),
        "option.cache_dir": str(root / "cache")})
    live = start_server(model_dir)
    yield live
    live.stop()


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


class HeldRequest:
    """A generation request whose body is held back: the server has accepted it (it counts against the bound)
    and waits for the rest, until `release` sends it; so the test, not the machine's speed, decides how long
    the queue stays full."""

    def __init__(self, url: str, index: int) -> None:
        self.body = json.dumps({"inputs": f"{PROMPT} {index}", "parameters": {"max_new_tokens": NEW_TOKENS,
                                "ignore_eos_token": True, "details": True}}).encode()
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=120)
        self.sock.sendall(f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n".encode())

    def release(self) -> tuple[int, int]:
        """Send the body; the status and the number of tokens generated."""
        self.sock.sendall(self.body)
        with self.sock, self.sock.makefile("rb") as answer:
            status = int(answer.readline().split()[1])
            while answer.readline() not in (b"\r\n", b""):
                pass
            body = json.loads(answer.read())
        return status, body["details"]["generated_tokens"] if status == 200 else 0


def wait_for_metrics(client, **wanted: float) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = client.get("/metrics").text
        if all(metric(text, f"lora_serving_{name}") == value for name, value in wanted.items()):
            return text
        time.sleep(0.01)
    raise AssertionError(f"/metrics never showed {wanted}:\n{text}")


def test_past_the_queue_requests_are_refused_at_once_and_ping_stays_healthy(small_queue_server):
    with small_queue_server.client() as client:
        held = [HeldRequest(small_queue_server.url, index) for index in range(RUNNING + QUEUE)]
        wait_for_metrics(client, requests_in_flight=RUNNING + QUEUE, requests_waiting=RUNNING + QUEUE)

        lmi = client.post("/invocations", json={"inputs": PROMPT})
        assert lmi.status_code == 503 and lmi.headers["retry-after"] == "1"
        assert "job_queue_size" in lmi.json()["error"] and lmi.json()["code"] == 503
        sagemaker = client.post("/predictions/model", json={"inputs": PROMPT})
        assert sagemaker.status_code == 503 and sagemaker.headers["retry-after"] == "1"
        openai = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert openai.status_code == 503 and openai.headers["retry-after"] == "1"
        assert openai.json()["error"]["type"] == "server_error" and "overloaded" in openai.json()["error"]["message"]
        for path in ("/generate", "/generate_stream", "/"):
            tgi = client.post(path, json={"inputs": PROMPT})
            assert tgi.status_code == 429 and tgi.headers["retry-after"] == "1"
            assert tgi.json()["error_type"] == "overloaded"

        # A flood while the queue is full: every request refused, every /ping healthy meanwhile.
        def flood(index: int) -> int:
            return client.post("/invocations", json={"inputs": f"{PROMPT} {index}"}).status_code

        with ThreadPoolExecutor(8) as flooders:
            refused = flooders.map(flood, range(64))
            pings = [client.get("/ping") for _ in range(20)]
            assert set(refused) == {503}
        assert all(ping.status_code == 200 and ping.json()["status"] == "Healthy" for ping in pings)
        # The accepted requests are served whole once their bodies arrive.
        with ThreadPoolExecutor(RUNNING + QUEUE) as senders:
            assert list(senders.map(HeldRequest.release, held)) == [(200, NEW_TOKENS)] * (RUNNING + QUEUE)

        text = wait_for_metrics(client, requests_in_flight=0, requests_waiting=0)
        assert metric(text, 'lora_serving_requests_rejected_total{api="lmi"}') == 2 + 64
        assert metric(text, 'lora_serving_requests_rejected_total{api="openai"}') == 1
        assert metric(text, 'lora_serving_requests_rejected_total{api="tgi"}') == 3
        # Recovered: the next request is served.
        assert client.post("/invocations", json={"inputs": PROMPT}).status_code == 200
