"""Bad input is answered 4xx with JSON naming the problem, and the server stays healthy afterwards."""

from __future__ import annotations

import pytest

LMI_CASES = [
    ("invalid JSON", b'{"inputs": "x",', 400, "not valid JSON"),
    ("empty body", b"", 400, "body is empty"),
    ("not an object", b'["x"]', 400, "must be a JSON object"),
    ("no inputs", b'{"parameters": {}}', 400, "no 'inputs'"),
    ("inputs of the wrong type", b'{"inputs": 5}', 400, "'inputs' must be a string"),
    ("inputs list with a number", b'{"inputs": ["a", 1]}', 400, "'inputs' must be a string"),
    ("max_new_tokens as a string", b'{"inputs": "x", "parameters": {"max_new_tokens": "5"}}', 400,
     "parameters.max_new_tokens: Input should be a valid integer"),
    ("temperature as a string", b'{"inputs": "x", "parameters": {"temperature": "hot"}}', 400,
     "parameters.temperature"),
    ("do_sample as a number", b'{"inputs": "x", "parameters": {"do_sample": 1}}', 400, "parameters.do_sample"),
    ("parameters not an object", b'{"inputs": "x", "parameters": [1]}', 400, "'parameters' must be a JSON object"),
    ("negative max_new_tokens", b'{"inputs": "x", "parameters": {"max_new_tokens": 0}}', 400,
     "max_new_tokens must be a positive integer"),
    ("top_p out of range", b'{"inputs": "x", "parameters": {"top_p": 1.5}}', 400, "top_p must be in (0, 1]"),
    ("max_new_tokens over the limit", b'{"inputs": "x", "parameters": {"max_new_tokens": 100000}}', 400,
     "exceeds the model's maximum length 256"),
    ("prompt too long", b'{"inputs": "' + b"word " * 400 + b'"}', 400, "more than the model's maximum length"),
    ("empty prompt", b'{"inputs": ""}', 400, "the prompt is empty"),
    ("stream not a boolean", b'{"inputs": "x", "stream": "yes"}', 400, "'stream' must be true or false"),
    ("streaming several inputs", b'{"inputs": ["a", "b"], "stream": true}', 400, "one input at a time"),
    ("unknown adapter", b'{"inputs": "x", "adapters": "nope"}', 400, "Adapter nope is not registered"),
    ("adapters and inputs of different lengths", b'{"inputs": ["a", "b", "c"], "adapters": ["a1", "a2"]}', 400,
     "Number of adapters is not equal to the number of inputs"),
    ("adapters of the wrong type", b'{"inputs": "x", "adapters": 3}', 400, "'adapters' must be a string"),
    ("an unknown key", b'{"inputs": "x", "parameter": {"max_new_tokens": 3}}', 400,
     "parameter: not a field this server knows or honours"),
    ("an unknown parameter", b'{"inputs": "x", "parameters": {"guided_grammar": "start: x"}}', 400,
     "parameters.guided_grammar: not a field this server knows or honours"),
    ("too many top tokens", b'{"inputs": "x", "parameters": {"top_n_tokens": 21}}', 400,
     "top log-probabilities per token must be in [0, 20]"),
    ("n streamed", b'{"inputs": "x", "stream": true, "parameters": {"n": 2}}', 400, "cannot be streamed"),
    ("best_of below n", b'{"inputs": "x", "parameters": {"n": 3, "best_of": 2}}', 400, "best_of must be"),
    ("a schema that cannot be enforced", b'{"inputs": "x", "parameters": {"guided_json": {"type": "array", '
     b'"uniqueItems": true}}}', 400, "parameters.guided_json cannot be enforced"),
    ("two structured outputs", b'{"inputs": "x", "parameters": {"guided_regex": "a+", "guided_choice": ["a"]}}',
     400, "parameters.guided_regex and parameters.guided_choice both ask"),
    ("a bad regex", b'{"inputs": "x", "parameters": {"guided_regex": "[a-"}}', 400, "unclosed character class"),
    ("logit_bias keyed by a word", b'{"inputs": "x", "parameters": {"logit_bias": {"cat": 5}}}', 400,
     "key 'cat' is not a token id"),
    ("logit_bias outside the vocabulary", b'{"inputs": "x", "parameters": {"logit_bias": {"99999": 5}}}', 400,
     "token id 99999 is outside the vocabulary"),
    ("chat without messages content", b'{"messages": [{"content": "hi"}]}', 400, "messages.0.role: Field required"),
    ("chat with an empty message list", b'{"messages": []}', 400, "messages: List should have at least 1 item"),
]


@pytest.fixture(autouse=True)
def server_stays_healthy(client):
    yield
    assert client.get("/ping").status_code == 200
    after = client.post("/invocations", json={"inputs": "still fine?", "parameters": {"max_new_tokens": 2}})
    assert after.status_code == 200, after.text


@pytest.mark.parametrize("body,status,message", [case[1:] for case in LMI_CASES], ids=[case[0] for case in LMI_CASES])
def test_bad_lmi_requests_are_refused_naming_the_problem(client, body, status, message):
    response = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == status
    assert message in error["error"]


def test_an_unknown_adapter_in_the_header_is_refused(client):
    response = client.post("/invocations", json={"inputs": "x"},
                           headers={"X-Amzn-SageMaker-Adapter-Identifier": "missing-one"})
    assert response.status_code == 400
    assert response.json()["error"] == "Adapter missing-one is not registered"


def test_a_bad_input_in_a_batch_refuses_the_whole_request(client, lora_server):
    response = client.post("/invocations", json={"inputs": ["fine", ""], "parameters": {"max_new_tokens": 2}})
    assert response.status_code == 400
    assert not lora_server.runtime.engine.has_unfinished_requests()


@pytest.mark.parametrize("path,body,message", [
    ("/v1/completions", {"model": "a1", "prompt": "x", "max_tokens": "3"},
     "max_tokens: Input should be a valid integer"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, "Adapter nope is not registered"),
    ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "x"}], "functions": []},
     "functions: not a field this server knows or honours"),
    ("/v1/chat/completions", {"model": "a1", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f"}}]},
     'tool_choice "auto" needs option.enable_auto_tool_choice=true and option.tool_call_parser'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs needs logprobs: true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
     "response_format.type must be"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, "best_of cannot be streamed"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}}}},
     "response_format.json_schema.schema cannot be enforced"),
])
def test_openai_routes_answer_openai_errors(client, path, body, message):
    response = client.post(path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
def test_tgi_routes_answer_tgi_errors(client, path):
    response = client.post(path, json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert response.status_code == 400
    assert response.json() == {"error": "Adapter nope is not registered", "error_type": "validation"}


def test_an_unknown_route_is_a_json_404(client):
    response = client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json()["error"] == "no route GET /no/such/route"
