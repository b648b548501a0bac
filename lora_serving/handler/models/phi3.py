"""Phi-3 / Phi-4: the Llama decoder stored with fused projections, q/k/v in one `self_attn.qkv_proj` and
gate/up in one `mlp.gate_up_proj` (rows stacked in that order), without biases; a sliding window on every
layer when the config sets one; RoPE over the first `partial_rotary_factor` of each head (Phi-4-mini).

The fused tensors are read row range by row range into the engine's own q/k/v and gate/up groups (a
tensor-parallel rank reads only its heads' rows). PEFT trains LoRA on the fused modules; an adapter's
qkv_proj A is shared by q, k and v and its B split by the same rows (lora/peft_adapter.py).
"""

from __future__ import annotations

from lora_serving.handler.models.mistral import MistralModel


class Phi3Model(MistralModel):  # Mistral's: no biases, the window (when set) on every layer
    fused_checkpoint_modules = {"qkv": "qkv_proj", "gate_up": "gate_up_proj"}
    peft_modules = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
                    "gate_up_proj": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}
