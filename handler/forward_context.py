"""What one forward pass needs to know about the step, built once by the model runner, read by layers.

Token order in a step: the decode tokens first (one per decoding sequence), then each prefilling
sequence's tokens, contiguous. Keeping this in one object keeps the layers' signatures plain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class LoraApplier(Protocol):
    """Adds each token's LoRA delta for one projection group of one layer, in place on y."""

    def apply(self, layer_index: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None: ...


@dataclass(slots=True)
class DecodeKV:
    """Where one decoding sequence's cached K/V are, and how many tokens it attends to (itself included).

    The form for CPUs (above a small batch): each decode attends on its own, straight from the cache.
    When its blocks are consecutive (the block manager places sequences so that they usually are) its
    keys are a view of the cache, otherwise its blocks are gathered. Gathering the whole batch into one
    padded tensor (PaddedDecodes) cost about twice as much on CPU.
    """

    length: int
    first_block: int | None  # its blocks are first_block, first_block + 1, ...: read in place
    block_ids: torch.Tensor | None  # otherwise its block table, to gather


@dataclass(slots=True)
class PaddedDecodes:
    """All decoding sequences' blocks, gathered into one padded tensor and attended in one call.

    The form for GPUs, where one attention per sequence would cost a kernel launch per sequence and
    layer, and a gather is cheap next to that; and on CPU while the padded tensor is small (a small
    model, short contexts), where per-call overhead outweighs the copy.
    """

    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    context_lens: torch.Tensor  # [B] tokens each attends to, itself included
    longest: int  # the longest and shortest of those, known on the host
    shortest: int
    # Masks per sliding-window size (None = full attention), built on first use in the step.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class ForwardContext:
    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV-cache index each token's K/V is written to
    num_decode_tokens: int
    # The decodes' cached K/V in one of two forms (see each): one per decode token in the same order,
    # or all padded together.
    decode_kv: list[DecodeKV] | PaddedDecodes
    prefill_ranges: list[tuple[int, int]]  # [start, end) of each prefilling sequence in the token order
    lora: LoraApplier | None = None
