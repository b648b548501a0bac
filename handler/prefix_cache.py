"""The prefix cache's index: full KV blocks found again by what they hold. No tensors here.

A full block's K/V depend on every token up to and including it and on the weights that computed them: with
LoRA on k_proj / v_proj (or on any layer below), the same tokens give other K/V under another adapter, or
under the same name re-registered with other weights. So a block is known by a hash chain: the first link
hashes the adapter's content identity (its content hash, "" for the base model), each block's link hashes
the previous link and the block's tokens. Two requests share a block only if the whole chain up to it is
equal: same adapter content, same tokens from position 0.

SHA-256, not Python's hash(): a collision would hand one tenant's K/V to another, and prompts are chosen by
clients.

The block manager (handler/block_manager.py) owns the blocks and their reference counts; this index only
remembers which block holds which link, and, among the blocks no sequence holds any more, which was
released first: those are evicted, oldest first, when no free block is left.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from handler.sequence import Sequence


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
    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        # Blocks in the index that no sequence holds, the first released first: the eviction order.
        self._parked: OrderedDict[int, None] = OrderedDict()

    @property
    def num_parked(self) -> int:
        return len(self._parked)

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
        self._parked[block] = None
        return True

    def is_parked(self, block: int) -> bool:
        return block in self._parked

    def unpark(self, block: int) -> None:
        """A sequence takes a parked block again (a cache hit)."""
        del self._parked[block]

    def evict_oldest(self) -> int:
        """Forget the parked block released first, and hand it out as a free block."""
        block, _ = self._parked.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block
