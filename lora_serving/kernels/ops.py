"""The public LoRA ops, and the choice between the Triton kernels and the torch path.

Semantics, for every token t of the batch (scaling is already folded into lora_b):
    s = token_slots[t]; r = slot_ranks[s]              # s == -1 or r == 0: y[t] unchanged
    y[t] += (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T
Shapes: x [T, H], y [T, O], lora_a [S, R_max, H], lora_b [S, O, R_max], token_slots [T], slot_ranks [S].
"""

import functools
import importlib
import os

from .metadata import LoraBatchMeta
from .torch_path import add_lora_torch

BACKENDS = ("auto", "triton", "torch")
# "torch" forces the torch path everywhere (benchmarks, debugging); "auto" uses Triton on CUDA.
DEFAULT_BACKEND = os.environ.get("LORA_KERNEL_BACKEND", "auto")


def add_lora(y, x, lora_a, lora_b, token_slots, slot_ranks, meta=None, *, backend=None) -> None:
    """In place: y[t] += (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T, s = token_slots[t], r = slot_ranks[s].

    x [T, H]; y [T, O]; lora_a [S, R_max, H]; lora_b [S, O, R_max]; token_slots [T] int (-1: no
    adapter); slot_ranks [S] int (0: the slot's adapter does not target this module). x, y and the
    weights share one dtype. meta: this step's LoraBatchMeta (built here, with a sync, when None).
    backend: "auto" (Triton for CUDA tensors), "triton" or "torch"; default $LORA_KERNEL_BACKEND.
    """
    add_lora_packed(y, x, (lora_a,), (lora_b,), token_slots, (slot_ranks,), meta, backend=backend)


def add_lora_packed(
    y, x, lora_a_slices, lora_b_slices, token_slots, slot_ranks_slices, meta=None, *, backend=None
) -> None:
    """add_lora for several output slices of one fused projection (q/k/v, gate/up) in one call.

    Slice i adds into y[:, offset_i : offset_i + O_i], offsets being the running sum of the O_i in
    order; lora_a_slices[i] [S, R_max, H], lora_b_slices[i] [S, O_i, R_max], slot_ranks_slices[i] [S].
    Each slice may be a separate buffer; lora_a slices laid out by allocate_lora_group_buffers are shrunk
    together on the torch path.
    """
    _check_shapes(y, x, lora_a_slices, lora_b_slices, token_slots, slot_ranks_slices)
    if meta is None:
        meta = LoraBatchMeta.build(token_slots, lora_a_slices[0].shape[0])
    elif meta.num_tokens != x.shape[0] or meta.device != x.device:
        raise ValueError(
            f"meta was built for {meta.num_tokens} tokens on {meta.device}, x has {x.shape[0]} on {x.device}"
        )
    if _use_triton(backend, x):
        _triton_path().add_lora_packed_triton(y, x, lora_a_slices, lora_b_slices, slot_ranks_slices, meta)
        return
    add_lora_torch(y, x, lora_a_slices, lora_b_slices, slot_ranks_slices, meta)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install can raise more than ImportError; then the torch path serves
        return False
    return True


def _use_triton(backend, x) -> bool:
    backend = backend or DEFAULT_BACKEND
    if backend == "auto":
        return x.is_cuda and triton_available()
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton does not import")
        return True
    if backend == "torch":
        return False
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _triton_path():
    # Imported on first use, not with the package: @triton.jit decides at import time whether the
    # kernels are compiled or interpreted, and tests set TRITON_INTERPRET=1 before that happens.
    return importlib.import_module(".triton_path", __package__)


def _check_shapes(y, x, lora_a_slices, lora_b_slices, token_slots, slot_ranks_slices) -> None:
    if not (len(lora_a_slices) == len(lora_b_slices) == len(slot_ranks_slices) > 0):
        raise ValueError("lora_a_slices, lora_b_slices and slot_ranks_slices need the same non-zero length")
    num_tokens, hidden = x.shape
    if token_slots.shape != (num_tokens,):
        raise ValueError(f"token_slots must be [{num_tokens}], got {tuple(token_slots.shape)}")
    total_out = 0
    for lora_a, lora_b, slot_ranks in zip(lora_a_slices, lora_b_slices, slot_ranks_slices):
        num_slots, max_rank, a_hidden = lora_a.shape
        if a_hidden != hidden or lora_b.shape[0] != num_slots or lora_b.shape[2] != max_rank:
            raise ValueError(
                f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do not fit x [T, {hidden}]"
            )
        if slot_ranks.shape != (num_slots,):
            raise ValueError(f"slot_ranks must be [{num_slots}], got {tuple(slot_ranks.shape)}")
        if lora_a.dtype != x.dtype or lora_b.dtype != x.dtype:
            raise ValueError(f"LoRA weights are {lora_a.dtype}/{lora_b.dtype}, x is {x.dtype}")
        total_out += lora_b.shape[1]
    if y.shape != (num_tokens, total_out) or y.dtype != x.dtype:
        raise ValueError(f"y must be [{num_tokens}, {total_out}] {x.dtype}, got {tuple(y.shape)} {y.dtype}")
