"""Hugging Face model directories with random weights, built locally for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from lora_serving.container.demo.tokenizer import build_tokenizer

CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                  "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig, "phi3": Phi3Config,
                  "mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig}


def save_random_model(
    out_dir: str | Path,
    family: str = "llama",
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 512,
    tokenizer_vocab_size: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    init_std: float = 0.1,
    norm_noise: float = 0.0,
    **config_overrides,
) -> Path:
    """Write config.json, model.safetensors and a locally trained tokenizer into out_dir.

    A larger init_std than the usual 0.02 keeps random logits well apart, so greedy decoding of a random
    model is not decided by fp32 rounding noise. Pass an already trained `tokenizer` to reuse it.
    `norm_noise` adds that much random noise to every norm weight (otherwise all ones, or all zeros in
    Gemma's (1 + w) form), so that a test notices a norm weight applied wrongly.
    """
    out_dir = Path(out_dir)
    if tokenizer is None:
        tokenizer = build_tokenizer(out_dir, vocab_size=tokenizer_vocab_size or vocab_size)
    else:
        tokenizer.save_pretrained(str(out_dir))
    special_ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = CONFIG_CLASSES[family](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        **{**special_ids, **config_overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if norm_noise:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * norm_noise)
    model.save_pretrained(str(out_dir))
    return out_dir
