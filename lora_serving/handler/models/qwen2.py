"""Qwen2: the Llama decoder with q/k/v biases, and a sliding window only on the layers `layer_types` says."""

from __future__ import annotations

from lora_serving.handler.models.llama import LlamaModel


class Qwen2Model(LlamaModel):
    @classmethod
    def has_qkv_bias(cls, hf_config) -> bool:
        return True

    @classmethod
    def has_o_bias(cls, hf_config) -> bool:
        return False

    @classmethod
    def layer_sliding_windows(cls, hf_config) -> list[int | None]:
        return cls.windows_from_layer_types(hf_config)
