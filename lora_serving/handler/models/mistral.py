"""Mistral: the Llama decoder without biases, every layer attending over a sliding window."""

from __future__ import annotations

from lora_serving.handler.models.llama import LlamaModel


class MistralModel(LlamaModel):
    @classmethod
    def has_qkv_bias(cls, hf_config) -> bool:
        return False

    @classmethod
    def has_o_bias(cls, hf_config) -> bool:
        return False

    @classmethod
    def layer_sliding_windows(cls, hf_config) -> list[int | None]:
        return [getattr(hf_config, "sliding_window", None)] * hf_config.num_hidden_layers
