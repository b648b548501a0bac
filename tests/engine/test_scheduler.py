"""The scheduler and block manager on their own: no model, no tensors."""

from __future__ import annotations

import pytest

from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.scheduler import Scheduler
from lora_serving.handler.sequence import SamplingParams, Sequence, SequenceStatus


def make_seq(name: str, prompt_len: int, max_new_tokens: int = 8) -> Sequence:
    return Sequence(request_id=name, prompt_token_ids=list(range(prompt_len)),
                    params=SamplingParams(max_new_tokens=max_new_tokens))


def run_step(scheduler: Scheduler):
    """Schedule, then pretend the model ran: every scheduled sequence caches its tokens and samples one."""
    step = scheduler.schedule()
    for seq in step.seqs:
        seq.num_cached_tokens = seq.num_tokens
        seq.output_token_ids.append(7)
    return step


def test_block_manager_allocates_and_frees_whole_blocks():
    manager = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", 5)
    assert manager.blocks_needed(5) == 2
    manager.allocate(seq, 5)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 2
    seq.num_cached_tokens = 5
    manager.allocate(seq, 3)  # tokens 5..7 still fit in the second block
    assert len(seq.block_table) == 2
    manager.allocate(seq, 4)
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 1
    assert manager.slot_of(seq, 9) == seq.block_table[2] * 4 + 1
    assert not manager.can_allocate(make_seq("b", 8), 8)
    manager.free(seq)
    assert manager.num_free_blocks == 4 and seq.block_table == [] and seq.num_cached_tokens == 0
    with pytest.raises(RuntimeError):
        manager.allocate(make_seq("c", 40), 40)


def test_admission_is_bounded_by_batch_size_and_free_blocks():
    manager = BlockManager(num_blocks=10, block_size=4)
    scheduler = Scheduler(manager, max_running=3, max_batched_tokens=1000)
    seqs = [make_seq(str(i), 8) for i in range(5)]  # 2 blocks each
    for seq in seqs:
        scheduler.add(seq)
    step = run_step(scheduler)
    assert step.prefill_seqs == seqs[:3]  # the batch-size limit
    assert [s.status for s in seqs] == [SequenceStatus.RUNNING] * 3 + [SequenceStatus.WAITING] * 2
    scheduler.remove(seqs[0])  # a finished sequence frees its slot and blocks at once
    assert manager.num_free_blocks == 10 - 2 * 3 + 2
    step = run_step(scheduler)
    assert step.decode_seqs == seqs[1:3] and step.prefill_seqs == [seqs[3]]


def test_waiting_requests_are_admitted_in_arrival_order_without_skipping():
    manager = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(manager, max_running=8, max_batched_tokens=1000)
    big, small = make_seq("big", 14), make_seq("small", 2)
    running = make_seq("running", 6)
    scheduler.add(running)
    run_step(scheduler)
    scheduler.add(big)
    scheduler.add(small)
    step = run_step(scheduler)
    # `big` needs 4 blocks, 2 are free: nothing behind it jumps the queue (that would starve it).
    assert step.prefill_seqs == [] and list(scheduler.waiting) == [big, small]


def test_prefill_budget_limits_a_step_but_a_long_prompt_still_runs_alone():
    manager = BlockManager(num_blocks=100, block_size=4)
    scheduler = Scheduler(manager, max_running=8, max_batched_tokens=20)
    long_prompt, short_a, short_b = make_seq("long", 50), make_seq("a", 8), make_seq("b", 8)
    for seq in (long_prompt, short_a, short_b):
        scheduler.add(seq)
    assert run_step(scheduler).prefill_seqs == [long_prompt]
    step = run_step(scheduler)
    assert step.decode_seqs == [long_prompt] and step.prefill_seqs == [short_a, short_b]


def test_out_of_blocks_preempts_the_newest_sequence_and_requeues_it_first():
    manager = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(manager, max_running=8, max_batched_tokens=1000)
    old, new = make_seq("old", 8), make_seq("new", 8)  # 2 blocks each: the cache is full
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)
    late = make_seq("late", 2)
    scheduler.add(late)
    step = run_step(scheduler)
    # Both need a third block for token 9; only preempting `new` (the newest) frees room for `old`.
    assert step.preempted == [new]
    assert step.decode_seqs == [old] and step.prefill_seqs == []
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_preemptions == 1
    assert list(scheduler.waiting) == [new, late]  # ahead of the request that arrived after it
    # Recompute: when there is room again, the preempted sequence prefills prompt + generated tokens.
    scheduler.remove(old)
    step = scheduler.schedule()
    assert step.prefill_seqs[0] is new and new.num_tokens == 8 + 1 and len(new.block_table) == 3


def test_a_sequence_alone_preempts_itself_only_when_nothing_else_can_go():
    manager = BlockManager(num_blocks=2, block_size=2)
    scheduler = Scheduler(manager, max_running=8, max_batched_tokens=1000)
    a, b = make_seq("a", 2), make_seq("b", 2)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    step = run_step(scheduler)
    assert step.preempted == [b] and step.decode_seqs == [a]


def test_gate_holds_sequences_without_blocking_the_queue():
    class OnlyEven:
        def begin_step(self, running):
            pass

        def try_admit(self, seq):
            return int(seq.request_id) % 2 == 0

    manager = BlockManager(num_blocks=100, block_size=4)
    scheduler = Scheduler(manager, max_running=8, max_batched_tokens=1000, gate=OnlyEven())
    seqs = [make_seq(str(i), 4) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    step = run_step(scheduler)
    assert step.prefill_seqs == [seqs[0], seqs[2], seqs[4]]
    assert list(scheduler.waiting) == [seqs[1], seqs[3]]
    assert manager.num_free_blocks == 100 - 3
