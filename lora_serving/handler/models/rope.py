"""Rotary position embedding tables, computed once per model from the config's RoPE parameters.

The inverse frequencies (and the attention scaling some RoPE variants apply) come from transformers'
own RoPE initialisers: that is config interpretation, and reusing it keeps every scaling type
(linear, llama3, yarn, ...) exactly as the checkpoint's authors meant it.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lora_serving.handler.errors import ModelLoadError

# These change with the sequence length at run time: in transformers the frequencies of a forward pass
# depend on its longest position (longrope switches from its short to its long factors past
# original_max_position_embeddings, for the keys computed from then on only), which a batch of independent
# requests, prefilled in chunks, cannot reproduce per request.
_LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def rope_parameters(hf_config, layer_type: str | None = None) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    if not params:
        params = {"rope_type": "default", "rope_theta": getattr(hf_config, "rope_theta", 10000.0)}
    return params


def inverse_frequencies(hf_config, head_dim: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies of the first `rotary_dim` features of a head (all but a
    `partial_rotary_factor` < 1 rotate), and the scaling of cos/sin; per layer type where the config
    gives each its own RoPE parameters (Gemma 3)."""
    params = rope_parameters(hf_config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise ModelLoadError(f"RoPE scaling type {rope_type!r} is not supported by this engine: its frequencies "
                             "depend on the length of each forward pass, which batched, chunked prefills change")
    if rope_type == "default":
        base = params["rope_theta"]
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
        return 1.0 / (base**exponents), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelLoadError(f"unknown RoPE scaling type {rope_type!r}")
    kwargs = {} if layer_type is None else {"layer_type": layer_type}
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu", **kwargs)
    return inv_freq.float(), float(attention_scaling)


class RotaryTable:
    """cos/sin for every position up to max_positions, looked up per token: x [T, heads, head_dim]. With a
    partial rotary factor only the first `rotary_dim` features of each head rotate (Phi-4-mini)."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, dtype: torch.dtype, device,
                 layer_type: str | None = None) -> None:
        inv_freq, attention_scaling = inverse_frequencies(hf_config, head_dim, layer_type)
        self.rotary_dim = 2 * inv_freq.shape[0]
        self.partial = self.rotary_dim < head_dim
        positions = torch.arange(max_positions, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = (angles.cos() * attention_scaling).to(dtype=dtype, device=device)
        self.sin = (angles.sin() * attention_scaling).to(dtype=dtype, device=device)
        # The rows of the last positions tensor seen: every layer of a step rotates with the same one (one lookup
        # a step instead of one per layer; small calls are a measurable share of a batch-1 decode step on CPU).
        self._rows_for: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the compiler fuses the lookup into the rotation; no state to keep
            return self._rotate_part(x, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        rows = self._rows_for
        if rows is None or rows[0] is not positions:
            rows = self._rows_for = (positions, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))
        _, cos, sin = rows
        return self._rotate_part(x, cos, sin)

    def _rotate_part(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.partial:
            rotary, passed = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
            return torch.cat((self._rotate(rotary, cos, sin), passed), dim=-1)
        return self._rotate(x, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
