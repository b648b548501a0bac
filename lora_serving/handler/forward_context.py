"""What one forward pass needs to know about the step, built once by the model runner, read by layers.

Token order in a step: the decode tokens first (one per decoding sequence), then each prefilling
sequence's tokens (all it has left, or a chunk of them), contiguous. Keeping this in one object keeps the
layers' signatures plain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class LoraApplier(Protocol):
    """Adds each token's LoRA delta for one projection group of one layer, in place on y."""

    def apply(self, layer_index: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None: ...


@dataclass(slots=True)
class CachedKV:
    """Where one sequence's K/V are in the cache, and how many tokens it attends to (its new ones included).

    A decode's form on CPUs (above a small batch), where each decode attends on its own, straight from the
    cache; and a prefill's that starts after cached tokens (a prefix-cache hit, an earlier chunk). When its
    blocks are consecutive (the block manager places sequences so that they usually are) its keys are a
    view of the cache, otherwise its blocks are gathered. Gathering all decodes into one padded tensor
    (PaddedDecodes) cost about twice as much on CPU.
    """

    length: int
    first_block: int | None  # its blocks are first_block, first_block + 1, ...: read in place
    block_ids: torch.Tensor | None  # otherwise its block table, to gather


@dataclass(slots=True)
class PaddedDecodes:
    """All decoding sequences' block tables, padded to one width, for one attention call per layer over them all.

    On CPU with fp32 or bf16 (`in_kernel`), the C decode attention kernel (kernels/cpu_attention.py) reads every
    sequence's K/V in place through these tables. Otherwise the blocks are gathered into one padded tensor
    and attended by torch: the form for GPUs, where one attention per sequence would cost a kernel launch per
    sequence and layer, and a gather is cheap next to that; and on CPU without the kernel while the padded
    tensor is small (a small model, short contexts), where per-call overhead outweighs the copy.
    """

    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    context_lens: torch.Tensor  # [B] tokens each attends to, itself included
    longest: int  # the longest and shortest of those, known on the host
    shortest: int
    in_kernel: bool = False
    # Per sliding-window size (None = full attention), built on first use in the step: the masks of the padded
    # gather, or the first key each decode sees for the kernel.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    starts: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class CompiledDecodes:
    """The decodes of a decode-only step run by the compiled decode step (handler/runner/compiled_decode.py): the
    same tables as PaddedDecodes in the C kernel, with nothing known on the host, so that the traced graph does not
    depend on the lengths."""

    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    context_lens: torch.Tensor  # [B]


@dataclass(slots=True)
class PrefillSpan:
    """One prefilling sequence's tokens in the step: [start, end) in the token order, at positions
    context_len .. context_len + (end - start) - 1 of the sequence."""

    start: int
    end: int
    context_len: int  # tokens before these whose K/V are in the cache already
    # With context: where all its K/V are (the new ones are written before attention reads them), and the
    # attention masks built for it, per sliding-window size. None from position 0: it attends to its
    # fresh K/V only.
    cached: CachedKV | None = None
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class ForwardContext:
    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV-cache index each token's K/V is written to
    num_decode_tokens: int
    # The decodes' cached K/V in one of two forms (see each): one per decode token in the same order,
    # or all in padded block tables.
    decode_kv: list[CachedKV] | PaddedDecodes | CompiledDecodes
    prefills: list[PrefillSpan]
    lora: LoraApplier | None = None
