"""Decodes of very different context lengths are attended in groups, with outputs still exact."""

from __future__ import annotations

import random

import pytest

from handler import Engine, SamplingParams
from handler.decode_groups import MAX_GROUPS, plan_decode_groups
from tests.models import reference_greedy


def test_uniform_lengths_stay_one_group():
    assert plan_decode_groups([5] * 12) == [list(range(12))]
    assert plan_decode_groups([]) == []


def test_two_length_clusters_are_split_and_every_row_kept_once():
    counts = [1, 20] * 16
    groups = plan_decode_groups(counts)
    assert len(groups) == 2
    assert {counts[row] for row in groups[0]} == {1} and {counts[row] for row in groups[1]} == {20}
    assert sorted(row for group in groups for row in group) == list(range(len(counts)))


def test_many_lengths_get_at_most_max_groups_sorted_by_length():
    rng = random.Random(0)
    counts = [rng.randint(1, 300) for _ in range(200)]
    groups = plan_decode_groups(counts)
    assert 1 < len(groups) <= MAX_GROUPS
    assert sorted(row for group in groups for row in group) == list(range(len(counts)))
    for shorter, longer in zip(groups, groups[1:]):
        assert max(counts[row] for row in shorter) <= min(counts[row] for row in longer)


def test_a_split_that_saves_less_than_its_cost_is_not_made():
    # One long row among short ones saves 1 block per short row: 3 rows do not pay for a group, and the
    # one group keeps the rows in their given order.
    assert plan_decode_groups([3, 1, 1, 1]) == [[0, 1, 2, 3]]


@pytest.mark.parametrize("family", ["llama", "mistral"])  # mistral: a sliding window of 12 inside groups
def test_grouped_decode_attention_matches_transformers(tiny_models, family):
    model_dir = tiny_models.get(family, family)
    engine = Engine(model_dir, dtype="float32", max_rolling_batch_size=16, block_size=4)
    group_counts = []
    plan = engine.runner._decode_groups

    def spy(tables, lengths):
        groups = plan(tables, lengths)
        group_counts.append(len(groups))
        return groups

    engine.runner._decode_groups = spy
    rng = random.Random(7)
    short = [[0] + [rng.randrange(3, 1024) for _ in range(rng.randint(2, 6))] for _ in range(8)]
    long = [[0] + [rng.randrange(3, 1024) for _ in range(rng.randint(60, 80))] for _ in range(8)]
    prompts = [prompt for pair in zip(short, long) for prompt in pair]
    results = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    assert max(group_counts) > 1, "the test should exercise more than one decode group"
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(model_dir, prompt, 12)
