"""Decides, every step, which sequences run: all running ones decode, waiting ones join while they fit.

Rules (rolling batching):
- running sequences are served first; when the KV cache cannot hold their next token, the newest running
  sequence is preempted (its blocks freed, it goes back to the queue and is recomputed later);
- waiting sequences are admitted in arrival order while there are free sequence slots, KV blocks and
  prefill budget; a prompt longer than the budget still runs, as the step's only prefill;
- an admission gate (the adapter manager when LoRA is on) may hold a sequence back, e.g. because its
  adapter has no device slot this step; held sequences do not block the ones behind them;
- a request of several sequences (n / best_of) is admitted whole: its first sequence is prefilled, and the
  others share its blocks and sample their first token from its logits in the same step.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from handler.block_manager import BlockManager
from handler.sequence import Sequence, SequenceStatus


class AdmissionGate(Protocol):
    """Lets the scheduler ask whether a sequence's other resources (its adapter) are ready this step."""

    def begin_step(self, running: Iterable[Sequence]) -> None: ...

    def try_admit(self, seq: Sequence) -> bool: ...


class OpenGate:
    """The gate of an engine without LoRA: everything may run."""

    def begin_step(self, running: Iterable[Sequence]) -> None:
        pass

    def try_admit(self, seq: Sequence) -> bool:
        return True


@dataclass(slots=True)
class ScheduledStep:
    decode_seqs: list[Sequence] = field(default_factory=list)
    prefill_seqs: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Prefilled sequence -> the sequences forked from it this step, which sample from its logits too.
    forks: dict[Sequence, list[Sequence]] = field(default_factory=dict)

    @property
    def seqs(self) -> list[Sequence]:
        """The sequences of the forward pass, one logits row each: decodes, then prefills."""
        return self.decode_seqs + self.prefill_seqs

    def sampling_rows(self) -> tuple[list[Sequence], list[int] | None]:
        """Every sequence that samples a token this step, and the logits row each samples from (None: one
        row each, in `seqs` order). Forked sequences come last."""
        seqs = self.seqs
        if not self.forks:
            return seqs, None
        rows = list(range(len(seqs)))
        sampled = list(seqs)
        first_prefill_row = len(self.decode_seqs)
        for row, seq in enumerate(self.prefill_seqs, start=first_prefill_row):
            for child in self.forks.get(seq, ()):
                sampled.append(child)
                rows.append(row)
        return sampled, rows

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.prefill_seqs

    @property
    def num_tokens(self) -> int:
        return len(self.decode_seqs) + sum(seq.num_tokens for seq in self.prefill_seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_running: int,
        max_batched_tokens: int,
        gate: AdmissionGate | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_running = max_running
        self.max_batched_tokens = max_batched_tokens
        self.gate: AdmissionGate = gate or OpenGate()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ---- queue operations ---------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the scheduler (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    # ---- the step -----------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._schedule_decodes(step)
        if not step.preempted:
            # Admitting right after preempting would hand the freed blocks to a newcomer and thrash.
            self._admit_waiting(step)
        return step

    def _schedule_decodes(self, step: ScheduledStep) -> None:
        for seq in sorted(self.running, key=lambda s: s.arrival_order):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            while not self.block_manager.can_allocate(seq, 1):
                victim = max(self.running, key=lambda s: s.arrival_order)
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.allocate(seq, 1)
                step.decode_seqs.append(seq)

    def _admit_waiting(self, step: ScheduledStep) -> None:
        self.gate.begin_step(self.running)
        num_tokens = len(step.decode_seqs)
        held: list[Sequence] = []
        while self.waiting and len(self.running) + len(self.waiting[0].forks) < self.max_running:
            seq = self.waiting[0]
            over_budget = num_tokens + seq.num_tokens > self.max_batched_tokens
            if (over_budget and step.prefill_seqs) or not self.block_manager.can_allocate(seq, seq.num_tokens):
                break
            self.waiting.popleft()
            if not self.gate.try_admit(seq):
                held.append(seq)
                continue
            self.block_manager.allocate(seq, seq.num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.prefill_seqs.append(seq)
            num_tokens += seq.num_tokens
            if seq.forks:
                self._fork(seq, step)
        # Held sequences keep their place at the head of the queue, in arrival order.
        self.waiting.extendleft(reversed(held))

    def _fork(self, seq: Sequence, step: ScheduledStep) -> None:
        children, seq.forks = seq.forks, []
        for child in children:
            self.block_manager.fork(seq, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        step.forks[seq] = children

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        step.preempted.append(seq)
        # Back into the queue by arrival order, so it runs again before anything that came after it.
        orders = [waiting.arrival_order for waiting in self.waiting]
        self.waiting.insert(bisect.bisect_left(orders, seq.arrival_order), seq)
