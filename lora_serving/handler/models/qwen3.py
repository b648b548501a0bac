"""Qwen3: the Llama decoder with an RMSNorm over each head of q and k before RoPE (self_attn.q_norm, k_norm),
biases only where `attention_bias` says, and sliding windows on the layers `layer_types` names (as Qwen2)."""

from __future__ import annotations

from lora_serving.handler.models.llama import LlamaModel


class Qwen3Model(LlamaModel):
    qk_norm = True

    @classmethod
    def layer_sliding_windows(cls, hf_config) -> list[int | None]:
        return cls.windows_from_layer_types(hf_config)
