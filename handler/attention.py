"""Attention over the paged KV cache, in plain torch (scaled_dot_product_attention).

The cache of one layer is `[kv_heads, num_blocks, block_size, head_dim]` for K and for V. Prefills attend
to their own fresh K/V (a prefill always starts at position 0: a preempted sequence is recomputed whole),
decodes gather their blocks from the cache. Head-major blocks make that gather one `index_select` whose
result is already laid out `[B, kv_heads, L, d]` with each head's keys contiguous, which the attention
kernel reads without another copy (measured 1.6x faster per layer than token-major blocks on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handler.forward_context import DecodeGroup, ForwardContext


def paged_attention(
    q: torch.Tensor,  # [T, q_heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
    v_cache: torch.Tensor,
    ctx: ForwardContext,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:  # [T, q_heads, head_dim]
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(kv_heads, -1, head_dim).index_copy_(1, ctx.slot_mapping, k.transpose(0, 1))
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, ctx.slot_mapping, v.transpose(0, 1))
    if not ctx.prefill_ranges:
        return _decode_attention(q, k_cache, v_cache, ctx, sliding_window, scale)
    out = torch.empty_like(q)
    num_decode = ctx.num_decode_tokens
    if num_decode:
        out[:num_decode] = _decode_attention(q[:num_decode], k_cache, v_cache, ctx, sliding_window, scale)
    for start, end in ctx.prefill_ranges:
        out[start:end] = _prefill_attention(q[start:end], k[start:end], v[start:end], sliding_window, scale)
    return out


def _prefill_attention(q, k, v, sliding_window: int | None, scale: float) -> torch.Tensor:
    length = q.shape[0]
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, L, d]
    gqa = q.shape[1] != k.shape[1]
    if sliding_window is None or sliding_window >= length:
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        query_pos = torch.arange(length, device=q.device)[:, None]
        key_pos = torch.arange(length, device=q.device)[None, :]
        mask = (key_pos <= query_pos) & (key_pos > query_pos - sliding_window)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)


def _decode_attention(q, k_cache, v_cache, ctx: ForwardContext, sliding_window: int | None, scale: float):
    groups = ctx.decode_groups
    if len(groups) == 1 and groups[0].rows is None:
        return _attend_group(q, k_cache, v_cache, groups[0], sliding_window, scale)
    out = torch.empty_like(q)
    for group in groups:
        group_q = q.index_select(0, group.rows)
        out.index_copy_(0, group.rows, _attend_group(group_q, k_cache, v_cache, group, sliding_window, scale))
    return out


def _attend_group(q, k_cache, v_cache, group: DecodeGroup, sliding_window: int | None, scale: float):
    batch, q_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    block_ids = group.block_tables.flatten()
    padded_len = group.block_tables.shape[1] * block_size
    longest = group.longest
    # [kv_heads, B * max_blocks, block_size, d] -> [B, kv_heads, longest, d] without moving data again.
    keys = k_cache.index_select(1, block_ids).view(kv_heads, batch, padded_len, head_dim)[:, :, :longest]
    values = v_cache.index_select(1, block_ids).view(kv_heads, batch, padded_len, head_dim)[:, :, :longest]
    mask = _decode_mask(group, sliding_window)
    # Grouped-query attention without repeating K/V: the query heads that share a KV head become that
    # head's "query length" (head h uses KV head h // group, as in the reference implementation).
    grouped_q = q.view(batch, kv_heads, q_heads // kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped_q, keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.reshape(batch, q_heads, head_dim)


def _decode_mask(group: DecodeGroup, sliding_window: int | None) -> torch.Tensor | None:
    """[b, 1, 1, longest] keys each decode may see; None when all see everything (the kernel's fast path)."""
    longest = group.longest
    window_cuts = sliding_window is not None and sliding_window < longest
    if group.shortest == longest and not window_cuts:
        return None
    mask = group.masks.get(sliding_window)
    if mask is None:
        key_pos = torch.arange(longest, device=group.context_lens.device)[None, :]
        lengths = group.context_lens[:, None]
        mask = key_pos < lengths
        if sliding_window is not None:
            mask &= key_pos > (lengths - 1) - sliding_window
        mask = mask[:, None, None, :]
        group.masks[sliding_window] = mask
    return mask
