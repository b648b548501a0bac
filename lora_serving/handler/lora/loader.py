"""Disk -> host: reading and checking an adapter's files, and the host tier the loaded weights wait in.

Registration reads the files in the caller's thread; the adapters that waiting requests need load on a small
pool (`prefetch`), so that running sequences keep decoding while a cold adapter is read. A load that fails
reaches the requests that wait for it through `take_failed`, once.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import torch

from lora_serving.handler.errors import InvalidAdapterError
from lora_serving.handler.lora.host_cache import HostCache
from lora_serving.handler.lora.peft_adapter import AdapterVersion, AdapterWeights, BaseModelShapes, load_peft_adapter
from lora_serving.handler.sequence import Sequence

logger = logging.getLogger(__name__)

LOADER_THREADS = 2


class AdapterLoader:
    def __init__(self, base: BaseModelShapes, host: HostCache, max_rank: int, dtype: torch.dtype,
                 device: torch.device, on_loaded: Callable[[str, float], None]) -> None:
        """`host`: the tier loads go to; `on_loaded(content_hash, seconds)`: after each background load."""
        self.base = base
        self.host = host
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self._on_loaded = on_loaded
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="lora-load")
        self._loading: dict[str, Future] = {}
        # content hash -> (the files that failed to load, the message)
        self._failed: dict[str, tuple[Path, str]] = {}
        # The content hashes the queue needs next: host evictions spare them where they can.
        self._wanted: frozenset[str] = frozenset()

    def read(self, name: str, path: str | Path | None) -> AdapterWeights:
        """Read and check an adapter's files; InvalidAdapterError says why one cannot be served."""
        return load_peft_adapter(name, Path(path), self.base, self.max_rank, self.dtype)

    def keep_in_host(self, weights: AdapterWeights, pin: bool, preload: bool) -> None:
        if pin or preload:
            if pin:
                self.host.set_pinned(weights.version.content_hash, True)
            self.host.put(_for_device(weights, self.device), protect=self._wanted)

    def prefetch(self, waiting: Iterable[Sequence], on_device: Callable[[str], bool]) -> None:
        """Start loading the adapters the queue will need, in queue order, as many as host memory holds;
        `on_device(content_hash)`: whether it is in a device slot already (then it needs no load)."""
        wanted: list[str] = []
        versions: dict[str, AdapterVersion] = {}
        for seq in waiting:
            version = seq.adapter_version
            if version is None or version.content_hash in versions:
                continue
            versions[version.content_hash] = version
            wanted.append(version.content_hash)
            if len(wanted) >= self.host.capacity:
                break
        self._wanted = frozenset(wanted)
        for content_hash in wanted:
            if on_device(content_hash) or content_hash in self.host:
                continue
            with self._lock:
                if content_hash in self._loading or content_hash in self._failed:
                    continue
                self._loading[content_hash] = self._pool.submit(self._load, versions[content_hash])

    def _load(self, version: AdapterVersion) -> None:
        started = time.perf_counter()
        try:
            weights = self.read(version.name, version.path)
            if weights.version.content_hash != version.content_hash:
                raise InvalidAdapterError(
                    f"Adapter {version.name}: the files at {version.path} changed since registration; "
                    "register it again to serve the new files"
                )
            self.host.put(_for_device(weights, self.device), protect=self._wanted)
            self._on_loaded(version.content_hash, time.perf_counter() - started)
        except Exception as error:  # any failure must reach the waiting requests, not kill the pool
            logger.warning("loading adapter %s failed: %s", version.name, error)
            with self._lock:
                self._failed[version.content_hash] = (version.path,
                                                      f"Adapter {version.name} failed to load: {error}")
        finally:
            with self._lock:
                self._loading.pop(version.content_hash, None)

    def take_failed(self, waiting: Iterable[Sequence]) -> list[tuple[Sequence, str]]:
        """Waiting sequences whose adapter failed to load from their own files, with the message; the failure
        is then forgotten so that a later request tries again. A sequence whose adapter has the same content
        under another name, from other files, keeps waiting: the next load reads its files."""
        with self._lock:
            if not self._failed:
                return []
            failed = dict(self._failed)
            self._failed.clear()
        return [(seq, failed[seq.adapter_version.content_hash][1]) for seq in waiting
                if seq.adapter_version is not None
                and failed.get(seq.adapter_version.content_hash, (None,))[0] == seq.adapter_version.path]

    def wait_for_loads(self, timeout: float | None = None) -> None:
        """Block until the loads under way finish (tests and benchmarks use it)."""
        with self._lock:
            futures = list(self._loading.values())
        for future in futures:
            future.result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _for_device(weights: AdapterWeights, device: torch.device) -> AdapterWeights:
    """On CUDA, host copies live in page-locked memory so that slot writes are asynchronous copies."""
    if device.type != "cuda":
        return weights
    for lora in [*weights.modules.values(), *weights.expert_modules.values()]:
        lora.a = lora.a.pin_memory()
        lora.b = lora.b.pin_memory()
    return weights
