"""The C decode attention kernel (lora_serving/kernels/cpu_attention.c) against softmax(q K^T * scale) V written
out in fp64."""

import random

import pytest
import torch

from lora_serving.kernels import cpu_attention, cpu_native

if not cpu_attention.serves(torch.float32, "cpu"):
    pytest.skip("the C kernels do not build here", allow_module_level=True)

BLOCK_SIZE = 4


def reference(q_row, keys, values, scale):
    """q_row [q_heads, d], keys/values [kv_heads, L, d] -> [q_heads, d]; query head h reads KV head h // group."""
    group = q_row.shape[0] // keys.shape[0]
    out = torch.empty(q_row.shape, dtype=torch.float64)
    for head in range(q_row.shape[0]):
        k, v = keys[head // group].double(), values[head // group].double()
        out[head] = torch.softmax((k @ q_row[head].double()) * scale, dim=0) @ v
    return out.float()


def attend(kv_heads, group, head_dim, window, threads, dtype, *, block_size=BLOCK_SIZE, lengths=(1, 4, 5, 17, 33, 60),
           library=None, offset=0.0, scale=None, garbage=1e4):
    """Runs the kernel on sequences of `lengths` keys in shuffled blocks and returns (out, [(expected, row)])."""
    rng = random.Random(kv_heads * 100 + group * 10 + head_dim)
    gen = torch.Generator().manual_seed(head_dim)
    num_blocks = sum(-(-length // block_size) for length in lengths) + 2
    # Garbage everywhere a sequence does not own: a read past its length or table would show.
    k_cache = torch.full((kv_heads, num_blocks, block_size, head_dim), garbage, dtype=dtype)
    v_cache = torch.full_like(k_cache, -garbage)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, history = [], []
    for length in lengths:
        table = [free.pop() for _ in range(-(-length // block_size))]
        keys = (torch.randn(kv_heads, length, head_dim, generator=gen) + offset).to(dtype)
        values = torch.randn(kv_heads, length, head_dim, generator=gen).to(dtype)
        for position in range(length):
            k_cache[:, table[position // block_size], position % block_size] = keys[:, position]
            v_cache[:, table[position // block_size], position % block_size] = values[:, position]
        tables.append(table)
        history.append((keys, values))
    width = max(map(len, tables))
    block_tables = torch.tensor([table + [0] * (width - len(table)) for table in tables])
    # q as the engine has it: the query heads of rows that also hold the key heads (a strided view).
    q_and_k = (torch.randn(len(lengths), kv_heads * group + kv_heads, head_dim, generator=gen) + offset).to(dtype)
    q = q_and_k[:, : kv_heads * group]
    starts = None if window is None else torch.tensor([max(0, n - window) for n in lengths])
    scale = head_dim**-0.5 if scale is None else scale
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_attention.decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(lengths), starts, scale,
                                             library=library)
    finally:
        torch.set_num_threads(saved_threads)
    assert out.dtype == dtype
    expected = []
    for row, ((keys, values), length) in enumerate(zip(history, lengths)):
        first = 0 if window is None else max(0, length - window)
        expected.append(reference(q[row], keys[:, first:], values[:, first:], scale))
    return out, expected


def assert_matches(out, expected, dtype, tolerance=1e-5):
    for row, want in enumerate(expected):
        if dtype == torch.float32:
            torch.testing.assert_close(out[row], want, rtol=tolerance, atol=tolerance)
        else:  # the exact result of the bf16 inputs, rounded once to bf16 (8 bits): within half a unit of it
            torch.testing.assert_close(out[row].float(), want, rtol=2**-8, atol=1e-5)


# head_dim 20: a vector of 8 twice and a tail of 4; group 4: four query heads read each KV head once (the kernel
# takes queries three at a time with 16 lanes: groups 1 to 7 cover its forms). Blocks of 4 are smaller than a tile
# of keys: every tile is gathered across blocks.
@pytest.mark.parametrize("kv_heads,group,head_dim", [(2, 1, 64), (2, 4, 20), (1, 3, 128), (2, 2, 48), (1, 7, 64)])
@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scattered_blocks_grouped_heads_and_windows(kv_heads, group, head_dim, window, threads, dtype):
    assert_matches(*attend(kv_heads, group, head_dim, window, threads, dtype), dtype)


# Blocks of 16 and 32 hold whole tiles, which fp32 reads in place when head_dim is a multiple of the vector
# (64, 80, 96 with 16 lanes; 72 is not: 4 vectors and 8 over); a window of 40 starts tiles mid-block.
@pytest.mark.parametrize("head_dim", [64, 72, 80, 96])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_in_place_and_gathered(head_dim, block_size, window, dtype):
    out, expected = attend(3, 3, head_dim, window, 2, dtype, block_size=block_size, lengths=(1, 15, 16, 17, 47, 130))
    assert_matches(out, expected, dtype)


# Whole tiles read in place for each form of the dots (query heads taken three at a time: 1, 2, 3 and 3 + 1).
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_in_place_for_every_group_size(group, dtype):
    out, expected = attend(2, group, 64, None, 1, dtype, block_size=16, lengths=(16, 40, 130))
    assert_matches(out, expected, dtype)


@pytest.fixture(params=["tiles", "vectors"])
def bf16_route(request):
    """Both routes of the bf16 form on a CPU with AMX (elsewhere "tiles" is skipped: vectors serve both)."""
    saved = cpu_attention.allow_tiles
    cpu_attention.allow_tiles = request.param == "tiles"
    if request.param == "tiles" and not cpu_attention.tiles_serve(64, 1):
        pytest.skip("no AMX tiles here (CPU, build or OS)")
    yield request.param
    cpu_attention.allow_tiles = saved


# The tile route: the output rows of a group are the rows of tiles (groups 1 to 8), head_dims of 2 to 4 column
# tiles of 16 and one of 64 + 32 columns (96), blocks of 16 and 32 read in place and of 8 gathered (a tile spans
# blocks), windows that start a tile mid-block (9, 40), sequences of 1 key to several blocks (the ragged last tile).
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32), (96, 8), (32, 16)])
@pytest.mark.parametrize("window", [None, 9, 40])
def test_bf16_routes_match_the_reference(bf16_route, group, head_dim, block_size, window):
    out, expected = attend(2, group, head_dim, window, 2, torch.bfloat16, block_size=block_size,
                           lengths=(1, 2, 16, 31, 33, 70))
    assert_matches(out, expected, torch.bfloat16)


def test_tiles_serve_only_shapes_they_hold():
    if not cpu_attention.tiles_serve(64, 3):
        pytest.skip("no AMX tiles here (CPU, build or OS)")
    assert cpu_attention.tiles_serve(128, 8)
    assert not cpu_attention.tiles_serve(48, 3)  # not whole runs of 32 dims: the vector route
    assert not cpu_attention.tiles_serve(64, 9)  # 2 x 9 rows of weights exceed a tile's 16


def test_tile_route_is_the_one_taken():
    """The routes sum in different orders: where tiles serve, their bits differ from the vector route's somewhere
    (an allow_tiles that changed nothing would give the same bits)."""
    if not cpu_attention.tiles_serve(64, 3):
        pytest.skip("no AMX tiles here (CPU, build or OS)")
    outs = {}
    saved = cpu_attention.allow_tiles
    try:
        for allow in (True, False):
            cpu_attention.allow_tiles = allow
            outs[allow] = attend(3, 3, 64, None, 1, torch.bfloat16, block_size=16, lengths=(40, 130))[0]
    finally:
        cpu_attention.allow_tiles = saved
    assert not torch.equal(outs[True], outs[False])


# NaN where no sequence has keys: the tile route reads whole tiles of a block in place, past a sequence's last key
# and before a window's first; their scores must be dropped and their value rows never multiplied (0 x NaN).
@pytest.mark.parametrize("window", [None, 40])
def test_bf16_routes_ignore_nan_outside_the_sequences(bf16_route, window):
    out, expected = attend(2, 3, 64, window, 2, torch.bfloat16, block_size=16, lengths=(1, 17, 47, 130),
                           garbage=float("nan"))
    assert_matches(out, expected, torch.bfloat16)


@pytest.mark.parametrize("head_dim", [64, 48])  # 48: no tiles (not whole runs of 32 dims), the vector route
def test_bf16_routes_at_batch_one_and_one_key(bf16_route, head_dim):
    for lengths in ((1,), (16,), (300,)):
        out, expected = attend(3, 3, head_dim, None, 2, torch.bfloat16, block_size=16, lengths=lengths)
        assert_matches(out, expected, torch.bfloat16)


def test_scores_far_above_and_below_each_other():
    """Scores near +100 overflow exp without the max subtracted, and the smaller ones (50 or more below the top)
    underflow to nothing: the weights still sum to one. fp32 scores of 100 carry a rounding of about 1e-5, which
    the weights inherit."""
    out, expected = attend(1, 3, 64, None, 1, torch.float32, lengths=(1, 33, 130), offset=1.25, scale=1.0)
    assert_matches(out, expected, torch.float32, tolerance=2e-4)


def test_vector_exp_matches_expf():
    x = torch.cat([torch.linspace(-120.0, 88.0, 200_003), torch.tensor([0.0, -0.0, 1e-30, -1e-30, -87.33, -103.9])])
    got = cpu_attention.vector_exp(x)
    want = torch.exp(x.double()).float()  # e^x rounded once to fp32, as a correctly rounded expf would give
    normal = want >= torch.finfo(torch.float32).tiny
    ulps = (got[normal].view(torch.int32) - want[normal].view(torch.int32)).abs()
    assert ulps.max().item() <= 2
    # Below 2^-126 (denormals, then zero from x = -104 on) the results are within a denormal step or two.
    assert (got[~normal] - want[~normal]).abs().max().item() <= 2 * 2.0**-149
    assert got[x < -104].eq(0).all()
    special = cpu_attention.vector_exp(torch.tensor([float("-inf"), float("nan"), -1e30]))
    assert special[0] == 0 and special[1].isnan() and special[2] == 0


# The forms of the kernel that other CPUs get: AVX2 only (vectors of 8) and no -march at all (SSE2 on x86-64).
PORTABLE_FLAGS = {
    "avx2": ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"),
    "no-march": ("-O3", "-fopenmp", "-shared", "-fPIC"),
}


@pytest.mark.parametrize("form", sorted(PORTABLE_FLAGS))
def test_portable_builds_match_the_reference(form):
    if form == "avx2" and not {"avx2", "fma"} <= cpu_native.cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    library = cpu_native.library_built_with(PORTABLE_FLAGS[form])
    assert library.attention_vector_lanes() == 8
    for dtype in (torch.float32, torch.bfloat16):
        out, expected = attend(3, 3, 72, 40, 2, dtype, block_size=16, lengths=(1, 17, 130), library=library)
        assert_matches(out, expected, dtype)
        out, expected = attend(2, 2, 64, None, 1, dtype, block_size=8, lengths=(5, 64), library=library)
        assert_matches(out, expected, dtype)
    x = torch.linspace(-90.0, 0.0, 10_001)
    ulps = (cpu_attention.vector_exp(x, library=library).view(torch.int32) - torch.exp(x.double()).float().view(
        torch.int32)).abs()
    assert ulps.max().item() <= 2


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
