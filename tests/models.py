"""Tiny local models for the tests, built once per test session, and the transformers reference."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lora_serving.container.demo.random_model import save_random_model

# Small shapes with grouped-query attention (4 query heads share 2 KV heads).
TINY_SHAPE = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

FAMILY_OVERRIDES = {
    "llama": {},
    # A window much shorter than the test sequences, so that it really cuts attention off.
    "mistral": {"sliding_window": 12},
    "qwen2": {},
}


class TinyModelFactory:
    """Builds each named variant once per session, sharing one trained tokenizer."""

    def __init__(self, root: Path, tokenizer) -> None:
        self.root = root
        self.tokenizer = tokenizer
        self._built: dict[str, Path] = {}

    def get(self, name: str, family: str = "llama", **overrides) -> Path:
        if name not in self._built:
            options = {**TINY_SHAPE, **FAMILY_OVERRIDES[family], **overrides}
            self._built[name] = save_random_model(self.root / name, family, tokenizer=self.tokenizer, **options)
        return self._built[name]


@functools.lru_cache(maxsize=4)
def reference_model(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def reference_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
    """transformers' own greedy generate() for one prompt alone: the token ids after the prompt."""
    model = reference_model(model_dir)
    saved_eos = model.generation_config.eos_token_id
    if not stop_at_eos:
        model.generation_config.eos_token_id = None
    try:
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=model.config.pad_token_id)
    finally:
        model.generation_config.eos_token_id = saved_eos
    return out[0, len(prompt_ids):].tolist()
