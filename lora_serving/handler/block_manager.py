"""Bookkeeping of the paged KV cache: which fixed-size blocks each sequence owns. Nothing on the device here.

A sequence's token i lives in block `block_table[i // block_size]` at offset `i % block_size`. Blocks are
taken from the free ones and returned the moment a sequence finishes or is preempted.

Any free block serves any sequence (that is what paging buys), but the manager places each sequence so
that its blocks are usually consecutive: decode attention then reads a sequence's K/V in place instead of
gathering them (on CPU the gather was the largest cost of a decode step after the GEMMs). A new sequence
starts where the blocks up to its full length (prompt + max_new_tokens) are free and not set aside for
another; those blocks past its prompt are set aside for it, softly: it grows into them one by one, and
when no other free block is left, anyone may take them.

Blocks are shared, counted by reference, in two ways, and one rule keeps shared K/V intact: a sequence
about to write into a block that others still hold first gets its own copy of it (copy on write; the
copies the device must make are queued for `take_copies`).
- The sequences of one request (n / best_of): `fork` gives a sequence another's blocks.
- The prefix cache (with `enable_prefix_caching`): every full block a sequence has computed goes into the
  index (handler/prefix_cache.py); a new sequence whose chain of blocks matches starts with those blocks
  and computes only the rest. A full block is never written again, so sharing it needs no copy. When its
  last holder lets it go, a block in the index is parked rather than freed: it still counts as free, but
  is handed out (and forgotten) only when the free blocks cannot hold a new run of blocks that a sequence
  needs now. Then the run of parked (and free) blocks whose most recently parked block was parked longest
  ago goes: least recently used, a run at a time, so that the sequence taking it still reads its K/V in
  place (a sequence parks its blocks last first, so its own run ages together).
"""

from __future__ import annotations

import torch

from lora_serving.handler.prefix_cache import NOT_PARKED, PrefixIndex, extend_block_hashes
from lora_serving.handler.sequence import Sequence

# One byte per block. _SET_ASIDE and _PARKED blocks count as free too.
_USED, _FREE, _SET_ASIDE, _PARKED = 0, 1, 2, 3


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
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
        self._prefix = PrefixIndex(num_blocks) if enable_prefix_caching else None
        # Prompt tokens looked up in the prefix cache at admission, and those found there (K/V reused), since start.
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence may take, parked prefix-cache blocks included."""
        return self._num_free

    @property
    def num_cached_blocks(self) -> int:
        """Parked blocks: held by no sequence, kept for the prefix cache (and free)."""
        return self._prefix.num_parked if self._prefix is not None else 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- admission ----------------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The blocks of the longest cached prefix that `seq` (waiting, holding no blocks) may reuse."""
        if self._prefix is None:
            return []
        num_blocks = seq.num_reusable_tokens // self.block_size
        if num_blocks == 0:
            return []
        return self._prefix.longest_match(extend_block_hashes(seq, num_blocks, self.block_size)[:num_blocks])

    def can_admit(self, seq: Sequence, cached: list[int]) -> bool:
        """Whether `seq` fits whole, starting with the `cached` blocks."""
        parked = sum(1 for block in cached if self._state[block] == _PARKED)
        return self.blocks_needed(seq.num_tokens) - len(cached) + parked <= self._num_free

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give `seq` the `cached` blocks (their K/V are its first tokens') and room for all its other tokens."""
        for block in cached:
            if self._state[block] == _PARKED:
                self._prefix.unpark(block)
                self._state[block] = _USED
                self._num_free -= 1
            else:
                self._holders[block] = self._holders.get(block, 1) + 1
        seq.block_table = list(cached)
        seq.num_cached_tokens = len(cached) * self.block_size
        self.prefix_queried_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_cached_tokens
        self.allocate(seq, seq.num_tokens - seq.num_cached_tokens)

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """`num_computed` more tokens of `seq` have their K/V in the cache now (after its cached ones): the
        blocks they filled join the prefix cache."""
        start = seq.num_cached_tokens
        seq.num_cached_tokens = start + num_computed
        if self._prefix is None:
            return
        first, end = start // self.block_size, seq.num_cached_tokens // self.block_size
        if end > first:
            hashes = extend_block_hashes(seq, end, self.block_size)
            for index in range(first, end):
                self._prefix.add(seq.block_table[index], hashes[index])

    # ---- growth, sharing, release -------------------------------------------------------------------

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
            own = self._next_block(seq, 1)
            self._state[own] = _USED
            table.append(own)
            self._num_free -= 1
            self._copies.append((shared, own))
        for taken in range(extra):
            block = self._next_block(seq, extra - taken)
            self._state[block] = _USED
            table.append(block)
        self._num_free -= extra

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares all of `parent`'s blocks (and whatever K/V they hold or are about to)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_cached_tokens = parent.num_cached_tokens
        for block in child.block_table:
            self._holders[block] = self._holders.get(block, 1) + 1

    def take_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies owed since the last call; the device makes them before
        the forward pass writes any K/V."""
        copies, self._copies = self._copies, []
        return copies

    def free(self, seq: Sequence) -> None:
        self._release_set_aside(seq)
        # Last block first: parked blocks are evicted in the order they were parked, and a chain's tail is
        # the part least likely to be asked for again (its head is what other prompts share).
        for block in reversed(seq.block_table):
            self._drop_holder(block)
        seq.block_table.clear()
        seq.num_cached_tokens = 0

    def slot_of(self, seq: Sequence, position: int) -> int:
        """Flat index into the cache of token `position` of `seq`."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _drop_holder(self, block: int) -> None:
        holders = self._holders.get(block)
        if holders is None:
            parked = self._prefix is not None and self._prefix.park(block)
            self._state[block] = _PARKED if parked else _FREE
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

    def _next_block(self, seq: Sequence, needed: int) -> int:
        """A block for `seq`, which needs `needed` more now."""
        table = seq.block_table
        if table:
            following = table[-1] + 1
            if following < self.num_blocks:
                state = self._state[following]
                if state == _FREE or state == _SET_ASIDE:
                    return following
                start, end = self._set_aside.get(seq, (0, 0))
                if state == _PARKED and start <= following < end:
                    self._prefix.evict(following)  # set aside for it when it was placed: taken as it grows
                    return following
        # A new run: where the rest of its full length fits among blocks nobody else is growing into, or as
        # much of it as fits (halving the length asked for) as long as that holds what it needs now. Else,
        # if blocks are parked, in the run of free and parked blocks (as long as asked for, or as long as
        # needed now) whose youngest parked block was parked longest ago: it is set aside for the sequence,
        # and each parked block in it is evicted when the sequence grows into it. Else any free block,
        # those set aside for others last. A sequence scattered over the free blocks left here and there
        # (the partly filled last blocks of finished sequences) would gather its K/V at every step: with
        # a cache full of parked blocks, that cost a fifth of the decode throughput.
        self._release_set_aside(seq)
        wanted = max(1, self.blocks_needed(seq.max_total_tokens) - len(table))
        length = wanted
        start = self._state.find(bytes([_FREE]) * length)
        while start < 0 and length // 2 >= needed:
            length //= 2
            start = self._state.find(bytes([_FREE]) * length)
        if start < 0 and length > needed:
            length = needed
            start = self._state.find(bytes([_FREE]) * length)
        if start < 0 and self.num_cached_blocks:
            evicted = self._evict_oldest_run(seq, wanted, needed)
            if evicted is not None:
                return evicted
        while start < 0 and length > 1:
            length //= 2
            start = self._state.find(bytes([_FREE]) * length)
        if start >= 0:
            self._set_aside_run(seq, start, length)
            return start
        block = self._state.find(_SET_ASIDE)
        return block if block >= 0 else self._evict_oldest_run(seq, 1, 1, spare_set_asides=False)

    def _evict_oldest_run(self, seq: Sequence, wanted: int, needed: int,
                          spare_set_asides: bool = True) -> int | None:
        """The first block of the run of free and parked blocks, `wanted` long (else `needed` long), whose
        most recently parked block was parked longest ago, evicted if parked; `seq` grows into the rest
        of the run. Parked blocks set aside for another sequence are spared unless `spare_set_asides` is
        false. None if there is no such run."""
        ages = self._prefix.parked_at.clone()  # free blocks cost nothing; held ones cannot be taken
        ages[torch.frombuffer(self._state, dtype=torch.uint8) == _FREE] = 0
        if spare_set_asides:
            for start, end in self._set_aside.values():
                ages[start:end] = NOT_PARKED
        for length in dict.fromkeys((wanted, needed)):
            if length > self.num_blocks:
                continue
            youngest = ages.unfold(0, length, 1).amax(1)
            start = int(youngest.argmin())
            if youngest[start] < NOT_PARKED:
                if self._state[start] == _PARKED:
                    self._prefix.evict(start)
                self._set_aside_run(seq, start, length)
                return start
        return None

    def _set_aside_run(self, seq: Sequence, start: int, length: int) -> None:
        """Blocks start + 1 .. start + length - 1 (free or parked) are set aside for `seq` to grow into."""
        if length > 1:
            span = self._state[start + 1 : start + length]
            self._state[start + 1 : start + length] = span.replace(bytes([_FREE]), bytes([_SET_ASIDE]))
            self._set_aside[seq] = (start + 1, start + length)

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
