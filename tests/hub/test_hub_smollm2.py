"""The issue's demonstration, end to end: `python -m lora_serving` with an empty model directory and
`OPTION_MODEL_ID=HuggingFaceTB/SmolLM2-135M-Instruct`, `HF_ENDPOINT` at a Hub stand-in publishing the real
SmolLM2 weights, answers chat as transformers does through the model's own chat template."""

from __future__ import annotations

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.hub.standin import HubStandin
from tests.real_model import SMOLLM2_ID
from tests.server.test_entrypoint import free_port, launch, wait_until_healthy

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24


def transformers_chat(model_dir, messages) -> str:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_python_m_lora_serving_serves_smollm2_by_hub_id(smollm2_dir, tmp_path):
    hub = HubStandin().start()
    hub.add_repo(SMOLLM2_ID, smollm2_dir)
    (tmp_path / "model").mkdir()
    port = free_port()
    process = launch(["--model-dir", str(tmp_path / "model"), "--host", "127.0.0.1"],
                     {"SAGEMAKER_BIND_TO_PORT": str(port), "OPTION_MODEL_ID": SMOLLM2_ID, "OPTION_DTYPE": "fp32",
                      "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
                      "OPTION_MAX_MODEL_LEN": "512", "OPTION_CPU_KV_CACHE_MB": "64"})
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", seconds=300)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model=SMOLLM2_ID, messages=QUESTION, max_tokens=MAX_TOKENS,
                                              temperature=0)
    finally:
        process.terminate()
        process.wait(30)
        hub.close()
    answer = chat.choices[0].message.content
    assert answer == transformers_chat(smollm2_dir, QUESTION)
    assert "Paris" in answer and chat.choices[0].finish_reason == "stop"  # it ended on <|im_end|>
    assert hub.fetched_files(SMOLLM2_ID) == {path.name for path in smollm2_dir.iterdir()} - {"README.md"}
