"""The adapter manager: rank 0's host side of LoRA, the three tiers behind one face for the engine.

Tiers: disk (every registered adapter), host memory (LRU of `max_cpu_loras`), device slots (`max_loras`).
Names map to an `AdapterVersion` (path + content hash); caches and slots are keyed by the content hash, so
re-registering a name with other weights can never serve the old ones, and two names with the same
files share one slot. The jobs, one file each:

    registry.py        names, versions, pins, tokens served (any thread)
    loader.py          disk -> host: reading and checking files, the host tier, background loads
    slot_admission.py  host -> device: which adapter each slot holds, the scheduler's gate, the step's plan
    step_plan.py       that plan as plain values (it travels to the other tensor-parallel ranks)
    step_applier.py    the device side of the plan, which each rank's runner builds (handler/runner/)

The device slots are the runner's (it allocates them, on every rank); admission decides what goes in them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import torch

from lora_serving.handler.errors import AdapterError
from lora_serving.handler.lora.device_slots import DeviceSlots
from lora_serving.handler.lora.host_cache import HostCache
from lora_serving.handler.lora.loader import AdapterLoader
from lora_serving.handler.lora.names import validate_adapter_name
from lora_serving.handler.lora.peft_adapter import AdapterVersion, BaseModelShapes
from lora_serving.handler.lora.registry import AdapterEntry, AdapterInfo, AdapterRegistry
from lora_serving.handler.lora.slot_admission import SlotAdmission
from lora_serving.handler.sequence import Sequence

logger = logging.getLogger(__name__)


class LoraManager:
    def __init__(self, base: BaseModelShapes, slots: DeviceSlots, max_cpu_loras: int, max_rank: int,
                 max_wait_steps: int, dtype: torch.dtype, device: torch.device) -> None:
        """`base`: what adapters must fit; `slots`: the runner's device slots."""
        self.base = base
        self.slots = slots
        self.host = HostCache(max_cpu_loras)
        self.registry = AdapterRegistry(self.host, slots.num_slots)
        self.loader = AdapterLoader(base, self.host, max_rank, dtype, device, on_loaded=self.registry.loaded)
        self.admission = SlotAdmission(slots, self.host, self.registry.pinned_hashes, max_wait_steps)

    # ---- names (any thread) -------------------------------------------------------------------------

    def register(self, name: str, path: str | Path, *, pin: bool = False, preload: bool = True,
                 source: str | None = None) -> AdapterInfo:
        """`source`: where `path` came from, as the registrant named it (shown instead of the local path)."""
        validate_adapter_name(name)
        self.registry.check_free(name)
        started = time.perf_counter()
        weights = self.loader.read(name, path)
        self.registry.add(name, weights, pin, load_seconds=time.perf_counter() - started, source=source)
        self.loader.keep_in_host(weights, pin, preload)
        info = self.info(name)
        logger.info("registered adapter %s from %s (ranks %s)", name, path, info.ranks)
        return info

    def register_directory(self, adapters_dir: Path) -> None:
        """Every `<adapters_dir>/<name>/` with an adapter_config.json registers as `<name>` (loaded on use)."""
        if not adapters_dir.is_dir():
            return
        for adapter_dir in sorted(p for p in adapters_dir.iterdir() if (p / "adapter_config.json").is_file()):
            try:
                self.register(adapter_dir.name, adapter_dir, preload=False)
            except AdapterError as error:  # one bad adapter must not stop the others or the server
                logger.error("not registering %s: %s", adapter_dir, error)

    def update(self, name: str, path: str | Path | None = None, *, pin: bool | None = None,
               source: str | None = None) -> AdapterInfo:
        """New files and/or a new pin state for a registered name; running requests keep their version."""
        self.registry.entry(name)
        weights = self.loader.read(name, path) if path is not None else None
        pinned, content_hash = self.registry.update(name, weights, pin, source=source)
        if weights is not None:
            self.loader.keep_in_host(weights, pinned, preload=True)
        elif pinned:
            self.host.set_pinned(content_hash, True)
        return self.info(name)

    def unregister(self, name: str) -> None:
        """New requests for `name` are refused from now on; requests already accepted finish."""
        self.registry.remove(name)
        logger.info("unregistered adapter %s", name)

    def resolve(self, name: str) -> AdapterVersion:
        return self.registry.entry(name).version

    def info(self, name: str) -> AdapterInfo:
        return self._info(name, self.registry.entry(name))

    def list(self) -> list[AdapterInfo]:
        return [self._info(name, entry) for name, entry in self.registry.entries()]

    def _info(self, name: str, entry: AdapterEntry) -> AdapterInfo:
        content_hash = entry.version.content_hash
        if self.admission.on_device(content_hash):
            tier = "device"
        elif content_hash in self.host:
            tier = "host"
        else:
            tier = "disk"
        return AdapterInfo(
            name=name,
            path=str(entry.version.path),
            source=entry.source or str(entry.version.path),
            tier=tier,
            pinned=entry.pinned,
            ranks=entry.ranks,
            target_modules=entry.target_modules,
            load_seconds=entry.load_seconds,
            tokens_served=self.registry.tokens_served(name),
            content_hash=content_hash,
        )

    # ---- the step (engine thread) -------------------------------------------------------------------

    def prefetch(self, waiting: Iterable[Sequence]) -> None:
        """Start loading the adapters the queue will need that are neither in a slot nor in host memory."""
        self.loader.prefetch(waiting, self.admission.on_device)

    def take_failed(self, waiting: Iterable[Sequence]) -> list[tuple[Sequence, str]]:
        return self.loader.take_failed(waiting)

    def wait_for_loads(self, timeout: float | None = None) -> None:
        """Block until the loads under way finish (tests and benchmarks use it)."""
        self.loader.wait_for_loads(timeout)

    def record_token(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.registry.record_token(seq.adapter)

    def close(self) -> None:
        self.loader.close()
