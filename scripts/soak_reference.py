"""The greedy answers a soak's responses must equal: transformers + PEFT (fp32), one prompt at a time, the
reference implementation that nobody here wrote."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass(frozen=True)
class Expected:
    token_ids: tuple[int, ...]
    text: str


def greedy_references(model_dir: Path, adapter_dirs: dict[str, Path], prompts: list[str],
                      max_new_tokens: int) -> dict[tuple[str, str], Expected]:
    """(prompt, adapter) -> its greedy answer, for the base model (adapter "") and every adapter."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    references = {}
    for adapter in ["", *adapter_dirs]:
        # from_pretrained wraps the modules it is given in place: a fresh copy of the base per adapter.
        model = base if not adapter else PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dirs[adapter]))
        for prompt in prompts:
            references[prompt, adapter] = _greedy(model.eval(), tokenizer, prompt, max_new_tokens)
    return references


def chat_prompt(model_dir: Path, sentence: str) -> str | None:
    """The prompt the server makes of one user message with the model's chat template (None: it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template([{"role": "user", "content": sentence}], tokenize=False,
                                         add_generation_prompt=True)


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> Expected:
    # The engine's own tokenisation of a string prompt: the tokenizer as configured (BOS if it adds one).
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_token_id)
    generated = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Expected(tuple(generated), text)
