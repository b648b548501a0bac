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
    # Layer 1 slides; head_dim set apart from hidden / heads as in the real models.
    "qwen3": {"head_dim": 32, "use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1,
              "norm_noise": 0.3},
    # A query_pre_attn_scalar unlike head_dim and soft caps low enough to bite on random weights.
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 12, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 5.0, "norm_noise": 0.3},
    # Sliding then global layers, each with its own RoPE (the global one scaled).
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 12,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                        "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                           "rope_theta": 1000000.0}},
                    "norm_noise": 0.3},
    # Phi-4-mini's partial rotary factor and a window on every layer.
    "phi3": {"sliding_window": 12, "partial_rotary_factor": 0.75, "norm_noise": 0.3},
    # Eight experts, two per token; Qwen3-MoE's experts narrower than its (unused) dense MLP size.
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 12, "norm_noise": 0.3},
    "qwen3_moe": {"head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
                  "norm_topk_prob": False, "norm_noise": 0.3},
}


# The families added after the first three, each checked against transformers and PEFT in
# tests/engine/test_families.py, and what PEFT lets an adapter target on each.
NEWER_FAMILIES = ["qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe"]
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "mixtral": ATTENTION_TARGETS,
                "qwen3_moe": ATTENTION_TARGETS}
DEFAULT_PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_targets(family: str) -> list[str]:
    return PEFT_TARGETS.get(family, DEFAULT_PEFT_TARGETS)


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
