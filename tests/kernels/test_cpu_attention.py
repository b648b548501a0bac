"""The C decode attention kernel (lora_serving/kernels/cpu_attention.c) against softmax(q K^T * scale) V written
out in fp64."""

import random

import pytest
import torch

from lora_serving.kernels import cpu_attention

if not cpu_attention.serves(torch.float32, "cpu"):
    pytest.skip("the C kernels do not build here", allow_module_level=True)

BLOCK_SIZE, NUM_BLOCKS = 4, 64


def reference(q_row, keys, values, scale):
    """q_row [q_heads, d], keys/values [kv_heads, L, d] -> [q_heads, d]; query head h reads KV head h // group."""
    group = q_row.shape[0] // keys.shape[0]
    out = torch.empty(q_row.shape, dtype=torch.float64)
    for head in range(q_row.shape[0]):
        k, v = keys[head // group].double(), values[head // group].double()
        out[head] = torch.softmax((k @ q_row[head].double()) * scale, dim=0) @ v
    return out.float()


# head_dim 20: a vector of 8 twice and a tail of 4; group 4: four query heads read each KV head once.
@pytest.mark.parametrize("kv_heads,group,head_dim", [(2, 1, 64), (2, 4, 20), (1, 3, 128)])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scattered_blocks_grouped_heads_and_windows(kv_heads, group, head_dim, window, threads, dtype):
    rng = random.Random(kv_heads * 100 + group * 10 + head_dim)
    gen = torch.Generator().manual_seed(head_dim)
    # Garbage everywhere a sequence does not own: a read past its length or table would show.
    k_cache = torch.full((kv_heads, NUM_BLOCKS, BLOCK_SIZE, head_dim), 1e4, dtype=dtype)
    v_cache = torch.full_like(k_cache, -1e4)
    lengths = [1, 4, 5, 17, 33, 60]
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    tables, history = [], []
    for length in lengths:
        table = [free.pop() for _ in range(-(-length // BLOCK_SIZE))]
        keys = torch.randn(kv_heads, length, head_dim, generator=gen).to(dtype)
        values = torch.randn(kv_heads, length, head_dim, generator=gen).to(dtype)
        for position in range(length):
            k_cache[:, table[position // BLOCK_SIZE], position % BLOCK_SIZE] = keys[:, position]
            v_cache[:, table[position // BLOCK_SIZE], position % BLOCK_SIZE] = values[:, position]
        tables.append(table)
        history.append((keys, values))
    width = max(map(len, tables))
    block_tables = torch.tensor([table + [0] * (width - len(table)) for table in tables])
    # q as the engine has it: the query heads of rows that also hold the key heads (a strided view).
    q_and_k = torch.randn(len(lengths), kv_heads * group + kv_heads, head_dim, generator=gen).to(dtype)
    q = q_and_k[:, : kv_heads * group]
    starts = None if window is None else torch.tensor([max(0, n - window) for n in lengths])
    scale = head_dim**-0.5
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_attention.decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(lengths), starts, scale)
    finally:
        torch.set_num_threads(saved_threads)
    for row, ((keys, values), length) in enumerate(zip(history, lengths)):
        first = 0 if window is None else max(0, length - window)
        expected = reference(q[row], keys[:, first:], values[:, first:], scale)
        assert out.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
        else:  # the exact result of the bf16 inputs, rounded once to bf16 (8 bits): within half a unit of it
            torch.testing.assert_close(out[row].float(), expected, rtol=2**-8, atol=1e-5)


def test_non_contiguous_tables_are_refused():
    k_cache = torch.zeros(1, 4, BLOCK_SIZE, 8)
    tables = torch.zeros(2, 4, dtype=torch.long)[:, ::2]
    with pytest.raises(ValueError, match="block_tables must be contiguous"):
        cpu_attention.decode_attention(torch.zeros(2, 1, 8), k_cache, k_cache, tables, torch.tensor([1, 1]), None, 1.0)


def test_index_tensors_of_another_dtype_are_refused():
    k_cache = torch.zeros(1, 4, BLOCK_SIZE, 8)
    tables = torch.zeros(2, 2, dtype=torch.int32)  # the kernel reads int64: int32 would be read as garbage
    with pytest.raises(ValueError, match="must be int64"):
        cpu_attention.decode_attention(torch.zeros(2, 1, 8), k_cache, k_cache, tables, torch.tensor([1, 1]), None, 1.0)
