"""The adapter manager: registry of names, the three tiers, and the scheduler's admission gate.

Tiers: disk (every registered adapter), host memory (LRU of `max_cpu_loras`), device slots (`max_loras`).
Names map to an `AdapterVersion` (path + content hash); caches and slots are keyed by the content hash, so
re-registering a name with other weights can never serve the old ones, and two names with the same
files share one slot.

Threads: registration calls come from any thread (they read and check the files in the caller's thread);
disk -> host loads run on a small pool so that running sequences keep decoding; everything about device
slots and admission runs on the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from lora_serving import kernels
from lora_serving.handler.errors import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterNotFoundError,
    InvalidAdapterError,
)
from lora_serving.handler.lora.device_slots import EXPERTS_GROUP, DeviceSlots
from lora_serving.handler.lora.host_cache import HostCache
from lora_serving.handler.lora.names import validate_adapter_name
from lora_serving.handler.lora.peft_adapter import AdapterVersion, AdapterWeights, BaseModelShapes, load_peft_adapter
from lora_serving.handler.scheduler import ScheduledStep
from lora_serving.handler.sequence import Sequence
from lora_serving.handler.tp.lora import RowParallelLora
from lora_serving.handler.tp.plan import ShardingPlan

logger = logging.getLogger(__name__)

LOADER_THREADS = 2
# Under tensor parallelism these groups' LoRA needs the all-reduce of its rank-r intermediate.
ROW_PARALLEL_GROUPS = ("o", "down")


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
class _Entry:
    version: AdapterVersion
    pinned: bool
    ranks: list[int]
    target_modules: list[str]
    load_seconds: float | None
    source: str | None


class LoraManager:
    def __init__(
        self,
        base: BaseModelShapes,
        max_loras: int,
        max_cpu_loras: int,
        max_rank: int,
        max_wait_steps: int,
        dtype: torch.dtype,
        device: torch.device,
        shard: ShardingPlan | None = None,
        row_parallel: RowParallelLora | None = None,
    ) -> None:
        """With tensor parallelism (rank 0's manager), `shard` is rank 0's sharding plan and `row_parallel`
        its LoRA of the row-parallel projections; slot writes are then logged for the other ranks."""
        self.base = base
        self.max_rank = max_rank
        self.max_wait_steps = max_wait_steps
        self.dtype = dtype
        self.device = device
        self.slots = DeviceSlots(max_loras, max_rank, base.num_layers, base.module_shapes, dtype, device,
                                 shard=shard, mirror_writes=row_parallel is not None,
                                 expert_shapes=base.expert_parameters, num_experts=base.num_experts)
        self.row_parallel = row_parallel
        self.host = HostCache(max_cpu_loras)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pinned_hashes: set[str] = set()
        self._tokens_served: Counter[str] = Counter()
        self._loader = ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="lora-load")
        self._loading: dict[str, Future] = {}
        # content hash -> (the files that failed to load, the message)
        self._failed: dict[str, tuple[Path, str]] = {}
        # Engine-thread state.
        self._slot_of: dict[str, int] = {}
        self._slot_last_used = [0] * max_loras
        self._busy_slots: set[int] = set()
        self._wanted: frozenset[str] = frozenset()
        self._starving_order: int | None = None
        self._step = 0

    # ---- registry (any thread) ----------------------------------------------------------------------

    def register(self, name: str, path: str | Path, *, pin: bool = False, preload: bool = True,
                 source: str | None = None) -> AdapterInfo:
        """`source`: where `path` came from, as the registrant named it (shown instead of the local path)."""
        validate_adapter_name(name)
        with self._lock:
            if name in self._entries:
                raise AdapterExistsError(f"Adapter {name} is already registered")
        started = time.perf_counter()
        weights = self._read(name, path)
        load_seconds = time.perf_counter() - started
        with self._lock:
            if name in self._entries:
                raise AdapterExistsError(f"Adapter {name} is already registered")
            if pin:
                self._check_pin_capacity(weights.version.content_hash)
            self._entries[name] = _entry_for(weights, pinned=pin, load_seconds=load_seconds, source=source)
            if pin:
                self._pinned_hashes.add(weights.version.content_hash)
        self._keep_in_host(weights, pin, preload)
        logger.info("registered adapter %s from %s (ranks %s)", name, path, self._entries[name].ranks)
        return self.info(name)

    def update(self, name: str, path: str | Path | None = None, *, pin: bool | None = None,
               source: str | None = None) -> AdapterInfo:
        """New files and/or a new pin state for a registered name; running requests keep their version."""
        with self._lock:
            entry = self._require(name)
        weights = self._read(name, path) if path is not None else None
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
        if weights is not None:
            self._keep_in_host(weights, pinned, preload=True)
        elif pinned:
            self.host.set_pinned(new_hash, True)
        return self.info(name)

    def unregister(self, name: str) -> None:
        """New requests for `name` are refused from now on; requests already accepted finish."""
        with self._lock:
            entry = self._require(name)
            del self._entries[name]
            self._unpin_locked(entry)
        logger.info("unregistered adapter %s", name)

    def resolve(self, name: str) -> AdapterVersion:
        with self._lock:
            return self._require(name).version

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            entry = self._require(name)
        return self._info(name, entry)

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            entries = sorted(self._entries.items())
        return [self._info(name, entry) for name, entry in entries]

    def _info(self, name: str, entry: _Entry) -> AdapterInfo:
        content_hash = entry.version.content_hash
        if content_hash in self._slot_of:
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
            tokens_served=self._tokens_served[name],
            content_hash=content_hash,
        )

    def _read(self, name: str, path: str | Path | None) -> AdapterWeights:
        return load_peft_adapter(name, Path(path), self.base, self.max_rank, self.dtype)

    def _require(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"Adapter {name} is not registered")
        return entry

    def _check_pin_capacity(self, content_hash: str, replacing: str | None = None) -> None:
        pinned_after = len(self._pinned_hashes - {replacing} | {content_hash})
        limit = self.slots.num_slots - 1
        if pinned_after > limit:
            raise AdapterCapacityError(
                f"cannot pin another adapter: {len(self._pinned_hashes)} of {self.slots.num_slots} device slots "
                f"(option.max_loras) are pinned, and one must stay free for unpinned adapters"
            )

    def _unpin_locked(self, entry: _Entry) -> None:
        if not entry.pinned:
            return
        content_hash = entry.version.content_hash
        still_pinned = any(e.pinned and e.version.content_hash == content_hash for e in self._entries.values()
                           if e is not entry)
        if not still_pinned:
            self._pinned_hashes.discard(content_hash)
            self.host.set_pinned(content_hash, False)

    def _keep_in_host(self, weights: AdapterWeights, pin: bool, preload: bool) -> None:
        if pin or preload:
            if pin:
                self.host.set_pinned(weights.version.content_hash, True)
            self.host.put(_for_device(weights, self.device), protect=self._wanted)

    # ---- disk -> host loading (off the step loop) ---------------------------------------------------

    def prefetch(self, waiting: Iterable[Sequence]) -> None:
        """Start loading the adapters the queue will need, in queue order, as many as host memory holds."""
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
            if content_hash in self._slot_of or content_hash in self.host:
                continue
            with self._lock:
                if content_hash in self._loading or content_hash in self._failed:
                    continue
                self._loading[content_hash] = self._loader.submit(self._load, versions[content_hash])

    def _load(self, version: AdapterVersion) -> None:
        started = time.perf_counter()
        try:
            weights = self._read(version.name, version.path)
            if weights.version.content_hash != version.content_hash:
                raise InvalidAdapterError(
                    f"Adapter {version.name}: the files at {version.path} changed since registration; "
                    "register it again to serve the new files"
                )
            self.host.put(_for_device(weights, self.device), protect=self._wanted)
            seconds = time.perf_counter() - started
            with self._lock:
                for entry in self._entries.values():
                    if entry.version.content_hash == version.content_hash:
                        entry.load_seconds = seconds
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

    # ---- admission gate (engine thread) -------------------------------------------------------------

    def begin_step(self, running: Iterable[Sequence]) -> None:
        self._step += 1
        self._starving_order = None
        self._busy_slots = {self._slot_of[seq.adapter_version.content_hash]
                            for seq in running if seq.adapter_version is not None}
        for slot in self._busy_slots:
            self._slot_last_used[slot] = self._step
        with self._lock:
            pinned = list(self._pinned_hashes)
        for content_hash in pinned:
            if content_hash not in self._slot_of:
                weights = self.host.get(content_hash)
                slot = self._claim_slot() if weights is not None else None
                if slot is not None:
                    self._write_slot(slot, weights)

    def try_admit(self, seq: Sequence) -> bool:
        version = seq.adapter_version
        if version is None:
            return True
        if self._starving_order is not None and seq.arrival_order > self._starving_order:
            # Even a resident adapter waits: its running sequences must drain for the starving one's slot.
            return self._hold(seq, waiting_for_slot=False)
        slot = self._slot_of.get(version.content_hash)
        if slot is not None:
            self._use(slot)
            return True
        weights = self.host.get(version.content_hash)
        if weights is None:
            return self._hold(seq, waiting_for_slot=False)  # prefetch() is loading it
        slot = self._claim_slot()
        if slot is None:
            return self._hold(seq, waiting_for_slot=True)
        self._write_slot(slot, weights)
        self._use(slot)
        return True

    def _hold(self, seq: Sequence, waiting_for_slot: bool) -> bool:
        seq.steps_waited += 1
        if waiting_for_slot and seq.steps_waited > self.max_wait_steps and self._starving_order is None:
            # From here on this step, later requests may not take slots that this one needs: the running
            # sequences then finish, a slot frees, and this one gets it within a bounded number of steps.
            self._starving_order = seq.arrival_order
        return False

    def _use(self, slot: int) -> None:
        self._busy_slots.add(slot)
        self._slot_last_used[slot] = self._step

    def _claim_slot(self) -> int | None:
        """A free slot, else the least recently used one that no running sequence or pin holds."""
        owners = self.slots.owner
        for slot, owner in enumerate(owners):
            if owner is None:
                return slot
        with self._lock:
            pinned = set(self._pinned_hashes)
        candidates = [slot for slot, owner in enumerate(owners) if slot not in self._busy_slots and owner not in pinned]
        if not candidates:
            return None
        slot = min(candidates, key=lambda s: self._slot_last_used[s])
        del self._slot_of[owners[slot]]
        self.slots.clear(slot)
        return slot

    def _write_slot(self, slot: int, weights: AdapterWeights) -> None:
        self.slots.write(slot, weights)
        self._slot_of[weights.version.content_hash] = slot
        self._slot_last_used[slot] = self._step

    # ---- the step's LoRA work (engine thread) -------------------------------------------------------

    def step_applier(self, step: ScheduledStep) -> "LoraStepApplier | None":
        token_slots: list[int] = []
        for seq in step.decode_seqs:
            token_slots.append(self._slot_for(seq))
        for seq, length in zip(step.prefill_seqs, step.prefill_lengths):
            token_slots.extend([self._slot_for(seq)] * length)
        active = {slot for slot in token_slots if slot >= 0}
        if not active:
            return None
        return LoraStepApplier(self.slots, LoraStepPlan(token_slots, self.slots.groups_in_use(active)), self.device,
                               self.row_parallel)

    def group_by_slot(self, decode_seqs: list[Sequence]) -> None:
        """Order a step's decodes by adapter slot (base-model ones first), arrival order kept within a slot:
        the LoRA ops then read an adapter's weights for all its tokens in a row, and a slot's tokens form one
        consecutive segment. Measured 7% off a decode step's LoRA time at 32 tokens over 17 adapters."""
        decode_seqs.sort(key=self._slot_for)

    def _slot_for(self, seq: Sequence) -> int:
        return -1 if seq.adapter_version is None else self._slot_of[seq.adapter_version.content_hash]

    def num_busy_slots(self, running: Iterable[Sequence]) -> int:
        """Distinct device slots that the running sequences use (any thread: a snapshot for metrics)."""
        slots = {self._slot_of.get(seq.adapter_version.content_hash) for seq in running
                 if seq.adapter_version is not None}
        return len(slots - {None})

    def record_token(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self._tokens_served[seq.adapter] += 1

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class LoraStepPlan:
    """What a step's LoRA calls need to know, as plain values (rank 0 sends it to the other ranks)."""

    token_slots: list[int]  # per token of the step, -1 = no adapter
    groups: set[str]  # projection groups some adapter in the step targets


class LoraStepApplier:
    """Per step: every LoRA layer call reuses the token -> slot map and its grouping, computed once."""

    def __init__(self, slots: DeviceSlots, plan: LoraStepPlan, device: torch.device,
                 row_parallel: RowParallelLora | None = None) -> None:
        self.plan = plan
        self._group_args = slots.group_args
        self._groups = slots.groups
        # Built from a host tensor: the metadata needs no read back from the device.
        host_slots = torch.tensor(plan.token_slots, dtype=torch.int32)
        self._meta = kernels.LoraBatchMeta.build(host_slots, slots.num_slots, device=device)
        self._token_slots = host_slots.to(device, non_blocking=True)
        self._row_parallel = row_parallel
        self._experts = slots.experts if EXPERTS_GROUP in plan.groups else None
        if self._experts is not None:  # base tokens read the expert buffers' zero slot
            self._expert_slots = torch.where(self._token_slots < 0, self._experts.base_slot, self._token_slots).long()

    def apply(self, layer_index: int, group: str, y: torch.Tensor, x: torch.Tensor) -> None:
        if group not in self.plan.groups:
            return
        if self._row_parallel is not None and group in ROW_PARALLEL_GROUPS:
            args = self._group_args[layer_index][group]
            self._row_parallel.apply(group, y, x, args, self._token_slots, self._meta)
            return
        self._groups[layer_index][group].add(y, x, self._token_slots, self._meta)

    def apply_expert(self, layer_index: int, parameter: str, expert: int, y: torch.Tensor, x: torch.Tensor,
                     tokens: torch.Tensor) -> None:
        """Adds the LoRA delta of one expert's parameter to y [n, out] for its rows x [n, in], the step's
        tokens `tokens` [n] (a mixture of experts groups a step's tokens by expert)."""
        if self._experts is not None:
            y += self._experts.delta(layer_index, parameter, expert, self._expert_slots.index_select(0, tokens), x)


def _entry_for(weights: AdapterWeights, pinned: bool, load_seconds: float | None, source: str | None) -> _Entry:
    return _Entry(
        version=weights.version,
        pinned=pinned,
        ranks=sorted({lora.a.shape[0] for lora in weights.modules.values()}
                     | {lora.a.shape[1] for lora in weights.expert_modules.values()}),
        target_modules=sorted({module for _, module in weights.modules}
                              | {f"experts.{parameter}" for _, parameter in weights.expert_modules}),
        load_seconds=load_seconds,
        source=source,
    )


def _for_device(weights: AdapterWeights, device: torch.device) -> AdapterWeights:
    """On CUDA, host copies live in page-locked memory so that slot writes are asynchronous copies."""
    if device.type != "cuda":
        return weights
    for lora in [*weights.modules.values(), *weights.expert_modules.values()]:
        lora.a = lora.a.pin_memory()
        lora.b = lora.b.pin_memory()
    return weights
