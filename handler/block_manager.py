"""Bookkeeping of the paged KV cache: which fixed-size blocks each sequence owns. No tensors here.

A sequence's token i lives in block `block_table[i // block_size]` at offset `i % block_size`. Blocks are
handed out from a free list and returned the moment a sequence finishes or is preempted.
"""

from __future__ import annotations

from collections import deque

from handler.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` more tokens of `seq` fit, counting space left in its last block."""
        return self._extra_blocks(seq, num_tokens) <= len(self._free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table so that `num_tokens` more tokens (after its cached ones) have a place."""
        extra = self._extra_blocks(seq, num_tokens)
        if extra > len(self._free_blocks):
            raise RuntimeError(f"out of KV blocks: need {extra}, {len(self._free_blocks)} free")
        for _ in range(extra):
            seq.block_table.append(self._free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self._free_blocks.extend(seq.block_table)
        seq.block_table.clear()
        seq.num_cached_tokens = 0

    def slot_of(self, seq: Sequence, position: int) -> int:
        """Flat index into the cache of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        needed = self.blocks_needed(seq.num_cached_tokens + num_tokens)
        return max(0, needed - len(seq.block_table))
