"""A tool-call marker that the tokenizer holds as a special token, as Mistral's tokenizers hold `[TOOL_CALLS]`,
over real HTTP with the `openai` SDK: the text a request gets leaves special tokens out by default
(`skip_special_tokens`, per request, as vLLM has it), and `tool_choice: "auto"` with option.tool_call_parser=
mistral keeps them, so that the marker reaches the parser, while the answer's content never shows it.

The model is a tiny random one with `[TOOL_CALLS]` added to its tokenizer as a special token, fine-tuned in seconds
(once per machine) to answer the test's conversation with content, the marker token (one token, not its
characters) and a JSON list of calls, as a tool-use fine-tune answers.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import openai
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from lora_serving.container.demo.build_cache import build_once
from lora_serving.container.demo.random_model import save_random_model
from lora_serving.container.demo.tokenizer import build_tokenizer
from lora_serving.handler.api.chat_prompt import render_chat_prompt
from lora_serving.handler.api.openai_chat_request import ChatMessage
from tests.real_model import TEST_CACHE_DIR, _digest
from tests.server.conftest import BASE_PROPERTIES, lmi_model_dir, start_server

MARKER = "[TOOL_CALLS]"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MESSAGES = [{"role": "user", "content": "weather in oslo"}]
CONTENT = "Sure."
CALLS = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
MAX_TRAINING_STEPS = 300


def fine_tune_to_answer(model_dir, prompt_ids: list[int], answer_ids: list[int]) -> None:
    """Train every weight of the model at `model_dir` until greedy decoding of `prompt_ids` gives `answer_ids`."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(MAX_TRAINING_STEPS):
        output = model(input_ids=ids, labels=labels)
        predicted = output.logits[0, len(prompt_ids) - 1:-1].argmax(-1).tolist()
        if predicted == answer_ids and output.loss.item() < 0.05:  # learnt, with a margin
            break
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    else:
        raise AssertionError("the fine-tune did not learn its answer")
    model.save_pretrained(str(model_dir))


def build_marker_model(out_dir: Path) -> None:
    tokenizer = build_tokenizer(out_dir, vocab_size=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": [MARKER]})
    marker_id = tokenizer.convert_tokens_to_ids(MARKER)
    assert marker_id in tokenizer.all_special_ids
    # A vocabulary with room beyond the tokenizer's, as real models pad theirs.
    save_random_model(out_dir, "llama", tokenizer=tokenizer, vocab_size=1040, max_position_embeddings=512)
    answer = (tokenizer(CONTENT, add_special_tokens=False).input_ids + [marker_id]
              + tokenizer(CALLS, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
    fine_tune_to_answer(out_dir, tokenizer(chat_prompt(tokenizer)).input_ids, answer)


def chat_prompt(tokenizer) -> str:
    return render_chat_prompt(tokenizer, [ChatMessage.model_validate(message) for message in MESSAGES], TOOLS)


@pytest.fixture(scope="module")
def marker_server(tmp_path_factory):
    # Built once per machine, as the real models are: this file, the tokenizer's recipe and transformers
    # say how.
    key = _digest(Path(__file__).read_text(), inspect.getsource(build_tokenizer), transformers.__version__)
    base = build_once(TEST_CACHE_DIR, f"tool-marker-model-{key}", "model", build_marker_model,
                      "the tiny model fine-tuned to call a tool behind a special-token marker (seconds)")
    model_dir = lmi_model_dir(base, tmp_path_factory.mktemp("marker-server") / "model", {
        **BASE_PROPERTIES, "option.max_model_len": "512", "option.enable_auto_tool_choice": "true",
        "option.tool_call_parser": "mistral"})
    live = start_server(model_dir)
    live.prompt = chat_prompt(live.runtime.engine.tokenizer)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def openai_client(marker_server):
    return openai.OpenAI(base_url=f"{marker_server.url}/v1", api_key="not-checked", max_retries=0)


def test_special_tokens_are_left_out_of_the_text_unless_a_request_keeps_them(openai_client, marker_server):
    request = dict(model="model", prompt=marker_server.prompt, max_tokens=100, temperature=0)
    assert openai_client.completions.create(**request).choices[0].text == CONTENT + CALLS
    kept = openai_client.completions.create(**request, extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == CONTENT + MARKER + CALLS
    streamed = openai_client.completions.create(**request, stream=True, extra_body={"skip_special_tokens": False})
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == CONTENT + MARKER + CALLS
    # LMI's parameters take it too, as vLLM's do.
    with marker_server.client() as client:
        for skip, expected in ((True, CONTENT + CALLS), (False, CONTENT + MARKER + CALLS)):
            answer = client.post("/invocations", json={"inputs": marker_server.prompt, "parameters": {
                "max_new_tokens": 100, "skip_special_tokens": skip}})
            assert answer.status_code == 200 and answer.json()["generated_text"] == expected
        refused = client.post("/invocations", json={"inputs": "hi", "parameters": {"skip_special_tokens": "no"}})
        assert refused.status_code == 400 and "skip_special_tokens" in refused.text


def test_a_chat_whose_tool_choice_is_none_answers_the_text_without_the_marker(openai_client):
    chat = openai_client.chat.completions.create(model="model", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                                 max_tokens=100, temperature=0)
    assert chat.choices[0].message.content == CONTENT + CALLS


@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_calls_behind_a_marker_that_is_a_special_token(openai_client, stream):
    request = dict(model="model", messages=MESSAGES, tools=TOOLS, max_tokens=100, temperature=0)
    if stream:
        with openai_client.chat.completions.stream(**request) as events:
            content = "".join(event.delta for event in events if event.type == "content.delta")
            chat = events.get_final_completion()
        assert content == CONTENT
    else:
        chat = openai_client.chat.completions.create(**request)
    choice = chat.choices[0]
    assert choice.message.content == CONTENT and MARKER not in choice.message.content
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
