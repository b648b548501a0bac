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
class DecodeGroup:
    """Decoding sequences of similar context length, whose K/V are gathered and attended together.

    Padding every decode to the longest of the whole batch gathered and attended over 37% padding on
    bench_engine's workload (contexts of 32..256 tokens); grouping by length cuts most of that.
    """

    rows: torch.Tensor | None  # [b] their rows among the step's decode tokens; None = all rows, in order
    block_tables: torch.Tensor  # [b, max_blocks], padded with block 0
    context_lens: torch.Tensor  # [b] tokens each attends to, itself included
    longest: int  # the longest and shortest of those, known on the host
    shortest: int
    # Masks per sliding-window size (None = full attention), built on first use in the step.
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)


@dataclass(slots=True)
class ForwardContext:
    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV-cache index each token's K/V is written to
    num_decode_tokens: int
    decode_groups: list[DecodeGroup]  # every decode token is in exactly one
    prefill_ranges: list[tuple[int, int]]  # [start, end) of each prefilling sequence in the token order
    lora: LoraApplier | None = None
