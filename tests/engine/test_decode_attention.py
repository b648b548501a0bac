"""Decode attention straight from the paged cache, against an fp32 softmax written out by hand.

A sequence whose blocks are consecutive is read in place, any other is gathered: both must give the
reference's answer, with grouped-query heads and with a sliding window.
"""

from __future__ import annotations

import pytest
import torch

from handler.attention import paged_attention
from handler.forward_context import DecodeKV, ForwardContext

KV_HEADS, Q_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 4, 8, 4, 12


def reference(q, keys, values, scale, window):
    """q [q_heads, d], keys/values [L, kv_heads, d] -> [q_heads, d]; head h reads KV head h // group."""
    length = keys.shape[0]
    start = 0 if window is None else max(0, length - window)
    group = Q_HEADS // KV_HEADS
    out = torch.empty_like(q)
    for head in range(Q_HEADS):
        k = keys[start:, head // group]
        v = values[start:, head // group]
        weights = torch.softmax((k @ q[head]) * scale, dim=0)
        out[head] = weights @ v
    return out


def decode_kv(table: list[int], length: int) -> DecodeKV:
    if table == list(range(table[0], table[0] + len(table))):
        return DecodeKV(length=length, first_block=table[0], block_ids=None)
    return DecodeKV(length=length, first_block=None, block_ids=torch.tensor(table))


@pytest.mark.parametrize("window", [None, 5])
def test_in_place_and_gathered_sequences_match_the_reference(window):
    gen = torch.Generator().manual_seed(0)
    # Three decoding sequences: consecutive blocks, scattered blocks, and one that ends mid-block.
    layouts = [([2, 3, 4], 10), ([9, 0, 6], 12), ([7, 11], 5)]
    k_cache = torch.zeros(KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    history, new_k, new_v, slots = [], [], [], []
    for table, length in layouts:
        keys = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
        values = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
        for position in range(length - 1):  # the cache holds all but the token being decoded
            block, offset = table[position // BLOCK_SIZE], position % BLOCK_SIZE
            k_cache[:, block, offset] = keys[position]
            v_cache[:, block, offset] = values[position]
        last = length - 1
        slots.append(table[last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE)
        new_k.append(keys[last])
        new_v.append(values[last])
        history.append((keys, values))
    # Garbage in every unused slot: a read past a sequence's length would show.
    k_cache[k_cache == 0] = 1e3
    v_cache[v_cache == 0] = -1e3
    q = torch.randn(len(layouts), Q_HEADS, HEAD_DIM, generator=gen)
    ctx = ForwardContext(
        positions=torch.tensor([length - 1 for _, length in layouts]),
        slot_mapping=torch.tensor(slots),
        num_decode_tokens=len(layouts),
        decode_kv=[decode_kv(table, length) for table, length in layouts],
        prefill_ranges=[],
    )
    assert [kv.first_block for kv in ctx.decode_kv] == [2, None, None]
    scale = HEAD_DIM**-0.5
    out = paged_attention(q, torch.stack(new_k), torch.stack(new_v), k_cache, v_cache, ctx, window, scale)
    for row, (keys, values) in enumerate(history):
        torch.testing.assert_close(out[row], reference(q[row], keys, values, scale, window), rtol=1e-5, atol=1e-5)
