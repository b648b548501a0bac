"""Sampled rows draw together (by inverse transform over their stacked rows): each still draws from its own
warped distribution, zero-probability tokens never, a seeded row as it would alone, and extreme parameters
still fall back to the greedy choice."""

from __future__ import annotations

import torch

from lora_serving.handler.sampler import Sampler
from lora_serving.handler.sequence import SamplingParams, Sequence

# Five tokens with probabilities 0.1, 0.2, 0, 0.3, 0.4.
PROBABILITIES = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4])
LOGITS = PROBABILITIES.log()


def sequences(count: int, **params) -> list[Sequence]:
    return [Sequence(f"r{index}", [1, 2], SamplingParams(max_new_tokens=4, do_sample=True, **params))
            for index in range(count)]


def test_unseeded_rows_draw_each_from_its_own_distribution():
    sampler = Sampler(torch.device("cpu"))
    rows = 4000
    # Every other row's top_k=1 leaves it only token 4: its draw is its own row's, not a neighbour's.
    seqs = [seq for pair in zip(sequences(rows // 2), sequences(rows // 2, top_k=1)) for seq in pair]
    chosen = torch.tensor(sampler.sample(LOGITS.repeat(rows, 1), seqs).token_ids)
    assert (chosen[1::2] == 4).all()
    frequencies = torch.bincount(chosen[0::2], minlength=5).float() / (rows // 2)
    # 2000 draws: a frequency's standard deviation is at most 0.011; 0.05 is more than four of them.
    assert torch.allclose(frequencies, PROBABILITIES, atol=0.05)
    assert frequencies[2] == 0


def test_unseeded_rows_with_extreme_parameters_take_the_greedy_choice():
    sampler = Sampler(torch.device("cpu"))
    seqs = sequences(3, temperature=1e-300) + sequences(1)
    chosen = sampler.sample(LOGITS.repeat(4, 1), seqs).token_ids
    assert chosen[:3] == [4, 4, 4]
    assert chosen[3] in (0, 1, 3, 4)


def test_seeded_rows_keep_their_own_draws_beside_unseeded_ones():
    seeded = sequences(1, seed=7)
    alone = Sampler(torch.device("cpu")).sample(torch.randn(1, 50, generator=torch.Generator().manual_seed(1)),
                                               seeded).token_ids
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2))
    logits[2] = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    mixed = sequences(2) + sequences(1, seed=7) + sequences(2)
    assert Sampler(torch.device("cpu")).sample(logits, mixed).token_ids[2] == alone[0]
