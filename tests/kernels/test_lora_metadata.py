"""LoraBatchMeta: tokens grouped by slot, and tiles that cover each adapter token exactly once."""

import pytest
import torch

from lora_serving.kernels import LoraBatchMeta


def _tiles(meta):
    return [tuple(tile) for tile in meta.tiles.t().tolist()]


def test_groups_tokens_by_slot_keeping_batch_order():
    meta = LoraBatchMeta.build(torch.tensor([3, -1, 0, 3, 3, -1, 0]), num_slots=4)
    assert meta.num_tokens == 7
    assert meta.sorted_token_ids.tolist() == [2, 6, 0, 3, 4]
    assert meta.active_slots == (0, 3)
    assert meta.segment_starts == (0, 2)
    assert meta.segment_counts == (2, 3)
    # Neither slot's tokens are consecutive in the batch (0 at 2 and 6; 3 at 0, 3, 4).
    assert meta.segment_first_tokens == (-1, -1)


def test_consecutive_segments_are_marked_with_their_first_token():
    meta = LoraBatchMeta.build(torch.tensor([-1, 5, 5, 5, 1, 1, -1]), num_slots=6)
    assert meta.active_slots == (1, 5)
    assert meta.segment_first_tokens == (4, 1)


def test_tiles_cover_each_adapter_token_once_and_never_mix_slots():
    generator = torch.Generator().manual_seed(0)
    token_slots = torch.cat([torch.full((150,), 2), torch.randint(-1, 6, (40,), generator=generator)])
    meta = LoraBatchMeta.build(token_slots, num_slots=6)
    assert meta.token_block == 64  # a 150-token segment asks for the largest tile
    covered = []
    for slot, start, end in _tiles(meta):
        assert 0 < end - start <= meta.token_block
        tokens = meta.sorted_token_ids[start:end]
        assert (token_slots[tokens] == slot).all()
        covered += tokens.tolist()
    assert sorted(covered) == sorted(torch.nonzero(token_slots >= 0).flatten().tolist())
    # Sized by the tokens present: ceil(count / block) tiles per slot, no worst-case padding.
    expected_tiles = sum(-(-count // meta.token_block) for count in meta.segment_counts)
    assert meta.num_tiles == expected_tiles


def test_decode_batches_get_the_smallest_tile():
    meta = LoraBatchMeta.build(torch.arange(32) % 8, num_slots=8)
    assert meta.token_block == 16
    assert meta.num_tiles == 8


def test_batch_without_adapters_has_no_work():
    meta = LoraBatchMeta.build(torch.full((5,), -1), num_slots=4)
    assert meta.num_lora_tokens == 0 and meta.num_tiles == 0 and meta.active_slots == ()
    empty = LoraBatchMeta.build(torch.zeros(0, dtype=torch.int64), num_slots=4)
    assert empty.num_tokens == 0 and empty.num_tiles == 0


@pytest.mark.parametrize("bad_slot", [4, -2])
def test_rejects_slots_out_of_range(bad_slot):
    with pytest.raises(ValueError, match="token_slots must lie in"):
        LoraBatchMeta.build(torch.tensor([0, bad_slot]), num_slots=4)


def test_metadata_can_land_on_another_device_than_token_slots():
    meta = LoraBatchMeta.build(torch.tensor([1, 0, 1]), num_slots=2, device="meta")
    assert meta.sorted_token_ids.device.type == "meta" and meta.tiles.device.type == "meta"
    assert meta.active_slots == (0, 1) and meta.segment_counts == (1, 2)
