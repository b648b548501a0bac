"""Bookkeeping of the paged KV cache: which fixed-size blocks each sequence owns. No tensors here.

A sequence's token i lives in block `block_table[i // block_size]` at offset `i % block_size`. Blocks are
taken from the free ones and returned the moment a sequence finishes or is preempted.

Any free block serves any sequence (that is what paging buys), but the manager places each sequence so
that its blocks are usually consecutive: decode attention then reads a sequence's K/V in place instead of
gathering them (on CPU the gather was the largest cost of a decode step after the GEMMs). A new sequence
starts where the blocks up to its full length (prompt + max_new_tokens) are free and not set aside for
another; those blocks past its prompt are set aside for it, softly: it grows into them one by one, and
when no other free block is left, anyone may take them.

The sequences of one request (n / best_of) share their prompt's blocks: `fork` gives a sequence another's
blocks, counted by reference, and a sequence about to write into a block that others still hold first gets
its own copy of it (copy on write). The copies the device must make are queued for `take_copies`.
"""

from __future__ import annotations

from handler.sequence import Sequence

_USED, _FREE, _SET_ASIDE = 0, 1, 2  # one byte per block; _SET_ASIDE blocks are free too


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._state = bytearray([_FREE]) * num_blocks  # bytearray.find searches runs in C
        self._num_free = num_blocks
        # Sequence -> (start, end): the blocks set aside for it to grow into.
        self._set_aside: dict[Sequence, tuple[int, int]] = {}
        # Block -> how many sequences hold it, for blocks held by more than one; the others have one holder.
        self._holders: dict[int, int] = {}
        # (source, destination) block copies owed before the next forward pass.
        self._copies: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` more tokens of `seq` fit, counting space left in its last block (and the copy
        of that block if it is shared)."""
        return self._extra_blocks(seq, num_tokens) + self._writes_shared_block(seq) <= self._num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table so that `num_tokens` more tokens (after its cached ones) have a place."""
        extra = self._extra_blocks(seq, num_tokens)
        copy = self._writes_shared_block(seq)
        if extra + copy > self._num_free:
            raise RuntimeError(f"out of KV blocks: need {extra + copy}, {self._num_free} free")
        table = seq.block_table
        if copy:
            shared = table.pop()
            self._drop_holder(shared)
            own = self._next_block(seq)
            self._state[own] = _USED
            table.append(own)
            self._num_free -= 1
            self._copies.append((shared, own))
        for _ in range(extra):
            block = self._next_block(seq)
            self._state[block] = _USED
            table.append(block)
        self._num_free -= extra

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks (and whatever K/V they hold or are about to)."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self._holders[block] = self._holders.get(block, 1) + 1

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies owed since the last call; the device makes them before
        the forward pass writes any K/V."""
        copies, self._copies = self._copies, []
        return copies

    def free(self, seq: Sequence) -> None:
        self._release_set_aside(seq)
        for block in seq.block_table:
            self._drop_holder(block)
        seq.block_table.clear()
        seq.num_cached_tokens = 0

    def slot_of(self, seq: Sequence, position: int) -> int:
        """Flat index into the cache of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _drop_holder(self, block: int) -> None:
        holders = self._holders.get(block)
        if holders is None:
            self._state[block] = _FREE
            self._num_free += 1
        elif holders == 2:
            del self._holders[block]
        else:
            self._holders[block] = holders - 1

    def _writes_shared_block(self, seq: Sequence) -> int:
        """1 if the next token of `seq` goes into the last block of its table and others hold that block."""
        table = seq.block_table
        if not table or not self._holders:
            return 0
        return int(seq.num_cached_tokens // self.block_size == len(table) - 1 and table[-1] in self._holders)

    def _extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        needed = self.blocks_needed(seq.num_cached_tokens + num_tokens)
        return max(0, needed - len(seq.block_table))

    def _next_block(self, seq: Sequence) -> int:
        table = seq.block_table
        if table:
            following = table[-1] + 1
            if following < self.num_blocks and self._state[following] != _USED:
                return following
        # A new run: where the rest of its full length fits among blocks nobody else is growing into
        # (or as much of it as fits: halving the length asked for), else (the cache is nearly full) any
        # free block, those set aside for others last.
        self._release_set_aside(seq)
        wanted = max(1, self.blocks_needed(seq.max_total_tokens) - len(table))
        while wanted >= 1:
            start = self._state.find(bytes([_FREE]) * wanted)
            if start >= 0:
                if wanted > 1:
                    self._state[start + 1 : start + wanted] = bytes([_SET_ASIDE]) * (wanted - 1)
                    self._set_aside[seq] = (start + 1, start + wanted)
                return start
            wanted //= 2
        return self._state.find(_SET_ASIDE)

    def _release_set_aside(self, seq: Sequence) -> None:
        # A block of this span that another sequence took, freed and then had set aside for a third is
        # handed back too: set-asides only steer placement, so that rare case costs contiguity, not room.
        span = self._set_aside.pop(seq, None)
        if span is None:
            return
        start, end = span
        for block in range(start, end):
            if self._state[block] == _SET_ASIDE:
                self._state[block] = _FREE
