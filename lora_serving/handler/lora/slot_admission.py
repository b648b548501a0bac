"""Host -> device: which adapter each device slot holds, and the scheduler's admission gate.

A waiting sequence is admitted only once its adapter is in a slot: a resident one at once, one in host memory
into a free slot or the least recently used slot that no running sequence and no pin holds. One that waits
too long for a slot (`max_wait_steps`) stops later requests from taking slots until it has one, so the running
sequences drain and a cold adapter is never starved by a hot one. From the slots in use it makes each
step's LoraStepPlan.

The slots themselves (the device buffers) belong to the runner; this decides what goes in them. Runs on the
engine thread only, except `num_busy_slots` (a snapshot for metrics).
"""

from __future__ import annotations

from typing import Callable, Iterable

from lora_serving.handler.lora.device_slots import DeviceSlots
from lora_serving.handler.lora.host_cache import HostCache
from lora_serving.handler.lora.peft_adapter import AdapterWeights
from lora_serving.handler.lora.step_plan import LoraStepPlan
from lora_serving.handler.scheduler import ScheduledStep
from lora_serving.handler.sequence import Sequence


class SlotAdmission:
    def __init__(self, slots: DeviceSlots, host: HostCache, pinned_hashes: Callable[[], set[str]],
                 max_wait_steps: int) -> None:
        """`host`: where admitted adapters are read from; `pinned_hashes()`: the adapters that keep a slot."""
        self.slots = slots
        self.host = host
        self.max_wait_steps = max_wait_steps
        self._pinned_hashes = pinned_hashes
        self._slot_of: dict[str, int] = {}  # content hash -> slot
        self._slot_last_used = [0] * slots.num_slots
        self._busy_slots: set[int] = set()
        self._starving_order: int | None = None
        self._step = 0

    def on_device(self, content_hash: str) -> bool:
        return content_hash in self._slot_of

    # ---- the scheduler's gate -----------------------------------------------------------------------

    def begin_step(self, running: Iterable[Sequence]) -> None:
        self._step += 1
        self._starving_order = None
        self._busy_slots = {self._slot_of[seq.adapter_version.content_hash]
                            for seq in running if seq.adapter_version is not None}
        for slot in self._busy_slots:
            self._slot_last_used[slot] = self._step
        for content_hash in self._pinned_hashes():
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
        pinned = self._pinned_hashes()
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

    # ---- the step's plan ----------------------------------------------------------------------------

    def step_plan(self, step: ScheduledStep) -> LoraStepPlan | None:
        """Each token's slot, and the groups its adapters target; None when no token of the step has one."""
        token_slots: list[int] = []
        for seq in step.decode_seqs:
            token_slots.append(self.slot_for(seq))
        for seq, length in zip(step.prefill_seqs, step.prefill_lengths):
            token_slots.extend([self.slot_for(seq)] * length)
        active = {slot for slot in token_slots if slot >= 0}
        if not active:
            return None
        return LoraStepPlan(token_slots, self.slots.groups_in_use(active))

    def group_by_slot(self, decode_seqs: list[Sequence]) -> None:
        """Order a step's decodes by adapter slot (base-model ones first), arrival order kept within a slot:
        the LoRA ops then read an adapter's weights for all its tokens in a row, and a slot's tokens form one
        consecutive segment. Measured 7% off a decode step's LoRA time at 32 tokens over 17 adapters."""
        decode_seqs.sort(key=self.slot_for)

    def slot_for(self, seq: Sequence) -> int:
        return -1 if seq.adapter_version is None else self._slot_of[seq.adapter_version.content_hash]

    def num_busy_slots(self, running: Iterable[Sequence]) -> int:
        """Distinct device slots that the running sequences use (any thread: a snapshot for metrics)."""
        slots = {self._slot_of.get(seq.adapter_version.content_hash) for seq in running
                 if seq.adapter_version is not None}
        return len(slots - {None})
