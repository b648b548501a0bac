"""The neighbouring servers' clients, unchanged, against our routes: the `openai` package on /v1 (with
`model=` an adapter) and huggingface_hub's InferenceClient on the TGI routes (with `adapter_id=`)."""

from __future__ import annotations

import json

import openai
import pytest
from huggingface_hub import InferenceClient

PROMPT = "the green horse finds a book"
MESSAGES = [{"role": "user", "content": "count the words: one two three"}]


@pytest.fixture(scope="module")
def lmi_answer(client):
    """What /invocations answers, greedy, per adapter: every other API must answer the same."""

    def answer(adapter: str | None, inputs: str = PROMPT, max_new_tokens: int = 8) -> dict:
        body = {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
        if adapter:
            body["adapters"] = adapter
        return client.post("/invocations", json=body).json()

    return answer


@pytest.fixture(scope="module")
def openai_client(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="not-checked", max_retries=0)


@pytest.fixture(scope="module")
def chat_prompt(lora_server):
    return lora_server.runtime.engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                                                    add_generation_prompt=True)


def test_models_lists_the_base_model_and_every_adapter(openai_client):
    ids = [model.id for model in openai_client.models.list()]
    assert ids[0] == "model"
    assert {"a1", "a2"} <= set(ids[1:])


@pytest.mark.parametrize("model", ["model", "a1", "a2"])
def test_completions_with_model_an_adapter(openai_client, lmi_answer, model):
    completion = openai_client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                                  logprobs=0)
    expected = lmi_answer(None if model == "model" else model)
    choice = completion.choices[0]
    assert choice.text == expected["generated_text"]
    assert choice.finish_reason in ("length", "stop")
    assert choice.logprobs.token_logprobs == pytest.approx([t["log_prob"] for t in expected["details"]["tokens"]],
                                                           abs=1e-4)
    assert completion.usage.completion_tokens == expected["details"]["generated_tokens"]


def test_completions_stream(openai_client, lmi_answer):
    chunks = list(openai_client.completions.create(model="a2", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == lmi_answer("a2")["generated_text"]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_completions_stream_with_usage_ends_with_a_chunk_without_choices(openai_client, lmi_answer, lora_server):
    chunks = list(openai_client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    expected = lmi_answer("a1")
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == expected["details"]["generated_tokens"]
    assert chunks[-1].usage.prompt_tokens == len(lora_server.runtime.engine.tokenizer(PROMPT).input_ids)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == expected["generated_text"]


def test_completions_echo_puts_the_prompt_first_whole_and_streamed(openai_client, lmi_answer):
    expected = lmi_answer("a2")["generated_text"]
    whole = openai_client.completions.create(model="a2", prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert whole.choices[0].text == PROMPT + expected
    chunks = list(openai_client.completions.create(model="a2", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(chunk.choices[0].text for chunk in chunks) == PROMPT + expected
    with pytest.raises(openai.BadRequestError, match="echo with logprobs is not supported"):
        openai_client.completions.create(model="a2", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1)


def test_bookkeeping_fields_clients_attach_are_accepted_and_change_nothing(openai_client, lmi_answer, chat_prompt):
    bookkeeping = dict(user="u-1", store=False, metadata={"team": "search"}, service_tier="auto")
    # The SDK's completions method names only `user`; the others go as its users send them, in extra_body.
    completion = openai_client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, temperature=0,
                                                  extra_body=bookkeeping)
    assert completion.choices[0].text == lmi_answer("a1")["generated_text"]
    chat = openai_client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 **bookkeeping)
    assert chat.choices[0].message.content == lmi_answer("a1", chat_prompt, 6)["generated_text"]


@pytest.mark.parametrize("field, value", [("prediction", {"type": "content", "content": "x"}),
                                          ("reasoning_effort", "high"), ("modalities", ["audio"])])
def test_fields_that_would_change_the_answer_stay_refused_by_name(openai_client, field, value):
    with pytest.raises(openai.BadRequestError, match=f"{field}: not a field this server knows or honours"):
        openai_client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=2, extra_body={field: value})


def test_stream_options_without_stream_is_refused(openai_client):
    with pytest.raises(openai.BadRequestError, match="stream_options is only allowed with stream: true"):
        openai_client.completions.create(model="a1", prompt=PROMPT, max_tokens=2,
                                         stream_options={"include_usage": True})


def test_chat_completions_with_model_an_adapter(openai_client, lmi_answer, chat_prompt):
    chat = openai_client.chat.completions.create(model="a1", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 logprobs=True)
    expected = lmi_answer("a1", chat_prompt, 6)
    assert chat.choices[0].message.content == expected["generated_text"]
    assert [entry.logprob for entry in chat.choices[0].logprobs.content] == pytest.approx(
        [t["log_prob"] for t in expected["details"]["tokens"]], abs=1e-4)
    assert chat.model == "a1"


def test_chat_completions_stream_with_usage(openai_client, lmi_answer, chat_prompt):
    stream = openai_client.chat.completions.create(model="a2", messages=MESSAGES, max_tokens=6, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == lmi_answer("a2", chat_prompt, 6)["generated_text"]
    assert chunks[-1].usage.completion_tokens <= 6


def test_openai_errors_reach_the_client_as_exceptions(openai_client):
    with pytest.raises(openai.BadRequestError, match="Adapter nope is not registered"):
        openai_client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)


@pytest.fixture(scope="module")
def tgi_client(lora_server):
    return InferenceClient(model=lora_server.url)


def test_inference_client_text_generation_with_adapter_id(tgi_client, lmi_answer):
    expected = lmi_answer("a1")
    output = tgi_client.text_generation(PROMPT, max_new_tokens=8, adapter_id="a1", details=True,
                                        decoder_input_details=True)
    assert output.generated_text == expected["generated_text"]
    assert [token.id for token in output.details.tokens] == [t["id"] for t in expected["details"]["tokens"]]
    assert output.details.finish_reason == expected["details"]["finish_reason"]
    assert len(output.details.prefill) > 0
    assert tgi_client.text_generation(PROMPT, max_new_tokens=8, adapter_id="a1") == expected["generated_text"]


def test_inference_client_streams_tokens_with_details(tgi_client, lmi_answer):
    expected = lmi_answer("a2")
    events = list(tgi_client.text_generation(PROMPT, max_new_tokens=8, adapter_id="a2", stream=True, details=True))
    assert [event.token.id for event in events] == [t["id"] for t in expected["details"]["tokens"]]
    assert events[-1].generated_text == expected["generated_text"]
    assert events[-1].details.generated_tokens == len(events)
    plain = list(tgi_client.text_generation(PROMPT, max_new_tokens=8, adapter_id="a2", stream=True))
    assert "".join(plain) == expected["generated_text"]


def test_tgi_generate_and_generate_stream_routes(client, lmi_answer):
    expected = lmi_answer(None)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "details": True}}
    answer = client.post("/generate", json=body).json()
    assert answer["generated_text"] == expected["generated_text"]
    assert all(set(token) == {"id", "text", "logprob", "special"} for token in answer["details"]["tokens"])
    with client.stream("POST", "/generate_stream", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data:"):]) for line in response.iter_lines() if line.startswith("data:")]
    assert [event["index"] for event in events] == list(range(len(events)))
    assert events[-1]["generated_text"] == expected["generated_text"]
    assert events[-1]["details"]["input_length"] > 0
