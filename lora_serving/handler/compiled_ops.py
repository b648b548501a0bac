"""The engine's opaque steps as torch custom ops, so that torch.compile can trace a decode step around them.

The compiled decode step (handler/runner/compiled_decode.py) fuses what lies between the projections: norms,
RoPE, residual adds, the activation. Three things stay as they are in the eager path and enter the graph as
ops it calls but does not look into:
- a projection (handler/models/projection.py): oneDNN's packed weight and the C matvec kernel are called through
  ctypes and opaque tensors, which the compiler cannot trace;
- decode attention with its K/V write: the C kernel reading the paged cache through block tables
  (kernels/cpu_attention.py);
- a LoRA group's delta: the step's adapter plan is Python metadata (segments by slot), built once per step.

Custom ops take tensors and plain scalars only, so the projection and LoRA ops name their object by an integer key
(a projection) or find it in `current_lora` (the step being run), which the compiled step sets around its call.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch

from lora_serving.handler.attention import write_kv
from lora_serving.kernels import cpu_attention

_projections: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_projection_keys = itertools.count()
# The running step's LoRA applier (handler/lora/step_applier.py): set by `lora_for_step` around a compiled call.
_current_lora: list = [None]


def register_projection(projection) -> int:
    """A key by which the `project` op finds `projection` (held weakly: a model's projections live as it does)."""
    key = next(_projection_keys)
    _projections[key] = projection
    return key


@contextlib.contextmanager
def lora_for_step(applier):
    _current_lora[0] = applier
    try:
        yield
    finally:
        _current_lora[0] = None


@torch.library.custom_op("lora_serving::project", mutates_args=())
def project(x: torch.Tensor, key: int) -> torch.Tensor:
    return _projections[key].eager(x)


@project.register_fake
def _(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], _projections[key].out_features)


@torch.library.custom_op("lora_serving::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     sliding_window: int, scale: float) -> torch.Tensor:
    """One decode token per sequence: writes k, v [B, kv_heads, d] at slot_mapping, then attends q [B, q_heads, d]
    to each sequence's cached keys (its own included) in the C kernel. sliding_window 0: none."""
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    starts = (context_lens - sliding_window).clamp_(min=0) if sliding_window else None
    return cpu_attention.decode_attention(q, k_cache, v_cache, block_tables, context_lens, starts, scale)


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, sliding_window, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("lora_serving::lora_add", mutates_args=("y",))
def lora_add(y: torch.Tensor, x: torch.Tensor, layer_index: int, group: str) -> None:
    """y += the step's LoRA delta of one projection group of one layer (in place, as the eager path does); nothing
    in a step without adapters."""
    applier = _current_lora[0]
    if applier is not None:
        applier.apply(layer_index, group, y, x)


@lora_add.register_fake
def _(y, x, layer_index, group):
    return None
