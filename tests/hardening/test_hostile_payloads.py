"""Request bodies that used to get past the validation and what they must get instead: a 400 naming the
problem, with every other request unaffected. (With the fixes undone, the fuzz test next to this one finds the
nesting and surrogate cases again, not reliably the sampling ones: these tests pin each down.)

- JSON nested thousands deep (the parser's recursion limit);
- JSON escapes of lone surrogates ("\\ud800"), which are valid JSON but not Unicode text: the tokenizer and
  the JSON encoder of an error message that quotes them both raise on them;
- a seed of 2**64 or more, and a temperature so close to 0 that the scaled logits overflow: both used to fail
  the engine step, and so every request sharing it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.hardening.conftest import assert_json_error, assert_still_serving, token_ids
from tests.server.test_s3_startup import PROMPT

JSON_ROUTES = ["/invocations", "/predictions/model", "/v1/completions", "/v1/chat/completions", "/generate",
               "/generate_stream", "/", "/adapters", "/models/model/adapters"]


@pytest.mark.parametrize("path", JSON_ROUTES)
def test_json_nested_too_deeply_is_400(client, path):
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_json_error(response, 400, "nested too deeply")
    assert_still_serving(client)


LONE_SURROGATES = {
    "/invocations": b'{"inputs": "the \\ud800 cat"}',
    "/predictions/model": b'{"inputs": "x", "adapters": "a\\udfff"}',
    "/v1/completions": b'{"model": "\\ud83d", "prompt": "x"}',
    "/v1/chat/completions": b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
    "/generate": b'{"inputs": "x", "parameters": {"adapter_id": "\\ud800"}}',
    "/": b'{"inputs": "\\ud800"}',
    "/adapters": b'{"name": "\\ud800", "src": "/x"}',
}


@pytest.mark.parametrize("path", sorted(LONE_SURROGATES))
def test_lone_surrogates_are_400(client, path):
    response = client.post(path, content=LONE_SURROGATES[path], headers={"Content-Type": "application/json"})
    assert_json_error(response, 400, "not valid Unicode")
    assert_still_serving(client)


def test_an_escaped_surrogate_pair_is_text(client):
    response = client.post("/invocations", content=b'{"inputs": "a smile \\ud83d\\ude00", '
                                                   b'"parameters": {"max_new_tokens": 2}}')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path,body,status", [
    ("/invocations", {"inputs": PROMPT, "parameters": {"do_sample": True, "seed": 2**64}}, 400),
    ("/v1/completions", {"prompt": PROMPT, "seed": 2**70, "max_tokens": 6}, 400),
    ("/invocations", {"inputs": PROMPT, "parameters": {"do_sample": True, "temperature": 1e-300,
                                                       "max_new_tokens": 6}}, 200),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "temperature": 1e-300,
                              "max_tokens": 6}, 200),
    ("/generate", {"inputs": PROMPT, "parameters": {"do_sample": True, "repetition_penalty": 1e-300,
                                                    "max_new_tokens": 6}}, 200),
])
def test_extreme_sampling_parameters_affect_no_other_request(lora_server, client, path, body, status):
    greedy = {"inputs": PROMPT, "adapters": "a1", "parameters": {"max_new_tokens": 6, "details": True}}
    alone = token_ids(client.post("/invocations", json=greedy).json())

    def post(route, payload):
        with lora_server.client() as own_client:
            return own_client.post(route, json=payload)

    # Several of each at once, so that the extreme ones share engine steps with the greedy ones.
    with ThreadPoolExecutor(max_workers=8) as pool:
        extreme = [pool.submit(post, path, body) for _ in range(4)]
        others = [pool.submit(post, "/invocations", greedy) for _ in range(4)]
    for answer in extreme:
        assert answer.result().status_code == status, answer.result().text
    for answer in others:
        assert answer.result().status_code == 200, answer.result().text
        assert token_ids(answer.result().json()) == alone


@pytest.mark.parametrize("path", ["/invocations", "/v1/completions", "/adapters"])
def test_a_body_over_the_bound_is_413_before_it_is_held(client, path):
    from lora_serving.container.runtime import MAX_REQUEST_BYTES

    huge = b'{"inputs": "' + b"a" * (MAX_REQUEST_BYTES + 1) + b'"}'
    assert_json_error(client.post(path, content=huge, headers={"Content-Type": "application/json"}), 413,
                      "allowed")

    def chunked():  # no Content-Length: the bound holds while the body streams in
        yield b'{"inputs": "'
        for _ in range(MAX_REQUEST_BYTES // 65536 + 1):
            yield b"a" * 65536
        yield b'"}'

    assert_json_error(client.post(path, content=chunked(), headers={"Content-Type": "application/json"}), 413,
                      "allowed")
    assert_still_serving(client)


def test_an_unexpected_failure_is_a_json_500_and_the_server_serves_on(client, lora_server, monkeypatch):
    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(lora_server.runtime.adapters, "list", broken)
    assert_json_error(client.get("/adapters"), 500, "internal error (RuntimeError)")
    monkeypatch.undo()
    assert client.get("/adapters").status_code == 200
    assert_still_serving(client)
