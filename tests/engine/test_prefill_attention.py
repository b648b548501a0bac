"""Prefill attention after cached tokens (a prefix-cache hit, an earlier chunk), against the fp32 softmax
written out by hand: each new query sees the cached keys and the new ones up to itself (the last
`window` of them), whether the sequence's blocks are consecutive or scattered."""

from __future__ import annotations

import pytest
import torch

from lora_serving.handler.attention import paged_attention
from lora_serving.handler.forward_context import ForwardContext, PrefillSpan
from tests.engine.test_decode_attention import BLOCK_SIZE, HEAD_DIM, KV_HEADS, NUM_BLOCKS, Q_HEADS, decode_kv, reference


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("table", [[3, 4, 5, 6], [8, 1, 10, 2]], ids=["consecutive", "scattered"])
@pytest.mark.parametrize("context", [4, 9])  # after whole blocks (a cache hit), mid-block (a chunk)
def test_new_tokens_attend_to_the_cached_ones_and_to_each_other(window, table, context):
    gen = torch.Generator().manual_seed(context)
    length = 14
    keys = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
    values = torch.randn(length, KV_HEADS, HEAD_DIM, generator=gen)
    k_cache = torch.full((KV_HEADS, NUM_BLOCKS, BLOCK_SIZE, HEAD_DIM), 1e3)  # garbage wherever nothing is
    v_cache = torch.full_like(k_cache, -1e3)
    slots = [table[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE for position in range(length)]
    for position in range(context):
        k_cache.view(KV_HEADS, -1, HEAD_DIM)[:, slots[position]] = keys[position]
        v_cache.view(KV_HEADS, -1, HEAD_DIM)[:, slots[position]] = values[position]
    new = length - context
    q = torch.randn(new, Q_HEADS, HEAD_DIM, generator=gen)
    ctx = ForwardContext(positions=torch.arange(context, length), slot_mapping=torch.tensor(slots[context:]),
                         num_decode_tokens=0, decode_kv=[],
                         prefills=[PrefillSpan(0, new, context, decode_kv(table, length))])
    scale = HEAD_DIM**-0.5
    out = paged_attention(q, keys[context:], values[context:], k_cache, v_cache, ctx, window, scale)
    for row in range(new):
        position = context + row
        expected = reference(q[row], keys[: position + 1], values[: position + 1], scale, window)
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
