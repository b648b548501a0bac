"""The generation parameters LMI, vLLM, OpenAI and TGI users send, through every route, with adapters in
the same batch: n / best_of, penalties, top-N and prompt log-probs, structured output. The real `openai`
and huggingface_hub clients are used unchanged."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch
from huggingface_hub import InferenceClient

from tests.models import reference_model

PROMPT = "the green horse finds a book"
SCHEMA = {
    "type": "object",
    "properties": {
        "animal": {"enum": ["cat", "dog", "horse"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "names": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "tag": {"type": "string", "pattern": "^[a-z]{2}[0-9]$"},
        "owner": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 1, "maximum": 99}},
                  "required": ["age"], "additionalProperties": False},
    },
    "required": ["animal", "legs", "names", "tag", "owner"],
    "additionalProperties": False,
}


def post(client, body, path="/invocations", **kwargs):
    response = client.post(path, json=body, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def openai_client(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="not-checked", max_retries=0)


def test_a_stop_token_ends_the_answer_without_its_text_and_stays_in_details_and_logprobs(client, openai_client):
    free = post(client, {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}})
    tokens = free["details"]["tokens"]
    stop = next(token for token in tokens[2:] if token["text"].strip())  # a token with visible text
    cut = next(index for index, token in enumerate(tokens) if token["id"] == stop["id"])
    stopped = post(client, {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True,
                                                             "stop_token_ids": [stop["id"]]}})
    assert stopped["generated_text"] == "".join(token["text"] for token in tokens[:cut])
    assert [token["id"] for token in stopped["details"]["tokens"]] == [token["id"] for token in tokens[: cut + 1]]
    assert stopped["details"]["tokens"][-1]["text"] == stop["text"]
    base_model = openai_client.models.list().data[0].id
    completion = openai_client.completions.create(model=base_model, prompt=PROMPT, max_tokens=6, logprobs=1, temperature=0,
                                                  extra_body={"stop_token_ids": [stop["id"]]})
    assert completion.choices[0].text == stopped["generated_text"]
    assert completion.choices[0].logprobs.tokens[-1] == stop["text"]


def test_lmi_top_tokens_and_prompt_log_probs(client, lora_server, server_base):
    answer = post(client, {"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True,
                                                            "top_n_tokens": 3, "decoder_input_details": True}})
    details = answer["details"]
    assert [len(top) for top in details["top_tokens"]] == [3] * 4
    for token, top in zip(details["tokens"], details["top_tokens"]):
        assert top[0]["id"] == token["id"] and top[0]["log_prob"] == pytest.approx(token["log_prob"])
        assert top[0]["log_prob"] >= top[1]["log_prob"] >= top[2]["log_prob"]
    prefill = details["prefill"]
    ids = torch.tensor([[token["id"] for token in prefill]])
    log_probs = torch.log_softmax(reference_model(server_base)(ids).logits[0, :-1].float(), dim=-1)
    expected = log_probs.gather(1, ids[0, 1:, None]).squeeze(1)
    assert prefill[0]["log_prob"] is None
    assert [token["log_prob"] for token in prefill[1:]] == pytest.approx(expected.tolist(), abs=1e-4)

    stream = client.post("/invocations", json={"inputs": PROMPT, "stream": True, "parameters": {
        "max_new_tokens": 4, "top_n_tokens": 3, "details": True}})
    records = [json.loads(line) for line in stream.text.splitlines()]
    assert [record["top_tokens"] for record in records] == details["top_tokens"]
    assert records[-1]["details"]["top_tokens"] == details["top_tokens"]


def test_lmi_n_answers_best_of_sequences(client):
    params = {"max_new_tokens": 6, "do_sample": True, "seed": 11, "temperature": 1.5}
    answer = post(client, {"inputs": PROMPT, "adapters": "a1", "parameters": {**params, "n": 3}})
    alone = [post(client, {"inputs": PROMPT, "adapters": "a1", "parameters": {**params, "seed": 11 + i}})
             for i in range(3)]
    texts = [answer["generated_text"]] + [other["generated_text"] for other in answer["details"]["best_of_sequences"]]
    assert texts == [one["generated_text"] for one in alone]


def test_lmi_structured_output_with_an_adapter_next_to_plain_requests(client):
    """JSON-schema, regex and choice requests for different adapters run alongside plain ones, which answer
    exactly as they do alone."""
    plain = {"inputs": "a small river", "parameters": {"max_new_tokens": 10}}
    plain_alone = post(client, {**plain, "adapters": "a2"})
    bodies = [
        {"inputs": PROMPT, "adapters": "a1", "parameters": {"max_new_tokens": 200, "guided_json": SCHEMA}},
        {"inputs": PROMPT, "adapters": "a2", "parameters": {"max_new_tokens": 200, "guided_json": json.dumps(SCHEMA),
                                                            "do_sample": True, "seed": 4, "presence_penalty": 1.0}},
        {"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "guided_regex": "[A-Z]{3}-[0-9]{2}"}},
        {"inputs": PROMPT, "adapters": "a1", "parameters": {"max_new_tokens": 20, "guided_choice": ["yes", "no"]}},
        {**plain, "adapters": "a2"},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: post(client, body), bodies))
    for answer in answers[:2]:
        jsonschema.validate(json.loads(answer["generated_text"]), SCHEMA)
    assert answers[2]["generated_text"][:3].isupper() and answers[2]["generated_text"][3] == "-"
    assert answers[3]["generated_text"] in ("yes", "no")
    assert answers[4] == plain_alone


def test_openai_client_n_logprobs_and_top_logprobs(openai_client):
    completion = openai_client.completions.create(model="a2", prompt=[PROMPT, "a small river"], max_tokens=5, n=2,
                                                  temperature=0, logprobs=3)
    assert [choice.index for choice in completion.choices] == [0, 1, 2, 3]
    assert completion.choices[0].text == completion.choices[1].text  # greedy: both choices agree
    top = completion.choices[0].logprobs.top_logprobs
    assert len(top) == 5 and all(len(entry) <= 3 for entry in top)
    assert completion.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in completion.choices)

    chat = openai_client.chat.completions.create(model="a1", messages=[{"role": "user", "content": PROMPT}],
                                                 max_tokens=5, n=3, seed=5, logprobs=True, top_logprobs=2)
    assert [choice.index for choice in chat.choices] == [0, 1, 2]
    for choice in chat.choices:
        for entry in choice.logprobs.content:
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-5

    chunks = list(openai_client.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, n=3, seed=5, stream=True))
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [choice.message.content for choice in chat.choices]


def test_openai_client_response_format(openai_client):
    chat = openai_client.chat.completions.create(
        model="a2", messages=[{"role": "user", "content": "describe an animal"}], max_tokens=200, seed=8,
        response_format={"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    completion = openai_client.completions.create(model="model", prompt=PROMPT, max_tokens=40,
                                                  extra_body={"guided_choice": ["alpha", "beta"]})
    assert completion.choices[0].text in ("alpha", "beta")


def test_tgi_client_best_of_top_tokens_and_grammar(lora_server):
    client = InferenceClient(model=lora_server.url)
    answer = client.text_generation(PROMPT, max_new_tokens=5, details=True, top_n_tokens=2, best_of=2,
                                    do_sample=True, seed=3, adapter_id="a1")
    assert len(answer.details.best_of_sequences) == 1
    assert [len(top) for top in answer.details.top_tokens] == [2] * len(answer.details.tokens)
    text = client.text_generation(PROMPT, max_new_tokens=200, grammar={"type": "json", "value": SCHEMA})
    jsonschema.validate(json.loads(text), SCHEMA)
