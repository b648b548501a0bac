"""Where the block manager places sequences: consecutive blocks when there is room, any block when not."""

from __future__ import annotations

import random

from lora_serving.handler.block_manager import BlockManager
from lora_serving.handler.sequence import SamplingParams, Sequence


def make_seq(name: str, prompt_len: int, max_new_tokens: int) -> Sequence:
    return Sequence(request_id=name, prompt_token_ids=list(range(prompt_len)),
                    params=SamplingParams(max_new_tokens=max_new_tokens))


def admit(manager: BlockManager, seq: Sequence) -> None:
    manager.allocate(seq, seq.num_tokens)
    seq.num_cached_tokens = seq.num_tokens


def grow(manager: BlockManager, seq: Sequence) -> None:
    manager.allocate(seq, 1)
    seq.output_token_ids.append(0)
    seq.num_cached_tokens = seq.num_tokens


def is_consecutive(table: list[int]) -> bool:
    return table == list(range(table[0], table[0] + len(table)))


def test_sequences_decoding_side_by_side_each_keep_consecutive_blocks():
    manager = BlockManager(num_blocks=200, block_size=4)
    rng = random.Random(0)
    seqs = [make_seq(f"s{i}", rng.randint(1, 30), rng.randint(5, 60)) for i in range(8)]
    for seq in seqs:
        admit(manager, seq)
    for _ in range(60):  # one token each per step, interleaved as the engine decodes them
        for seq in seqs:
            if len(seq.output_token_ids) < seq.params.max_new_tokens:
                grow(manager, seq)
    for seq in seqs:
        assert len(seq.block_table) == manager.blocks_needed(seq.max_total_tokens)
        assert is_consecutive(seq.block_table), seq.block_table


def test_blocks_set_aside_for_one_sequence_go_to_another_when_nothing_else_is_free():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = make_seq("first", 4, 28)  # one block now, eight at full length: seven set aside
    admit(manager, first)
    second = make_seq("second", 12, 4)
    assert manager.can_allocate(second, second.num_tokens)
    admit(manager, second)
    assert len(second.block_table) == 3 and manager.num_free_blocks == 4
    grow(manager, first)
    grow(manager, first)
    grow(manager, first)
    grow(manager, first)  # its 5th token needs a 2nd block: one that is still free
    assert len(first.block_table) == 2
    assert not set(first.block_table) & set(second.block_table)


def test_random_admissions_growth_and_frees_never_share_or_lose_a_block():
    rng = random.Random(1)
    manager = BlockManager(num_blocks=64, block_size=4)
    live: list[Sequence] = []
    for step in range(3000):
        action = rng.random()
        if action < 0.15 or not live:
            seq = make_seq(f"s{step}", rng.randint(1, 40), rng.randint(1, 200))
            if manager.can_allocate(seq, seq.num_tokens):
                admit(manager, seq)
                live.append(seq)
        elif action < 0.25:
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
            assert seq.block_table == []
        else:
            seq = rng.choice(live)
            if manager.can_allocate(seq, 1):
                grow(manager, seq)
        owned = [block for seq in live for block in seq.block_table]
        assert len(owned) == len(set(owned)) and all(0 <= block < 64 for block in owned)
        assert manager.num_free_blocks == 64 - len(owned)
        for seq in live:
            assert len(seq.block_table) == manager.blocks_needed(seq.num_tokens)
    for seq in live:
        manager.free(seq)
    assert manager.num_free_blocks == 64
