"""SageMaker / LMI inference through real HTTP: /ping, /invocations, /predictions/{model}, the LMI schema,
adapter choice, streaming (jsonlines and SSE, parsed line by line) and the chat form."""

from __future__ import annotations

import json

import pytest

from tests.adapters import peft_greedy

ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
PROMPTS = ["the red cat sees a dog", "hello world, one two three", "a small river"]


def post(client, body, path="/invocations", **kwargs):
    response = client.post(path, json=body, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(answer: dict) -> list[int]:
    return [token["id"] for token in answer["details"]["tokens"]]


@pytest.fixture(scope="module")
def expected(lora_server, server_base, server_adapters):
    """Greedy answers of transformers + PEFT, per adapter (None: the base model) and prompt."""
    engine = lora_server.runtime.engine
    return {
        adapter: {prompt: peft_greedy(server_base, server_adapters.get(adapter), engine.tokenize(prompt), 8)
                  for prompt in PROMPTS}
        for adapter in (None, "a1", "a2")
    }


def test_ping_answers_200_once_the_engine_steps(client):
    response = client.get("/ping")
    assert response.status_code == 200
    assert response.json() == {"status": "Healthy"}


def test_a_string_input_answers_generated_text_only(client):
    answer = post(client, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 5}})
    assert set(answer) == {"generated_text"}
    assert isinstance(answer["generated_text"], str) and answer["generated_text"]


@pytest.mark.parametrize("adapter", [None, "a1", "a2"])
def test_greedy_answers_equal_transformers_and_peft(client, expected, adapter):
    body = {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8, "details": True}}
    if adapter:
        body["adapters"] = adapter
    assert token_ids(post(client, body)) == expected[adapter][PROMPTS[0]]


def test_sagemaker_lora_example_payloads(client, expected):
    """The shapes of the SageMaker multi-adapter examples: a list of inputs with one adapter each."""
    one = post(client, {"inputs": [PROMPTS[1]], "adapters": ["a1"], "parameters": {"max_new_tokens": 8,
                                                                                   "details": True}})
    assert [token_ids(item) for item in one] == [expected["a1"][PROMPTS[1]]]
    mixed = post(client, {"inputs": PROMPTS, "adapters": ["a1", "", "a2"],
                          "parameters": {"max_new_tokens": 8, "details": True}})
    assert [token_ids(item) for item in mixed] == [
        expected["a1"][PROMPTS[0]], expected[None][PROMPTS[1]], expected["a2"][PROMPTS[2]]]


def test_one_adapter_string_applies_to_every_input(client, expected):
    answers = post(client, {"inputs": PROMPTS[:2], "adapters": "a2", "parameters": {"max_new_tokens": 8,
                                                                                    "details": True}})
    assert [token_ids(item) for item in answers] == [expected["a2"][prompt] for prompt in PROMPTS[:2]]


def test_adapter_choice_header_then_body_then_query(client, expected):
    body = {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 8, "details": True}}
    by_header = post(client, {**body, "adapters": "a1"}, "/invocations?adapter=a1", headers={ADAPTER_HEADER: "a2"})
    by_body = post(client, {**body, "adapters": "a1"}, "/invocations?adapter=a2")
    by_query = post(client, body, "/invocations?adapter=a2")
    assert token_ids(by_header) == expected["a2"][PROMPTS[2]]
    assert token_ids(by_body) == expected["a1"][PROMPTS[2]]
    assert token_ids(by_query) == expected["a2"][PROMPTS[2]]


def test_predictions_route_is_the_same_as_invocations(client, expected):
    answer = post(client, {"inputs": PROMPTS[0], "adapters": "a1", "parameters": {"max_new_tokens": 8,
                                                                                  "details": True}},
                  "/predictions/any-model-name")
    assert token_ids(answer) == expected["a1"][PROMPTS[0]]


def test_details_and_decoder_input_details(client, lora_server):
    answer = post(client, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4, "details": True,
                                                                "decoder_input_details": True}})
    details = answer["details"]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(details["tokens"]) <= 4
    assert details["inputs"] == PROMPTS[0]
    assert all(set(token) == {"id", "text", "log_prob"} and token["log_prob"] <= 0 for token in details["tokens"])
    assert "".join(token["text"] for token in details["tokens"]) == answer["generated_text"]
    prompt_ids = lora_server.runtime.engine.tokenize(PROMPTS[0])
    assert [token["id"] for token in details["prefill"]] == prompt_ids


def test_return_full_text_prepends_the_prompt(client):
    plain = post(client, {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 4}})
    full = post(client, {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 4, "return_full_text": True}})
    assert full["generated_text"] == PROMPTS[1] + plain["generated_text"]


def test_a_stop_sequence_ends_the_answer_before_it(client):
    answer = post(client, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8, "details": True,
                                                                "ignore_eos_token": True}})
    text = answer["generated_text"]
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), text
    stopped = post(client, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 8, "details": True,
                                                                 "ignore_eos_token": True,
                                                                 "stop_sequences": [stop]}})
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"] == text[: text.index(stop)]


def stream_lines(client, body, path="/invocations", **kwargs) -> tuple[str, list[str]]:
    with client.stream("POST", path, json=body, **kwargs) as response:
        assert response.status_code == 200, response.read()
        return response.headers["content-type"], list(response.iter_lines())


def test_streaming_jsonlines_one_token_per_line(client, expected):
    body = {"inputs": PROMPTS[1], "adapters": "a2", "stream": True,
            "parameters": {"max_new_tokens": 8, "details": True}}
    content_type, lines = stream_lines(client, body)
    assert content_type.startswith("application/jsonlines")
    records = [json.loads(line) for line in lines if line]
    assert all(set(record["token"]) == {"id", "text", "log_prob"} for record in records)
    assert [record["token"]["id"] for record in records] == expected["a2"][PROMPTS[1]]
    *middle, last = records
    assert all(set(record) == {"token"} for record in middle)
    assert last["generated_text"] == "".join(record["token"]["text"] for record in records)
    assert last["details"]["generated_tokens"] == len(records)
    assert last["details"]["inputs"] == PROMPTS[1]


def test_streaming_sse_when_the_request_asks_for_it(client):
    body = {"inputs": PROMPTS[0], "stream": True, "parameters": {"max_new_tokens": 5, "output_formatter": "sse"}}
    content_type, lines = stream_lines(client, body)
    assert content_type.startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in lines if line]
    assert all(line.startswith("data: ") for line in lines if line)
    assert events[-1]["generated_text"] == "".join(event["token"]["text"] for event in events)
    non_streamed = post(client, {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 5}})
    assert events[-1]["generated_text"] == non_streamed["generated_text"]


def test_chat_messages_answer_a_chat_completion(client, lora_server):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cat?"}]
    answer = post(client, {"messages": messages, "max_tokens": 6, "temperature": 0}, headers={ADAPTER_HEADER: "a1"})
    assert answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("length", "stop")
    assert answer["usage"]["completion_tokens"] <= 6
    # The prompt is the tokenizer's own chat template, so the same text as LMI inputs gives the same answer.
    prompt = lora_server.runtime.engine.tokenizer.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)
    same = post(client, {"inputs": prompt, "adapters": "a1", "parameters": {"max_new_tokens": 6}})
    assert choice["message"]["content"] == same["generated_text"]


def test_chat_messages_stream_as_chunks(client):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "temperature": 0, "stream": True}
    _, lines = stream_lines(client, body)
    chunks = [json.loads(line) for line in lines if line]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks)
    whole = post(client, {"messages": body["messages"], "max_tokens": 5, "temperature": 0})
    assert text == whole["choices"][0]["message"]["content"]
