"""Attention over the paged KV cache: torch's scaled_dot_product_attention, and a C kernel for CPU decodes.

The cache of one layer is `[kv_heads, num_blocks, block_size, head_dim]` for K and for V. A prefill from
position 0 attends to its own fresh K/V (the fast path: causal attention over contiguous tensors). A
prefill that starts later (after a prefix-cache hit, or a chunk after earlier chunks) reads the whole
sequence's K/V from the cache, its new ones written there first, with a causal mask aligned to the bottom
right: its query at position p sees keys 0..p (the last `sliding_window` of them, with a window).
Decodes read their cached K/V in one of three ways. On CPU with fp32 or bf16 the C kernel (kernels/cpu_attention.py)
attends all of them in one call per layer, reading each one's blocks in place through its block table (one
query row per sequence is where torch's attention costs most above its bytes). Without the kernel, on CPU
each attends on its own: head-major blocks make a sequence whose blocks are consecutive one strided view of
the cache (no copy at all), and any other sequence one `index_select` whose result is already
`[kv_heads, L, d]` with each head's keys contiguous. On GPUs, where that would be a kernel launch per
sequence and layer, and on CPU without the kernel while the result is small, all are gathered into one
padded `[B, kv_heads, L, d]` tensor (the same `index_select`) and attended in one call.

Soft-capped attention logits (Gemma 2: `cap * tanh(scores / cap)` before the mask and softmax) are not a
form torch's fused attention or the C kernel compute, so with a cap every path attends through `_attend`'s
explicit product, softmax and product, the reference implementation's order of operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora_serving.handler.forward_context import CachedKV, CompiledDecodes, ForwardContext, PaddedDecodes, PrefillSpan
from lora_serving.kernels import cpu_attention


def paged_attention(
    q: torch.Tensor,  # [T, q_heads, head_dim]
    k: torch.Tensor,  # [T, kv_heads, head_dim]
    v: torch.Tensor,  # [T, kv_heads, head_dim]
    k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
    v_cache: torch.Tensor,
    ctx: ForwardContext,
    sliding_window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:  # [T, q_heads, head_dim]
    if isinstance(ctx.decode_kv, CompiledDecodes):
        # Traced by the compiled decode step (handler/compiled_ops.py registers the op): write and attend in one
        # opaque op.
        decodes = ctx.decode_kv
        return torch.ops.lora_serving.decode_attention(q, k, v, k_cache, v_cache, ctx.slot_mapping,
                                                       decodes.block_tables, decodes.context_lens,
                                                       sliding_window or 0, scale)
    write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    if not ctx.prefills:
        return _decode_attention(q, k_cache, v_cache, ctx, sliding_window, scale, softcap)
    out = torch.empty_like(q)
    num_decode = ctx.num_decode_tokens
    if num_decode:
        out[:num_decode] = _decode_attention(q[:num_decode], k_cache, v_cache, ctx, sliding_window, scale, softcap)
    for prefill in ctx.prefills:
        start, end = prefill.start, prefill.end
        if prefill.cached is None:
            out[start:end] = _prefill_attention(q[start:end], k[start:end], v[start:end], sliding_window, scale,
                                                 softcap)
        else:
            out[start:end] = _prefill_after_context(q[start:end], k_cache, v_cache, prefill, sliding_window, scale,
                                                     softcap)
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Each token's K/V [T, kv_heads, d] into its slot of one layer's cache."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def _prefill_attention(q, k, v, sliding_window: int | None, scale: float, softcap: float | None) -> torch.Tensor:
    length = q.shape[0]
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, L, d]
    gqa = q.shape[1] != k.shape[1]
    if sliding_window is None or sliding_window >= length:
        out = _attend(q4, k4, v4, None, scale, gqa, softcap, is_causal=True)
    else:
        query_pos = torch.arange(length, device=q.device)[:, None]
        key_pos = torch.arange(length, device=q.device)[None, :]
        mask = (key_pos <= query_pos) & (key_pos > query_pos - sliding_window)
        out = _attend(q4, k4, v4, mask, scale, gqa, softcap)
    return out.squeeze(0).transpose(0, 1)


def _prefill_after_context(q, k_cache, v_cache, prefill: PrefillSpan, sliding_window: int | None,
                           scale: float, softcap: float | None) -> torch.Tensor:
    length = q.shape[0]
    context = prefill.context_len
    # The first query (at position `context`) sees the oldest key any of them sees.
    first_key = 0 if sliding_window is None else max(0, context + 1 - sliding_window)
    block_size = k_cache.shape[2]
    keys = _cached(k_cache, prefill.cached, first_key, block_size).unsqueeze(0)  # [1, kv_heads, S, d]
    values = _cached(v_cache, prefill.cached, first_key, block_size).unsqueeze(0)
    mask = prefill.masks.get(sliding_window)
    if mask is None:
        query_pos = torch.arange(context, context + length, device=q.device)[:, None]
        key_pos = torch.arange(first_key, context + length, device=q.device)[None, :]
        mask = key_pos <= query_pos
        if sliding_window is not None:
            mask &= key_pos > query_pos - sliding_window
        prefill.masks[sliding_window] = mask
    q4 = q.transpose(0, 1).unsqueeze(0)  # [1, q_heads, L, d]
    out = _attend(q4, keys, values, mask, scale, q.shape[1] != keys.shape[1], softcap)
    return out.squeeze(0).transpose(0, 1)


def _decode_attention(q, k_cache, v_cache, ctx: ForwardContext, sliding_window: int | None, scale: float,
                      softcap: float | None):
    if isinstance(ctx.decode_kv, PaddedDecodes):
        return _padded_decode_attention(q, k_cache, v_cache, ctx.decode_kv, sliding_window, scale, softcap)
    batch, q_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    # Grouped-query attention without repeating K/V: the query heads that share a KV head become that
    # head's "query length" (head h uses KV head h // group, as in the reference implementation).
    grouped_q = q.view(batch, 1, kv_heads, q_heads // kv_heads, head_dim)
    outputs = []
    for row, seq in enumerate(ctx.decode_kv):
        start = 0 if sliding_window is None else max(0, seq.length - sliding_window)
        keys = _cached(k_cache, seq, start, block_size).unsqueeze(0)
        values = _cached(v_cache, seq, start, block_size).unsqueeze(0)
        outputs.append(_attend(grouped_q[row], keys, values, None, scale, False, softcap))
    return torch.stack(outputs).view(batch, q_heads, head_dim)


def _cached(cache: torch.Tensor, seq: CachedKV, start: int, block_size: int) -> torch.Tensor:
    """[kv_heads, length - start, d]: tokens start..length-1 of one sequence, a view when possible."""
    kv_heads, num_blocks, _, head_dim = cache.shape
    if seq.first_block is not None:
        offset = seq.first_block * block_size
        return cache.view(kv_heads, num_blocks * block_size, head_dim)[:, offset + start : offset + seq.length]
    first = start // block_size
    gathered = cache.index_select(1, seq.block_ids[first:]).view(kv_heads, -1, head_dim)
    return gathered[:, start - first * block_size : seq.length - first * block_size]


def _padded_decode_attention(q, k_cache, v_cache, decodes: PaddedDecodes, sliding_window: int | None,
                             scale: float, softcap: float | None):
    if decodes.in_kernel and softcap is None:
        return cpu_attention.decode_attention(q, k_cache, v_cache, decodes.block_tables, decodes.context_lens,
                                              _kernel_starts(decodes, sliding_window), scale)
    batch, q_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    block_ids = decodes.block_tables.flatten()
    padded_len = decodes.block_tables.shape[1] * block_size
    longest = decodes.longest
    # [kv_heads, B * max_blocks, block_size, d] -> [B, kv_heads, longest, d] without moving data again.
    keys = k_cache.index_select(1, block_ids).view(kv_heads, batch, padded_len, head_dim)[:, :, :longest]
    values = v_cache.index_select(1, block_ids).view(kv_heads, batch, padded_len, head_dim)[:, :, :longest]
    grouped_q = q.view(batch, kv_heads, q_heads // kv_heads, head_dim)  # GQA as in _decode_attention
    out = _attend(grouped_q, keys.transpose(0, 1), values.transpose(0, 1),
                  _padded_decode_mask(decodes, sliding_window), scale, False, softcap)
    return out.reshape(batch, q_heads, head_dim)


def _kernel_starts(decodes: PaddedDecodes, sliding_window: int | None) -> torch.Tensor | None:
    """The first key each decode sees through `sliding_window` (None: all from the first)."""
    if sliding_window is None or sliding_window >= decodes.longest:
        return None
    starts = decodes.starts.get(sliding_window)
    if starts is None:
        starts = decodes.starts[sliding_window] = (decodes.context_lens - sliding_window).clamp_(min=0)
    return starts


def _padded_decode_mask(decodes: PaddedDecodes, sliding_window: int | None) -> torch.Tensor | None:
    """[B, 1, 1, longest] keys each decode may see; None when all see everything (the kernel's fast path)."""
    longest = decodes.longest
    window_cuts = sliding_window is not None and sliding_window < longest
    if decodes.shortest == longest and not window_cuts:
        return None
    mask = decodes.masks.get(sliding_window)
    if mask is None:
        key_pos = torch.arange(longest, device=decodes.context_lens.device)[None, :]
        lengths = decodes.context_lens[:, None]
        mask = key_pos < lengths
        if sliding_window is not None:
            mask &= key_pos > (lengths - 1) - sliding_window
        mask = mask[:, None, None, :]
        decodes.masks[sliding_window] = mask
    return mask


def _attend(q, k, v, mask: torch.Tensor | None, scale: float, gqa: bool, softcap: float | None,
            is_causal: bool = False) -> torch.Tensor:
    """softmax(q @ k.T * scale) @ v over [..., heads, L, d], a boolean mask saying which keys each query sees."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    if gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril_()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)
