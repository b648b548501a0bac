"""Decode attention on CPU by a C kernel (kernels/cpu_attention.c) that reads each sequence's K/V in place through
its block table: every decoding sequence and head of a layer in one call, fp32 or bf16 (read as fp32: scores and
sums are fp32 in both). bf16 on a CPU with AMX goes by tile multiplies (cpu_attention_amx.h), with the softmax
weights kept to ~16 bits as two bf16 parts; `allow_tiles` False takes the vector route there too.

handler/attention.py takes it for the decodes of a step when `serves(dtype, device)`; otherwise (other dtypes,
GPUs, no C compiler, or $LORA_SERVING_CPU_ATTENTION=off, which benchmarks use to compare) torch's
scaled_dot_product_attention serves, per sequence or over a padded gather.
"""

from __future__ import annotations

import ctypes

import torch

from . import cpu_native

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# bf16: AMX tile multiplies where the CPU and OS allow them and the shape suits them (tiles_serve), else vectors.
# False takes the vector route even there; tests check both on such a CPU, benchmarks compare them.
allow_tiles = True


def serves(dtype: torch.dtype, device: torch.device | str) -> bool:
    if torch.device(device).type != "cpu" or dtype not in KERNEL_DTYPES:
        return False
    return cpu_native.available_unless("LORA_SERVING_CPU_ATTENTION")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     lengths: torch.Tensor, starts: torch.Tensor | None, scale: float, *, library=None) -> torch.Tensor:
    """q [B, q_heads, d] (unit stride along d), one query per sequence; caches [kv_heads, blocks, block_size, d];
    block_tables [B, width] and lengths [B] (keys each attends to, its own included), starts [B] (first key, for a
    sliding window) or None, all int64 -> out [B, q_heads, d]. `library`: another build of the kernels
    (cpu_native.library_built_with; tests), else the engine's."""
    batch, q_heads, head_dim = q.shape
    kv_heads, num_blocks, block_size, _ = k_cache.shape
    if q.stride(2) != 1:
        q = q.contiguous()
    # The kernel reads these through raw pointers: the layout and element types it assumes are checked here.
    if not q.dtype == k_cache.dtype == v_cache.dtype or q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q and the caches must be all float32 or all bfloat16, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    indices = (block_tables, lengths) if starts is None else (block_tables, lengths, starts)
    if any(index.dtype != torch.int64 for index in indices):
        raise ValueError("block_tables, lengths and starts must be int64")
    for name, tensor in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                         ("lengths", lengths)) + ((("starts", starts),) if starts is not None else ()):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype)
    library = library or cpu_native.library()
    if q.dtype == torch.float32:
        attention = library.paged_decode_attention_f32
    else:
        attention = library.paged_decode_attention_bf16 if allow_tiles else library.paged_decode_attention_bf16_vectors
    status = attention(
        _I64(batch), _PTR(q.data_ptr()), _I64(q.stride(0)), _I64(q.stride(1)), _I64(q_heads), _I64(kv_heads),
        _I64(head_dim), _PTR(k_cache.data_ptr()), _PTR(v_cache.data_ptr()), _I64(num_blocks), _I64(block_size),
        _PTR(block_tables.data_ptr()), _I64(block_tables.shape[1]), _PTR(lengths.data_ptr()),
        None if starts is None else _PTR(starts.data_ptr()), ctypes.c_float(scale), _PTR(out.data_ptr()),
        ctypes.c_int(torch.get_num_threads()))
    if status != 0:
        raise MemoryError("decode attention: no memory for the attention scores")
    return out


def tiles_serve(head_dim: int, group: int, *, library=None) -> bool:
    """Whether bf16 calls of this head_dim and query heads per KV head multiply with AMX tiles here (with
    allow_tiles): the build targets AMX-BF16, the OS grants the tile state, head_dim is a multiple of 32 and the
    group at most 8."""
    return bool((library or cpu_native.library()).attention_tiles_serve_here(head_dim, group))


def vector_exp(x: torch.Tensor, *, library=None) -> torch.Tensor:
    """The kernel's softmax exp (cpu_vec.h's exp_w) over a float32 tensor, for holding it to expf."""
    x = x.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    (library or cpu_native.library()).attention_exp_f32(_PTR(x.data_ptr()), _PTR(y.data_ptr()), _I64(x.numel()))
    return y
