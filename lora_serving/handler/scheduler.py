"""Decides, every step, which sequences run: all running ones decode, waiting ones join while they fit.

Rules (rolling batching):
- running sequences are served first; when the KV cache cannot hold their next token, the newest running
  sequence is preempted (its blocks freed, it goes back to the queue and is recomputed later);
- waiting sequences are admitted in arrival order while there are free sequence slots, KV blocks and
  token budget (`max_batched_tokens`, decodes included); an admitted sequence gets blocks for all its
  tokens at once, starting with the blocks of its longest prefix in the prefix cache, and computes only
  the rest;
- with chunked prefill, a sequence whose tokens do not fit in what is left of the step's budget computes
  as many as fit, and the rest over the next steps, after the decodes: a long prompt never holds the
  running streams up for longer than one budget's worth of tokens. It samples only when its last token is
  computed. Without chunking, a prompt longer than the budget still runs, as the step's only prefill;
- an admission gate (the adapter manager when LoRA is on) may hold a sequence back, e.g. because its
  adapter has no device slot this step; held sequences do not block the ones behind them;
- a request of several sequences (n / best_of) is admitted whole: its first sequence is prefilled, and the
  others share its blocks and sample their first token from its logits in the step its prefill completes.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.sequence import Sequence, SequenceStatus


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
    # Tokens each prefill computes this step, from its first uncached one: all it has left, or a chunk.
    prefill_lengths: list[int] = field(default_factory=list)
    # Whether each prefill computes its sequence's last token this step, and so samples.
    prefill_completes: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Prefilled sequence -> the sequences forked from it this step, which sample from its logits too.
    forks: dict[Sequence, list[Sequence]] = field(default_factory=dict)

    @property
    def seqs(self) -> list[Sequence]:
        """The sequences of the forward pass: decodes, then prefills."""
        return self.decode_seqs + self.prefill_seqs

    @property
    def logit_seqs(self) -> list[Sequence]:
        """The sequences that need next-token logits, one row each: decodes, then completing prefills."""
        return self.decode_seqs + [seq for seq, completes in zip(self.prefill_seqs, self.prefill_completes)
                                   if completes]

    @property
    def is_chunked(self) -> bool:
        """Whether the budget cut a prefill short this step (it goes on in the next)."""
        return not all(self.prefill_completes)

    def sampling_rows(self) -> tuple[list[Sequence], list[int] | None]:
        """Every sequence that samples a token this step, and the logits row each samples from (None: one
        row each, in `logit_seqs` order). Forked sequences come last."""
        seqs = self.logit_seqs
        if not self.forks:
            return seqs, None
        rows = list(range(len(seqs)))
        sampled = list(seqs)
        for row, seq in enumerate(seqs):
            for child in self.forks.get(seq, ()):
                sampled.append(child)
                rows.append(row)
        return sampled, rows

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.prefill_seqs

    @property
    def num_tokens(self) -> int:
        return len(self.decode_seqs) + sum(self.prefill_lengths)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_running: int,
        max_batched_tokens: int,
        gate: AdmissionGate | None = None,
        chunked_prefill: bool = False,
    ) -> None:
        self.block_manager = block_manager
        self.max_running = max_running
        self.max_batched_tokens = max_batched_tokens
        self.chunked_prefill = chunked_prefill
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
        self._schedule_partial_prefills(step)
        if not step.preempted:
            # Admitting right after preempting would hand the freed blocks to a newcomer and thrash.
            self._admit_waiting(step)
        return step

    def complete(self, step: ScheduledStep) -> None:
        """The step's forward pass ran: its tokens' K/V are in the cache (and their full blocks in the prefix
        cache). Call before the sampled tokens are appended."""
        for seq in step.decode_seqs:
            self.block_manager.commit(seq, 1)
        for seq, length in zip(step.prefill_seqs, step.prefill_lengths):
            self.block_manager.commit(seq, length)
            for child in step.forks.get(seq, ()):
                self.block_manager.commit(child, length)

    def _schedule_decodes(self, step: ScheduledStep) -> None:
        for seq in sorted(self.running, key=lambda s: s.arrival_order):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop, or still prefilling
            while not self.block_manager.can_allocate(seq, 1):
                victim = max(self.running, key=lambda s: s.arrival_order)
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                self.block_manager.allocate(seq, 1)
                step.decode_seqs.append(seq)

    def _schedule_partial_prefills(self, step: ScheduledStep) -> None:
        """Sequences whose prefill the budget cut short go on, oldest first (their blocks are theirs already)."""
        for seq in sorted(self.running, key=lambda s: s.arrival_order):
            if seq.status is SequenceStatus.PREFILLING:
                length = min(seq.num_tokens - seq.num_cached_tokens, self.max_batched_tokens - step.num_tokens)
                if length <= 0:
                    return
                self._add_prefill(seq, length, step)

    def _admit_waiting(self, step: ScheduledStep) -> None:
        self.gate.begin_step(self.running)
        block_size = self.block_manager.block_size
        # Forks of sequences still prefilling join the batch when their parent completes: their places count.
        used = len(self.running) + sum(len(seq.forks) for seq in self.running)
        held: list[Sequence] = []
        while self.waiting and used + 1 + len(self.waiting[0].forks) <= self.max_running:
            seq = self.waiting[0]
            cached = self.block_manager.cached_prefix(seq)
            length = self._admitted_length(seq.num_tokens - len(cached) * block_size, step)
            if length == 0 or not self.block_manager.can_admit(seq, cached):
                break
            self.waiting.popleft()
            if not self.gate.try_admit(seq):
                held.append(seq)
                continue
            self.block_manager.admit(seq, cached)
            self.running.append(seq)
            used += 1 + len(seq.forks)
            self._add_prefill(seq, length, step)
        # Held sequences keep their place at the head of the queue, in arrival order.
        self.waiting.extendleft(reversed(held))

    def _admitted_length(self, uncached: int, step: ScheduledStep) -> int:
        """Tokens a newly admitted sequence with `uncached` tokens to compute computes this step (0: none)."""
        budget = self.max_batched_tokens - step.num_tokens
        if self.chunked_prefill:
            return max(0, min(uncached, budget))
        return uncached if uncached <= budget or not step.prefill_seqs else 0

    def _add_prefill(self, seq: Sequence, length: int, step: ScheduledStep) -> None:
        completes = seq.num_cached_tokens + length == seq.num_tokens
        step.prefill_seqs.append(seq)
        step.prefill_lengths.append(length)
        step.prefill_completes.append(completes)
        if not completes:
            seq.status = SequenceStatus.PREFILLING
            return
        seq.status = SequenceStatus.RUNNING
        if seq.forks:
            self._fork(seq, step)

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
