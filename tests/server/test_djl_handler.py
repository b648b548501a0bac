"""handler/model.py as DJL Serving runs it, through a test double of djl_python's Input and Output."""

from __future__ import annotations

import importlib
import json

import pytest

from tests.adapters import peft_greedy
from tests.server import djl_python_double
from tests.server.conftest import lmi_model_dir
from tests.server.djl_python_double import Input, batch

PROMPT = "the white fish eats"


@pytest.fixture(scope="module")
def handler_module(server_base, server_adapters, tmp_path_factory):
    model_dir = lmi_model_dir(server_base, tmp_path_factory.mktemp("djl") / "model", {}, server_adapters)
    with pytest.MonkeyPatch.context() as monkeypatch:
        djl_python_double.install(monkeypatch)
        module = importlib.import_module("handler.model")
        properties = {"model_id": "s3://bucket/downloaded-by-djl/", "model_dir": str(model_dir), "engine": "Python",
                      "entryPoint": "handler.model", "dtype": "fp32", "enable_lora": "true", "max_loras": "2",
                      "max_model_len": "256", "cpu_kv_cache_mb": "64", "rolling_batch": "disable"}
        # DJL's first call: the properties and no content. It initialises and answers None.
        assert module.handle(Input(properties)) is None
        yield module


@pytest.fixture(scope="module")
def expected(handler_module, server_base, server_adapters):
    prompt_ids = handler_module._service.engine.tokenize(PROMPT)
    return {adapter: peft_greedy(server_base, server_adapters.get(adapter), prompt_ids, 6)
            for adapter in (None, "a1", "a2")}


def request(body: dict, **properties: str) -> Input:
    return Input({"Content-Type": "application/json", **properties}, [("data", json.dumps(body).encode())])


def body_of(output, index: int = 0):
    return json.loads(output.content[index][1])


def ids(answer: dict) -> list[int]:
    return [token["id"] for token in answer["details"]["tokens"]]


def test_a_single_request_with_an_adapter(handler_module, expected):
    output = handler_module.handle(request({"inputs": PROMPT, "adapters": "a1",
                                            "parameters": {"max_new_tokens": 6, "details": True}}))
    assert output.code == 200
    assert output.content[0][0] == "batch_0.data"
    assert output.properties["batch_0_Content-Type"] == "application/json"
    assert ids(body_of(output)) == expected["a1"]


def test_the_adapter_header_as_djl_passes_it(handler_module, expected):
    output = handler_module.handle(request({"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}},
                                           **{"X-Amzn-SageMaker-Adapter-Identifier": "a2"}))
    assert ids(body_of(output)) == expected["a2"]


def test_a_batch_mixing_adapters_and_a_bad_request(handler_module, expected):
    parameters = {"max_new_tokens": 6, "details": True}
    bodies = [
        json.dumps({"inputs": PROMPT, "adapters": "a2", "parameters": parameters}).encode(),
        json.dumps({"inputs": PROMPT, "adapters": "unknown"}).encode(),
        json.dumps({"inputs": [PROMPT, PROMPT], "adapters": ["", "a1"], "parameters": parameters}).encode(),
    ]
    output = handler_module.handle(batch(bodies))
    assert output.code == 200
    assert [key for key, _ in output.content] == ["batch_0.data", "batch_1.data", "batch_2.data"]
    assert ids(body_of(output, 0)) == expected["a2"]
    assert body_of(output, 1) == {"code": 400, "error": "Adapter unknown is not registered"}
    assert [ids(answer) for answer in body_of(output, 2)] == [expected[None], expected["a1"]]


@pytest.mark.parametrize("raw,message", [
    (b'{"inputs": ', "not valid JSON"),
    (json.dumps({"inputs": "x", "parameters": {"max_new_tokens": "2"}}).encode(), "parameters.max_new_tokens"),
    (json.dumps({"inputs": ["a", "b"], "adapters": ["a1"]}).encode(), "Number of adapters is not equal"),
])
def test_a_bad_single_request_is_an_error_output(handler_module, raw, message):
    output = handler_module.handle(Input({"Content-Type": "application/json"}, [("data", raw)]))
    assert output.code == 400
    error = body_of(output)
    assert error["code"] == 400 and message in error["error"]
    assert not handler_module._service.engine.has_unfinished_requests()


def test_a_stream_request_gets_all_its_jsonlines(handler_module, expected):
    output = handler_module.handle(request({"inputs": PROMPT, "adapters": "a1", "stream": True,
                                            "parameters": {"max_new_tokens": 6}}))
    assert output.properties["batch_0_Content-Type"] == "application/jsonlines"
    records = [json.loads(line) for line in output.content[0][1].decode().splitlines()]
    assert [record["token"]["id"] for record in records] == expected["a1"]
    assert records[-1]["generated_text"] == "".join(record["token"]["text"] for record in records)


def test_chat_messages(handler_module):
    output = handler_module.handle(request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                            "temperature": 0}))
    answer = body_of(output)
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] <= 4


def test_register_and_unregister_adapter_as_djl_calls_them(handler_module, server_adapters, expected):
    registration = Input({"name": "djl-a2", "src": str(server_adapters["a2"]), "pin": "false"})
    assert handler_module.register_adapter(registration).code == 200
    output = handler_module.handle(request({"inputs": PROMPT, "adapters": "djl-a2",
                                            "parameters": {"max_new_tokens": 6, "details": True}}))
    assert ids(body_of(output)) == expected["a2"]
    assert handler_module.register_adapter(registration).code == 409
    assert handler_module.unregister_adapter(Input({"name": "djl-a2"})).code == 200
    assert handler_module.unregister_adapter(Input({"name": "djl-a2"})).code == 404
