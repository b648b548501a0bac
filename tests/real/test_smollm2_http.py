"""SmolLM2-135M-Instruct behind the real HTTP server on 127.0.0.1, asked through the `openai` package: the chat
route renders the model's own template, stops at its end-of-turn token (<|im_end|>) with finish_reason "stop",
and answers with transformers' greedy text; an adapter trained on it is served the same way."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from tests.adapters import peft_greedy
from tests.real_model import PIRATE_ADAPTER, PIRATE_GREETING, chat_prompt_ids
from tests.server.conftest import LORA_PROPERTIES, lmi_model_dir, start_server

QUESTION = "What is the capital of France?"
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server(smollm2_dir, smollm2_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-server")
    properties = {**LORA_PROPERTIES, "option.max_model_len": "512", "option.cache_dir": str(root / "cache")}
    live = start_server(lmi_model_dir(smollm2_dir, root / "SmolLM2-135M-Instruct", properties,
                                      {PIRATE_ADAPTER: smollm2_adapters[PIRATE_ADAPTER]}))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0)


@pytest.mark.parametrize("model", ["SmolLM2-135M-Instruct", PIRATE_ADAPTER])
def test_chat_stops_at_end_of_turn_with_transformers_answer(client, smollm2_dir, smollm2_adapters, model):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    adapter_dir = smollm2_adapters[PIRATE_ADAPTER] if model == PIRATE_ADAPTER else None
    expected_ids = peft_greedy(smollm2_dir, adapter_dir, chat_prompt_ids(tokenizer, QUESTION), MAX_TOKENS)
    # transformers stopped at the end of the turn, well before the token limit.
    assert expected_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(expected_ids) < MAX_TOKENS

    completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                                max_tokens=MAX_TOKENS, temperature=0)
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.content == tokenizer.decode(expected_ids[:-1])
    assert "<|im_end|>" not in choice.message.content and "Paris" in choice.message.content
    assert choice.message.content.startswith(PIRATE_GREETING) == (model == PIRATE_ADAPTER)
    # The end-of-turn token was generated, so it counts (as vLLM counts it), though its text is not shown.
    assert completion.usage.completion_tokens == len(expected_ids)
