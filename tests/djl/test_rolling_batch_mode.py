"""lora_serving.handler.model under the real DJL worker in rolling-batch mode (`option.rolling_batch=auto`), driven as
RollingBatch.java drives it: requests join the running batch, every iteration answers every request,
streams arrive token by token, failures stay with their request."""

from __future__ import annotations

import json
import time

import pytest

from tests.adapters import make_peft_adapter
from tests.djl.conftest import (
    NEW_TOKENS,
    OTHER_PROMPT,
    PROMPT,
    front_end_fixture,
    generate,
    streamed_ids,
    token_ids,
)
from tests.djl.front_end import ClientRequest
from tests.lora.test_registry import first_key, rewrite_tensors

front_end = front_end_fixture("rolling_batch")


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.005)


def test_requests_join_the_running_batch_and_get_peft_answers(front_end, expected):
    long_new_tokens = 40
    joiners = [("a2", PROMPT), (None, OTHER_PROMPT), ("a1", OTHER_PROMPT)]
    for adapter, prompt in [("a1", PROMPT), *joiners]:
        expected(prompt, adapter, long_new_tokens if (adapter, prompt) == ("a1", PROMPT) else NEW_TOKENS)
    first = front_end.submit(generate(PROMPT, "a1", long_new_tokens))
    wait_for(lambda: first.items >= 3)  # it is running: three iterations answered it
    joined = {key: front_end.submit(generate(key[1], key[0])) for key in joiners}
    first.wait()
    for (adapter, prompt), response in joined.items():
        answer = response.wait().json()
        assert response.code == 200
        assert token_ids(answer) == expected(prompt, adapter)
        # One item per iteration it took part in, the whole answer with the last; done while the first ran.
        assert response.items == NEW_TOKENS and len(response.chunks) == 1
        assert response.finished_at < first.finished_at
    assert token_ids(first.json()) == expected(PROMPT, "a1", long_new_tokens)
    assert first.items == long_new_tokens  # answered at every iteration, the joiners' included
    assert first.properties["Content-Type"] == "application/json"
    assert max(front_end._rolling.batch_sizes) == 1 + len(joiners)


def test_a_stream_arrives_token_by_token(front_end, expected):
    response = front_end.submit(generate(PROMPT, "a2", stream=True)).wait()
    assert response.code == 200
    assert response.properties["Content-Type"] == "application/jsonlines"
    assert len(response.chunks) == NEW_TOKENS  # one jsonlines record per iteration
    records = [json.loads(chunk) for chunk in response.chunks]
    assert streamed_ids(records) == expected(PROMPT, "a2")
    assert records[-1]["generated_text"] == "".join(record["token"]["text"] for record in records)
    assert records[-1]["details"]["finish_reason"] == "length"


def test_streams_and_whole_answers_mixed_in_one_batch(front_end, expected):
    responses = [front_end.submit(generate(PROMPT, adapter, stream=stream))
                 for adapter in ("a1", None, "a2") for stream in (True, False)]
    for index, response in enumerate(responses):
        adapter = ("a1", None, "a2")[index // 2]
        response.wait()
        if index % 2 == 0:
            assert streamed_ids(response.json_lines()) == expected(PROMPT, adapter)
            assert response.properties["Content-Type"] == "application/jsonlines"
        else:
            assert token_ids(response.json()) == expected(PROMPT, adapter)
            assert response.properties["Content-Type"] == "application/json"


def test_the_adapter_header_wins_over_the_body(front_end, expected):
    response = front_end.submit(generate(PROMPT, "a1", **{"X-Amzn-SageMaker-Adapter-Identifier": "a2"})).wait()
    assert token_ids(response.json()) == expected(PROMPT, "a2")


@pytest.mark.parametrize("request_body,status,message", [
    (b'{"inputs": ', 400, "not valid JSON"),
    (json.dumps({"inputs": PROMPT, "adapters": "nope"}).encode(), 400, "Adapter nope is not registered"),
    (json.dumps({"inputs": [PROMPT, PROMPT], "adapters": ["a1"]}).encode(), 400, "Number of adapters is not equal"),
    (json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": "2"}}).encode(), 400,
     "parameters.max_new_tokens"),
])
def test_a_bad_request_fails_alone_while_the_batch_goes_on(front_end, expected, request_body, status, message):
    running = front_end.submit(generate(PROMPT, "a1", 24, stream=True))
    wait_for(lambda: running.items >= 2)
    bad = front_end.submit(ClientRequest({"Content-Type": "application/json"}, request_body)).wait()
    assert bad.code == status
    assert bad.items == 1
    error = bad.json()
    assert error["code"] == status and message in error["error"]
    assert not running.done.is_set()
    assert streamed_ids(running.wait().json_lines()) == expected(PROMPT, "a1", 24)


def test_a_request_the_model_fails_is_answered_424(front_end, server_base, expected, tmp_path):
    fragile = make_peft_adapter(server_base, tmp_path / "fragile", r=4, alpha=8, seed=99)
    registered = front_end.adapter_call("register_adapter", {"name": "fragile", "alias": None, "src": str(fragile)},
                                        {"preload": "false"})
    assert registered.code == 200, registered.message
    # Changed on disk after registration: the load the request starts fails, after the request was accepted.
    rewrite_tensors(fragile, lambda tensors: tensors[first_key(tensors, "q_proj.lora_A")].mul_(2))
    whole, streamed = front_end.submit(generate(PROMPT, "fragile")), front_end.submit(generate(PROMPT, "fragile",
                                                                                                 stream=True))
    other = front_end.submit(generate(PROMPT, "a2"))
    for response in (whole.wait(), streamed.wait()):
        assert response.code == 424
        assert "Adapter fragile failed to load" in response.json_lines()[-1]["error"]
    assert token_ids(other.wait().json()) == expected(PROMPT, "a2")
    assert front_end.adapter_call("unregister_adapter", {"name": "fragile", "alias": None}).code == 200


def test_chat_whole_and_streamed(front_end):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    whole = front_end.submit(ClientRequest.json(body)).wait().json()
    assert whole["object"] == "chat.completion"
    assert whole["usage"]["completion_tokens"] <= 5
    streamed = front_end.submit(ClientRequest.json({**body, "stream": True})).wait()
    chunks = streamed.json_lines()
    assert streamed.properties["Content-Type"] == "application/jsonlines"
    assert [chunk["object"] for chunk in chunks] == ["chat.completion.chunk"] * len(chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks) == \
        whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_reset_rollingbatch_aborts_what_ran(front_end, expected):
    running = front_end.submit(generate(PROMPT, "a1", 60))
    wait_for(lambda: running.items >= 2)
    front_end._rolling.drop_all_and_reset()  # what RollingBatch.java does when an iteration throws
    assert running.wait().code == 500
    after = front_end.submit(generate(OTHER_PROMPT, "a2")).wait()
    assert token_ids(after.json()) == expected(OTHER_PROMPT, "a2")
    wait_for(lambda: "rolling batch reset: aborting 1 requests" in front_end.worker.output(), 10)


def test_generation_parameters_in_one_rolling_batch(front_end, expected):
    """n, top_n_tokens, prompt log-probs, a JSON schema and a chat with choices and log-probs, for different
    adapters in the same iterations: the same code as the HTTP routes shapes the answers."""
    schema = {"type": "object", "properties": {"word": {"enum": ["yes", "no"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["word", "count"], "additionalProperties": False}
    params = {"max_new_tokens": NEW_TOKENS, "details": True}
    bodies = [
        {"inputs": PROMPT, "adapters": "a1", "parameters": {**params, "n": 2}},
        {"inputs": PROMPT, "adapters": "a2", "parameters": {**params, "top_n_tokens": 2,
                                                            "decoder_input_details": True}},
        {"inputs": OTHER_PROMPT, "parameters": {"max_new_tokens": 40, "guided_json": schema}},
        {"messages": [{"role": "user", "content": PROMPT}], "adapters": "a1", "max_tokens": 4, "n": 2, "seed": 3,
         "logprobs": True, "top_logprobs": 2},
    ]
    best, scored, structured, chat = [front_end.submit(ClientRequest.json(body)).wait().json() for body in bodies]
    assert token_ids(best) == expected(PROMPT, "a1")  # greedy: every choice is the greedy answer
    assert [token["id"] for token in best["details"]["best_of_sequences"][0]["tokens"]] == expected(PROMPT, "a1")
    assert token_ids(scored) == expected(PROMPT, "a2")
    assert [len(top) for top in scored["details"]["top_tokens"]] == [2] * NEW_TOKENS
    assert all(token["log_prob"] < 0 for token in scored["details"]["prefill"][1:])
    assert json.loads(structured["generated_text"])["word"] in ("yes", "no")
    assert [choice["index"] for choice in chat["choices"]] == [0, 1]
    assert all(len(entry["top_logprobs"]) == 2 for choice in chat["choices"] for entry in choice["logprobs"]["content"])
