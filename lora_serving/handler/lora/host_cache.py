"""The host tier: adapters loaded from disk, least recently used first out, pinned ones never."""

from __future__ import annotations

import threading
from collections import OrderedDict

from lora_serving.handler.lora.peft_adapter import AdapterWeights


class HostCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, AdapterWeights] = OrderedDict()  # content hash -> weights
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    def get(self, content_hash: str) -> AdapterWeights | None:
        with self._lock:
            weights = self._entries.get(content_hash)
            if weights is not None:
                self._entries.move_to_end(content_hash)
            return weights

    def __contains__(self, content_hash: str) -> bool:
        with self._lock:
            return content_hash in self._entries

    def put(self, weights: AdapterWeights, protect: frozenset[str] = frozenset()) -> list[str]:
        """Insert as most recent; evict the least recent unpinned entries over capacity, sparing `protect`
        where possible. Returns the evicted hashes."""
        key = weights.version.content_hash
        with self._lock:
            self._entries[key] = weights
            self._entries.move_to_end(key)
            return self._evict_over_capacity(key, protect)

    def set_pinned(self, content_hash: str, pinned: bool) -> None:
        with self._lock:
            (self._pinned.add if pinned else self._pinned.discard)(content_hash)

    def discard(self, content_hash: str) -> None:
        with self._lock:
            self._entries.pop(content_hash, None)
            self._pinned.discard(content_hash)

    def keys(self) -> list[str]:
        """Least recent first."""
        with self._lock:
            return list(self._entries)

    def _evict_over_capacity(self, newest: str, protect: frozenset[str]) -> list[str]:
        evicted: list[str] = []
        for spare_protected in (True, False):
            for key in list(self._entries):
                if len(self._entries) <= self.capacity:
                    return evicted
                if key == newest or key in self._pinned or (spare_protected and key in protect):
                    continue
                del self._entries[key]
                evicted.append(key)
        return evicted
