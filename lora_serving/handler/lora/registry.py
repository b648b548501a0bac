"""Adapter names: which version (path + content hash) each name serves, which are pinned, tokens served.

Any thread may call it (registration comes from the HTTP server's threads); one lock guards it. Pins are
kept by content hash, so that two names with the same files share one pin; at least one device slot always
stays unpinned for the others.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from lora_serving.handler.errors import AdapterCapacityError, AdapterExistsError, AdapterNotFoundError
from lora_serving.handler.lora.host_cache import HostCache
from lora_serving.handler.lora.peft_adapter import AdapterVersion, AdapterWeights


@dataclass(slots=True)
class AdapterInfo:
    name: str
    path: str
    source: str  # what it was registered from as its registrant named it (an s3:// url...); else `path`
    tier: str  # "device" | "host" | "disk"
    pinned: bool
    ranks: list[int]  # distinct ranks over its modules
    target_modules: list[str]
    load_seconds: float | None  # last disk -> host load
    tokens_served: int
    content_hash: str


@dataclass(slots=True)
class AdapterEntry:
    version: AdapterVersion
    pinned: bool
    ranks: list[int]
    target_modules: list[str]
    load_seconds: float | None
    source: str | None


class AdapterRegistry:
    def __init__(self, host: HostCache, num_slots: int) -> None:
        """`host`: the host tier, told when a content hash stops being pinned; `num_slots`: device slots."""
        self.host = host
        self.num_slots = num_slots
        self._lock = threading.Lock()
        self._entries: dict[str, AdapterEntry] = {}
        self._pinned_hashes: set[str] = set()
        self._tokens_served: Counter[str] = Counter()

    def check_free(self, name: str) -> None:
        with self._lock:
            if name in self._entries:
                raise AdapterExistsError(f"Adapter {name} is already registered")

    def add(self, name: str, weights: AdapterWeights, pin: bool, load_seconds: float,
            source: str | None = None) -> None:
        with self._lock:
            if name in self._entries:
                raise AdapterExistsError(f"Adapter {name} is already registered")
            if pin:
                self._check_pin_capacity(weights.version.content_hash)
            self._entries[name] = _entry_for(weights, pinned=pin, load_seconds=load_seconds, source=source)
            if pin:
                self._pinned_hashes.add(weights.version.content_hash)

    def update(self, name: str, weights: AdapterWeights | None, pin: bool | None,
               source: str | None = None) -> tuple[bool, str]:
        """New files (`weights`) and/or a new pin state for a registered name; returns whether it is pinned
        now and its content hash."""
        with self._lock:
            entry = self._require(name)
            pinned = entry.pinned if pin is None else pin
            new_hash = weights.version.content_hash if weights else entry.version.content_hash
            if pinned and new_hash not in self._pinned_hashes:
                self._check_pin_capacity(new_hash, replacing=entry.version.content_hash if entry.pinned else None)
            self._unpin_locked(entry)
            if weights is not None:
                entry = self._entries[name] = _entry_for(weights, pinned=pinned, load_seconds=None, source=source)
            entry.pinned = pinned
            if pinned:
                self._pinned_hashes.add(new_hash)
        return pinned, new_hash

    def remove(self, name: str) -> None:
        with self._lock:
            entry = self._require(name)
            del self._entries[name]
            self._unpin_locked(entry)

    def entry(self, name: str) -> AdapterEntry:
        """Raises AdapterNotFoundError for a name not registered."""
        with self._lock:
            return self._require(name)

    def entries(self) -> list[tuple[str, AdapterEntry]]:
        """Every registered name and its entry, by name."""
        with self._lock:
            return sorted(self._entries.items())

    def pinned_hashes(self) -> set[str]:
        with self._lock:
            return set(self._pinned_hashes)

    def loaded(self, content_hash: str, seconds: float) -> None:
        """Every name serving `content_hash` records the time of its last disk -> host load."""
        with self._lock:
            for entry in self._entries.values():
                if entry.version.content_hash == content_hash:
                    entry.load_seconds = seconds

    def record_token(self, name: str) -> None:
        self._tokens_served[name] += 1

    def tokens_served(self, name: str) -> int:
        return self._tokens_served[name]

    def _require(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"Adapter {name} is not registered")
        return entry

    def _check_pin_capacity(self, content_hash: str, replacing: str | None = None) -> None:
        pinned_after = len(self._pinned_hashes - {replacing} | {content_hash})
        limit = self.num_slots - 1
        if pinned_after > limit:
            raise AdapterCapacityError(
                f"cannot pin another adapter: {len(self._pinned_hashes)} of {self.num_slots} device slots "
                f"(option.max_loras) are pinned, and one must stay free for unpinned adapters"
            )

    def _unpin_locked(self, entry: AdapterEntry) -> None:
        if not entry.pinned:
            return
        content_hash = entry.version.content_hash
        still_pinned = any(e.pinned and e.version.content_hash == content_hash for e in self._entries.values()
                           if e is not entry)
        if not still_pinned:
            self._pinned_hashes.discard(content_hash)
            self.host.set_pinned(content_hash, False)


def _entry_for(weights: AdapterWeights, pinned: bool, load_seconds: float | None,
               source: str | None) -> AdapterEntry:
    return AdapterEntry(
        version=weights.version,
        pinned=pinned,
        ranks=sorted({lora.a.shape[0] for lora in weights.modules.values()}
                     | {lora.a.shape[1] for lora in weights.expert_modules.values()}),
        target_modules=sorted({module for _, module in weights.modules}
                              | {f"experts.{parameter}" for _, parameter in weights.expert_modules}),
        load_seconds=load_seconds,
        source=source,
    )
