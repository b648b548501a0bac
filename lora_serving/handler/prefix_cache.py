"""The prefix cache's index: full KV blocks found again by what they hold.

A full block's K/V depend on every token up to and including it and on the weights that computed them: with
LoRA on k_proj / v_proj (or on any layer below), the same tokens give other K/V under another adapter, or
under the same name re-registered with other weights. So a block is known by a hash chain: the first link
hashes the adapter's content identity (its content hash, "" for the base model), each block's link hashes
the previous link and the block's tokens. Two requests share a block only if the whole chain up to it is
equal: same adapter content, same tokens from position 0.

SHA-256, not Python's hash(): a collision would hand one tenant's K/V to another, and prompts are chosen by
clients.

The block manager (handler/block_manager.py) owns the blocks and their reference counts; this index only
remembers which block holds which link, and, for the blocks no sequence holds any more (parked), when
each was released: the block manager evicts the oldest. Those ages are a CPU tensor, so that choosing
which run of blocks to evict is a few vector operations over all blocks.
"""

from __future__ import annotations

import hashlib
import itertools
import struct

import torch

from lora_serving.handler.sequence import Sequence

# The age of a block that is not parked: never the oldest.
NOT_PARKED = 2**62


def extend_block_hashes(seq: Sequence, num_blocks: int, block_size: int) -> list[bytes]:
    """`seq.block_hashes`, extended to (at least) its first `num_blocks` full blocks."""
    hashes = seq.block_hashes
    if len(hashes) >= num_blocks:
        return hashes
    tokens = seq.token_ids
    previous = hashes[-1] if hashes else _chain_root(seq)
    for index in range(len(hashes), num_blocks):
        block_tokens = tokens[index * block_size : (index + 1) * block_size]
        previous = hashlib.sha256(previous + struct.pack(f"<{block_size}I", *block_tokens)).digest()
        hashes.append(previous)
    return hashes


def _chain_root(seq: Sequence) -> bytes:
    identity = seq.adapter_version.content_hash if seq.adapter_version is not None else ""
    return hashlib.sha256(b"adapter:" + identity.encode()).digest()


class PrefixIndex:
    def __init__(self, num_blocks: int) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        # Per block: when it was parked (a counter: larger is later), NOT_PARKED if it is not.
        self.parked_at = torch.full((num_blocks,), NOT_PARKED, dtype=torch.int64)
        self._releases = itertools.count(1)
        self.num_parked = 0

    def longest_match(self, hashes: list[bytes]) -> list[int]:
        """The blocks holding the longest prefix of the chain `hashes`."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def add(self, block: int, block_hash: bytes) -> None:
        """Record that `block` (held by a sequence, fully computed) holds the link `block_hash`, unless another
        block already does (two sequences computed the same prefix side by side): that one stays."""
        if block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash

    def park(self, block: int) -> bool:
        """The last holder of `block` let it go: keep it for reuse if it is in the index (True)."""
        if block not in self._hash_of:
            return False
        self.parked_at[block] = next(self._releases)
        self.num_parked += 1
        return True

    def unpark(self, block: int) -> None:
        """A sequence takes a parked block again (a cache hit)."""
        self.parked_at[block] = NOT_PARKED
        self.num_parked -= 1

    def evict(self, block: int) -> None:
        """Forget a parked block: it becomes a free block."""
        self.unpark(block)
        del self._block_of[self._hash_of.pop(block)]
