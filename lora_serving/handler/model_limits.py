"""What the model sets for every request: its maximum length, and the tokens that end a sequence."""

from __future__ import annotations

from pathlib import Path

from transformers import GenerationConfig

from lora_serving.handler.config import Config
from lora_serving.handler.errors import ConfigError


def resolve_max_model_len(config: Config, max_position_embeddings: int) -> int:
    if config.max_model_len is None:
        return max_position_embeddings
    if config.max_model_len > max_position_embeddings:
        raise ConfigError("max_model_len", config.max_model_len,
                          f"exceeds the model's max_position_embeddings ({max_position_embeddings})")
    return config.max_model_len


def eos_token_ids(model_dir: Path, hf_config, tokenizer) -> frozenset[int]:
    """End-of-sequence ids as transformers' generate() uses them: generation_config.json first."""
    eos = None
    if (model_dir / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
