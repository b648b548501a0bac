"""LoraGroup (lora_serving/kernels/group.py): add_lora_packed's result, through the C kernel on buffers checked once."""

import pytest
import torch

from lora_serving import kernels
from lora_serving.kernels import LoraBatchMeta, LoraGroup, torch_path
from lora_serving.kernels.reference import add_lora_packed_reference
from tests.kernels.lora_kernel_cases import Case, make_batch, tolerance

SHARED_A_CASES = [
    Case(9, 64, (64, 32, 32), "mixed", "uniform", shared_a=True),  # q/k/v-like, ranks differing per slot
    Case(32, 96, (96, 160), "16", "zipf", shared_a=True, no_adapter_tokens=True),  # gate/up-like
    Case(5, 160, (64,), "8", "uniform", shared_a=True),  # one slice
]


@pytest.fixture
def prepared_calls(monkeypatch):
    calls = []
    original = torch_path.NativeGroup.add

    def spy(self, y, x, meta):
        calls.append(x.shape[0])
        return original(self, y, x, meta)

    monkeypatch.setattr(torch_path.NativeGroup, "add", spy)
    return calls


def expected_after(batch):
    return add_lora_packed_reference(batch.y, batch.x, batch.lora_a, batch.lora_b, batch.token_slots,
                                     batch.slot_ranks)


@pytest.mark.parametrize("case", SHARED_A_CASES, ids=str)
def test_the_prepared_path_equals_add_lora_packed(case, prepared_calls):
    if not kernels.cpu_kernel_enabled():
        pytest.skip("the C kernels do not build here")
    batch = make_batch(case)
    expected = expected_after(batch)
    y_packed = batch.y.clone()
    meta = LoraBatchMeta.build(batch.token_slots, batch.num_slots)
    kernels.add_lora_packed(y_packed, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks, meta)
    LoraGroup(batch.lora_a, batch.lora_b, batch.slot_ranks).add(batch.y, batch.x, batch.token_slots, meta)
    assert prepared_calls == [case.tokens]
    assert torch.equal(batch.y, y_packed)
    torch.testing.assert_close(batch.y, expected, **tolerance(torch.float32))


def test_ranks_written_after_preparing_are_read_at_the_call():
    batch = make_batch(SHARED_A_CASES[0])
    group = LoraGroup(batch.lora_a, batch.lora_b, batch.slot_ranks)
    for ranks in batch.slot_ranks:  # as the engine clears a slot: in place
        ranks[batch.token_slots[0]] = 0
    expected = expected_after(batch)
    group.add(batch.y, batch.x, batch.token_slots, LoraBatchMeta.build(batch.token_slots, batch.num_slots))
    torch.testing.assert_close(batch.y, expected, **tolerance(torch.float32))


def test_a_strided_output_takes_the_checked_path(prepared_calls):
    batch = make_batch(SHARED_A_CASES[2])
    wide = torch.zeros(batch.y.shape[0], 2 * batch.y.shape[1])
    y = wide[:, ::2]  # column stride 2: the kernel writes unit-stride rows
    y.copy_(batch.y)
    expected = expected_after(batch)
    LoraGroup(batch.lora_a, batch.lora_b, batch.slot_ranks).add(y, batch.x, batch.token_slots,
                                                               LoraBatchMeta.build(batch.token_slots, batch.num_slots))
    assert prepared_calls == []
    torch.testing.assert_close(y, expected, **tolerance(torch.float32))


def test_wrong_shapes_are_refused_with_the_same_errors():
    batch = make_batch(SHARED_A_CASES[0])
    group = LoraGroup(batch.lora_a, batch.lora_b, batch.slot_ranks)
    meta = LoraBatchMeta.build(batch.token_slots, batch.num_slots)
    with pytest.raises(ValueError, match="do not fit x"):
        group.add(batch.y, batch.x[:, :-1], batch.token_slots, meta)
    with pytest.raises(ValueError, match="y must be"):
        group.add(batch.y[:, :-1], batch.x, batch.token_slots, meta)
    with pytest.raises(ValueError, match="slot_ranks must be"):
        LoraGroup(batch.lora_a, batch.lora_b, [ranks[:-1] for ranks in batch.slot_ranks])


def prepared_group_with_compact_copies(case):
    if not kernels.cpu_kernel_enabled():
        pytest.skip("the C kernels do not build here")
    batch = make_batch(case)
    group = LoraGroup(batch.lora_a, batch.lora_b, batch.slot_ranks)
    for slot in range(batch.num_slots):
        group.slot_written(slot)
    return batch, group


@pytest.mark.parametrize("case", SHARED_A_CASES, ids=str)
def test_slots_read_their_compact_copy_of_a(case):
    batch, group = prepared_group_with_compact_copies(case)
    meta = LoraBatchMeta.build(batch.token_slots, batch.num_slots)
    y_full_rows = batch.y.clone()
    kernels.add_lora_packed(y_full_rows, batch.x, batch.lora_a, batch.lora_b, batch.token_slots, batch.slot_ranks,
                            meta)
    expected = expected_after(batch)
    # The full-width rows of every slot, spoiled: only the compact copies made above can still give the delta.
    for lora_a, ranks in zip(batch.lora_a, batch.slot_ranks):
        for slot, rank in enumerate(ranks.tolist()):
            lora_a[slot, :rank] = float("nan")
    group.add(batch.y, batch.x, batch.token_slots, meta)
    # The same sums in the same order as from the full-width rows (a column that falls in a row's scalar tail in
    # one layout and in a vector in the other may round its last bit differently).
    torch.testing.assert_close(batch.y, y_full_rows, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batch.y, expected, **tolerance(torch.float32))


def test_a_slot_whose_ranks_changed_since_its_copy_reads_its_full_rows():
    batch, group = prepared_group_with_compact_copies(SHARED_A_CASES[0])
    slot = int(batch.token_slots[0])
    changed = False
    for ranks in batch.slot_ranks:  # lowered in place without slot_written: the copy no longer fits
        if ranks[slot] > 1:
            ranks[slot] //= 2
            changed = True
    assert changed
    expected = expected_after(batch)
    group.add(batch.y, batch.x, batch.token_slots, LoraBatchMeta.build(batch.token_slots, batch.num_slots))
    torch.testing.assert_close(batch.y, expected, **tolerance(torch.float32))


def test_slot_written_refuses_a_slot_outside_the_buffers():
    batch, group = prepared_group_with_compact_copies(SHARED_A_CASES[2])
    with pytest.raises(ValueError, match=f"slot {batch.num_slots} is outside"):
        group.slot_written(batch.num_slots)
