"""Greedy answers of a built demo model directory, from transformers + PEFT: the reference implementation."""

from __future__ import annotations

import copy
import tarfile
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_serving.container.demo.examples import BASE_MODEL, DEMO_MAX_NEW_TOKENS


def greedy_outputs(
    model_dir: Path, prompts: Sequence[str], max_new_tokens: int = DEMO_MAX_NEW_TOKENS
) -> dict[str, list[str]]:
    """Map BASE_MODEL and each adapter in adapters.tar.gz to its greedy answers to `prompts`, in fp32."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = {BASE_MODEL: [_greedy_answer(base_model, tokenizer, prompt, max_new_tokens) for prompt in prompts]}
    with tempfile.TemporaryDirectory() as adapters_root:
        with tarfile.open(Path(model_dir) / "adapters.tar.gz") as archive:
            archive.extractall(adapters_root, filter="data")
        for adapter_dir in sorted(Path(adapters_root).iterdir()):
            # from_pretrained wraps the modules it is given in place, hence a fresh copy per adapter.
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dir).eval()
            outputs[adapter_dir.name] = [
                _greedy_answer(peft_model, tokenizer, prompt, max_new_tokens) for prompt in prompts
            ]
    return outputs


def _greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt at a time: no padding, so nothing but the prompt decides the answer."""
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(generated[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
