"""Gemma 2 and Gemma 3 (text): the Llama decoder with Gemma's differences.

- RMSNorm multiplies by (1 + w), in fp32 before casting back (the reference's order; Llama casts first).
- Sandwich norms: the attention and MLP outputs are normed before they join the residual stream, and the
  MLP has its own input norm (pre_feedforward_layernorm).
- Embeddings are scaled by sqrt(hidden_size), rounded to the model's dtype first.
- Attention scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5.
- Sliding-window and global layers interleave as `layer_types` says.
- Gemma 2 soft-caps attention scores and final logits (`cap * tanh(x / cap)`).
- Gemma 3 norms each head of q and k before RoPE and gives sliding and global layers their own RoPE
  parameters (a local base of 10k, a global base of 1M with optional scaling).
"""

from __future__ import annotations

import torch

from lora_serving.handler.errors import ModelLoadError
from lora_serving.handler.models.llama import LlamaModel
from lora_serving.handler.models.rope import RotaryTable


def gemma_rms_norm(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight_plus_one).to(x.dtype)


class Gemma2Model(LlamaModel):
    norm = staticmethod(gemma_rms_norm)
    sandwich_norms = True

    @classmethod
    def layer_sliding_windows(cls, hf_config) -> list[int | None]:
        return cls.windows_from_layer_types(hf_config)

    @classmethod
    def query_scale(cls, hf_config, head_dim: int) -> float:
        return hf_config.query_pre_attn_scalar**-0.5

    @classmethod
    def activation_name(cls, hf_config) -> str:
        return getattr(hf_config, "hidden_activation", None) or hf_config.hidden_act

    @classmethod
    def embedding_scale(cls, hf_config) -> float | None:
        return hf_config.hidden_size**0.5

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return 1.0 + weight.to(torch.float32)


class Gemma3TextModel(Gemma2Model):
    qk_norm = True

    def __init__(self, hf_config, *args, **kwargs) -> None:
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ModelLoadError("use_bidirectional_attention=true (an embedding model) is not a causal "
                                 "language model this engine can generate with")
        super().__init__(hf_config, *args, **kwargs)

    def make_rotary(self, hf_config, layer_type: str | None = None) -> dict[str, RotaryTable]:
        layer_types = sorted(set(hf_config.layer_types))
        return {kind: super(Gemma3TextModel, self).make_rotary(hf_config, kind) for kind in layer_types}

    def rotary_for_layer(self, index: int) -> RotaryTable:
        return self.rotary[self.hf_config.layer_types[index]]
