"""Adapters registered on first use (`option.adapter_resolver`): a request naming an adapter the engine does not
know waits while it is fetched from the resolver's location and registered, then is served.

- Concurrent first requests for one name share one fetch and one load (one future per name in flight).
- A name is checked (handler.lora.names) before any lookup; a name the location does not hold is remembered
  for MISS_SECONDS, so that a flood of bad names does not become a flood of lookups.
- A failed fetch or load is the error of the requests that waited for it; the next request tries again.
- What was resolved lives in `store_dir/<name>/`, at most `max_resolved` adapters (option.max_disk_loras):
  past it the least recently requested resolved adapter is unregistered and its files deleted, unless it is
  pinned or a request still uses it. Adapters registered any other way (start-up, management API) are never
  evicted.

How a name becomes a local directory (`fetch`) is resolver_fetch.py's, for the server and the DJL handler alike:
from S3, the Hub or a local directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lora_serving.handler.errors import AdapterExistsError, AdapterNotFoundError, ConfigError
from lora_serving.handler.lora.names import validate_adapter_name

logger = logging.getLogger(__name__)

# How long a name the location does not hold is answered 404 without looking again.
MISS_SECONDS = 30.0
# Names remembered as missing at most; the oldest are forgotten first, so random names cannot grow memory.
MAX_REMEMBERED_MISSES = 10_000
# Fetches of different names that run at once.
FETCH_THREADS = 4

S3_SCHEME = "s3://"
HF_SCHEME = "hf://"
_HUB_ORG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")



class Fetched(NamedTuple):
    path: Path  # the local adapter directory
    source: str  # where it was found, as a registrant would name it (s3://bucket/prefix/name/): its listed src


# fetch(name, directory it may write into) -> where the adapter is and came from; raises AdapterNotFoundError when
# the location does not hold `name`, anything else when it holds it but fetching or checking it failed.
Fetch = Callable[[str, Path], Fetched]


@dataclass(frozen=True, slots=True)
class ResolverLocation:
    """Where unregistered names are looked up: kind "s3" (base `s3://bucket/prefix/`), "hf" (base: the Hub
    organisation) or "local" (base: an absolute directory)."""

    kind: str
    base: str

    @classmethod
    def parse(cls, text: str) -> ResolverLocation:
        """ConfigError naming option.adapter_resolver when `text` is none of the three forms."""
        text = text.strip()
        if text.startswith(S3_SCHEME):
            bucket = text[len(S3_SCHEME):].split("/", 1)[0]
            if not bucket:
                raise ConfigError("adapter_resolver", text, "an s3:// resolver needs a bucket: s3://bucket/prefix/")
            return cls("s3", text if text.endswith("/") else text + "/")
        if text.startswith(HF_SCHEME):
            org = text[len(HF_SCHEME):].strip("/")
            if not _HUB_ORG.fullmatch(org) or "--" in org or ".." in org:
                raise ConfigError("adapter_resolver", text, "expected hf://org/, a Hub organisation or user name")
            return cls("hf", org)
        path = Path(text)
        if not path.is_absolute() or not path.is_dir():
            raise ConfigError("adapter_resolver", text,
                              "expected s3://bucket/prefix/, hf://org/ or an absolute path to a local directory")
        return cls("local", str(path.resolve()))

    def __str__(self) -> str:
        return {"s3": self.base, "hf": f"{HF_SCHEME}{self.base}/", "local": self.base}[self.kind]


@dataclass(slots=True)
class ResolverStats:
    resolved: int = 0
    not_found: int = 0
    failed: int = 0
    evicted: int = 0
    resident: int = 0  # resolved adapters registered (and on disk) now


class AdapterResolver:
    def __init__(self, engine, location: ResolverLocation, fetch: Fetch, store_dir: Path, *, max_resolved: int,
                 miss_seconds: float = MISS_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.location = location
        self._engine = engine
        self._fetch = fetch
        self._store_dir = store_dir
        self._max_resolved = max_resolved
        self._miss_seconds = miss_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._resolved: OrderedDict[str, Path] = OrderedDict()  # least recently requested first
        self._misses: OrderedDict[str, float] = OrderedDict()  # name -> when it may be looked up again
        self._in_flight: dict[str, Future] = {}
        self._stats = ResolverStats()
        self._pool = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="adapter-resolve")

    def begin(self, name: str) -> Future | None:
        """None if `name` is registered; else the future of its resolution (shared with every other caller
        waiting for it). Raises InvalidAdapterError for an unsafe name, AdapterNotFoundError for a recent miss."""
        validate_adapter_name(name)
        registered = self._is_registered(name)
        with self._lock:
            if registered:
                if name in self._resolved:
                    self._resolved.move_to_end(name)
                return None
            self._resolved.pop(name, None)  # unregistered through the management API meanwhile
            retry_at = self._misses.get(name)
            if retry_at is not None and self._clock() < retry_at:
                raise missing(self.location, name)
            future = self._in_flight.get(name)
            if future is None:
                future = self._in_flight[name] = self._pool.submit(self._resolve, name)
            return future

    async def ensure(self, names: Iterable[str | None]) -> None:
        """Wait until every named adapter is registered, resolving those that are not."""
        for name in dict.fromkeys(name for name in names if name):
            future = self.begin(name)
            if future is not None:
                # Shielded: a waiter that goes away (a client disconnects) must not cancel the shared fetch.
                await asyncio.shield(asyncio.wrap_future(future))

    def stats(self) -> ResolverStats:
        with self._lock:
            self._stats.resident = len(self._resolved)
            return dataclasses.replace(self._stats)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _resolve(self, name: str) -> None:
        directory = self._store_dir / name
        try:
            shutil.rmtree(directory, ignore_errors=True)  # leftovers of an evicted or failed earlier fetch
            started = time.perf_counter()
            try:
                fetched = self._fetch(name, directory)
                self._engine.register_adapter(name, fetched.path, preload=True, source=fetched.source)
            except AdapterExistsError:
                # Registered through the management API while this fetch ran: that registration serves.
                shutil.rmtree(directory, ignore_errors=True)
                return
            except AdapterNotFoundError:
                shutil.rmtree(directory, ignore_errors=True)
                self._remember_miss(name)
                raise
            except BaseException:
                shutil.rmtree(directory, ignore_errors=True)
                with self._lock:
                    self._stats.failed += 1
                raise
            logger.info("resolved adapter %s from %s in %.2fs", name, fetched.source, time.perf_counter() - started)
            with self._lock:
                self._resolved[name] = directory
                self._misses.pop(name, None)
                self._stats.resolved += 1
        finally:
            with self._lock:
                self._in_flight.pop(name, None)
        self._evict_over_bound(keep=name)

    def _evict_over_bound(self, keep: str) -> None:
        """`keep`: the adapter just resolved, which its waiting requests are about to use."""
        with self._lock:
            excess = len(self._resolved) - self._max_resolved
            oldest_first = list(self._resolved.items())
        if excess <= 0:
            return
        in_use = self._engine.adapters_in_use()
        for name, directory in oldest_first:
            if excess <= 0:
                break
            if name == keep or name in in_use or self._is_pinned(name):
                continue  # a running request's files, or pinned by the management API since: kept
            try:
                self._engine.unregister_adapter(name)
            except AdapterNotFoundError:
                pass  # unregistered through the management API already
            with self._lock:
                if self._resolved.get(name) != directory:
                    continue  # requested again and re-resolved meanwhile
                del self._resolved[name]
                self._stats.evicted += 1
            shutil.rmtree(directory, ignore_errors=True)
            logger.info("evicted resolved adapter %s (option.max_disk_loras=%d)", name, self._max_resolved)
            excess -= 1

    def _remember_miss(self, name: str) -> None:
        with self._lock:
            self._stats.not_found += 1
            self._misses[name] = self._clock() + self._miss_seconds
            self._misses.move_to_end(name)
            while len(self._misses) > MAX_REMEMBERED_MISSES:
                self._misses.popitem(last=False)

    def _is_registered(self, name: str) -> bool:
        try:
            self._engine.get_adapter(name)
        except AdapterNotFoundError:
            return False
        return True

    def _is_pinned(self, name: str) -> bool:
        try:
            return self._engine.get_adapter(name).pinned
        except AdapterNotFoundError:
            return False


def missing(location: ResolverLocation, name: str) -> AdapterNotFoundError:
    """The error a Fetch raises for a name its location does not hold."""
    return AdapterNotFoundError(f"Adapter {name} is not registered and not found at {location}")
