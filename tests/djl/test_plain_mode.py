"""lora_serving.handler.model under the real DJL worker with plain batching (`option.rolling_batch=disable`, no async
mode): a request alone, or a batch as PyPredictor.java builds one, answered whole."""

from __future__ import annotations

import json

import pytest

from tests.djl.conftest import (
    OTHER_PROMPT,
    PROMPT,
    front_end_fixture,
    generate,
    streamed_ids,
    token_ids,
)
from tests.djl.front_end import ClientRequest

front_end = front_end_fixture("plain")


def test_a_request_alone(front_end, expected):
    response = front_end.submit(generate(PROMPT, "a1"))
    assert response.code == 200
    assert response.properties["Content-Type"] == "application/json"
    assert token_ids(response.json()) == expected(PROMPT, "a1")


def test_a_batch_mixing_adapters_a_stream_and_a_bad_request(front_end, expected):
    requests = [
        generate(PROMPT, "a2"),
        ClientRequest.json({"inputs": PROMPT, "adapters": "unknown"}),
        ClientRequest.json({"inputs": [PROMPT, OTHER_PROMPT], "adapters": ["", "a1"],
                            "parameters": {"max_new_tokens": 8, "details": True}}),
        generate(OTHER_PROMPT, "a2", stream=True),
    ]
    answers = front_end.submit_batch(requests)
    assert [answer.code for answer in answers] == [200] * 4  # a batch shares one status
    assert token_ids(answers[0].json()) == expected(PROMPT, "a2")
    assert answers[1].json() == {"code": 400, "error": "Adapter unknown is not registered"}
    assert [token_ids(answer) for answer in answers[2].json()] == [expected(PROMPT, None),
                                                                  expected(OTHER_PROMPT, "a1")]
    assert streamed_ids(answers[3].json_lines()) == expected(OTHER_PROMPT, "a2")
    properties = answers[0].properties
    assert [properties[f"batch_{index}_Content-Type"] for index in range(4)] == \
        ["application/json"] * 3 + ["application/jsonlines"]


@pytest.mark.parametrize("body,message", [
    (b'{"inputs": ', "not valid JSON"),
    (json.dumps({"inputs": "x", "parameters": {"max_new_tokens": "2"}}).encode(), "parameters.max_new_tokens"),
    (json.dumps({"inputs": ["a", "b"], "adapters": ["a1"]}).encode(), "Number of adapters is not equal"),
])
def test_a_bad_request_alone_is_an_error_output(front_end, body, message):
    response = front_end.submit(ClientRequest({"Content-Type": "application/json"}, body))
    assert response.code == 400
    assert message in response.message
    assert message in response.json()["error"]


def test_chat(front_end):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    answer = front_end.submit(ClientRequest.json(body)).json()
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] <= 4
