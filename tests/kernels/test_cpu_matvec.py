"""The C matrix-vector kernel (lora_serving/kernels/cpu_matvec.c) against the fp64 product, read from oneDNN's
packed weight."""

import pytest
import torch

from lora_serving.handler.models.projection import ONEDNN_MAX_ROWS, Projection, onednn_usable_for
from lora_serving.kernels import cpu_matvec
from lora_serving.kernels.cpu_native import library as cpu_native_library


def packed_projection(weight, bias=None) -> Projection:
    if not onednn_usable_for(weight):
        pytest.skip("this torch build has no usable oneDNN prepacked linear")
    projection = Projection(weight, bias)
    if projection.matvec_rows == 0:
        pytest.skip("the C kernels do not build here, or oneDNN packs in a layout the kernel does not read")
    return projection


def reference(x, weight, bias):
    out = x.double() @ weight.double().T
    return (out if bias is None else out + bias.double()).float()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Rows the kernel multiplied, call by call."""
    calls = []
    inner = cpu_matvec.PackedMatvec.__call__

    def spy(self, x):
        calls.append(x.shape[0])
        return inner(self, x)

    monkeypatch.setattr(cpu_matvec.PackedMatvec, "__call__", spy)
    return calls


# 300 rows leave the last block of 64 partly padded; 64 x 2048 is one block; 2752 x 512 is an MLP's gate/up.
@pytest.mark.parametrize("out_features,in_features", [(512, 256), (300, 512), (64, 2048), (2752, 512)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_one_to_max_rows_equal_the_product(out_features, in_features, with_bias, kernel_calls):
    generator = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    projection = packed_projection(weight, bias)
    for rows in range(1, projection.matvec_rows + 1):
        x = torch.randn(rows, in_features, generator=generator)
        out = projection(x)
        assert out.shape == (rows, out_features) and out.is_contiguous()
        torch.testing.assert_close(out, reference(x, weight, bias), rtol=1e-5, atol=1e-4)
    assert kernel_calls == list(range(1, projection.matvec_rows + 1))


def test_rows_of_a_wider_tensor_are_read_in_place(kernel_calls):
    weight, wide = torch.randn(512, 256), torch.randn(3, 400)
    x = wide[:, 100:356]  # a row stride of 400, unit column stride
    torch.testing.assert_close(packed_projection(weight)(x), reference(x, weight, None), rtol=1e-5, atol=1e-4)
    assert kernel_calls == [3]


def test_more_rows_go_to_onednn(kernel_calls):
    weight = torch.randn(512, 256)
    projection = packed_projection(weight)
    for rows in (projection.matvec_rows + 1, ONEDNN_MAX_ROWS, 100):
        x = torch.randn(rows, 256)
        torch.testing.assert_close(projection(x), reference(x, weight, None), rtol=1e-4, atol=1e-3)
    assert kernel_calls == []


def test_the_layout_is_accepted_only_when_the_packed_bytes_hold_the_weight():
    weight = torch.randn(512, 256)
    projection = packed_projection(weight)
    assert cpu_matvec.packed_block_rows(weight, projection._packed) in cpu_matvec.BLOCK_ROWS
    other = weight.clone()
    other[300, 17] += 1.0  # one element differs: the kernel would read a different matrix
    assert cpu_matvec.packed_block_rows(other, projection._packed) is None
    assert cpu_matvec.packed_block_rows(weight, weight) is None  # a plain tensor is not a oneDNN one


def test_the_switch_keeps_onednn(monkeypatch, kernel_calls):
    weight, x = torch.randn(512, 256), torch.randn(1, 256)
    packed_projection(weight)  # skips where the kernel would not serve anyway
    monkeypatch.setenv("LORA_SERVING_CPU_MATVEC", "off")
    projection = Projection(weight)
    assert projection.backend == "onednn" and projection.matvec_rows == 0
    torch.testing.assert_close(projection(x), reference(x, weight, None), rtol=1e-4, atol=1e-3)
    assert kernel_calls == []


# bf16: the kernel's bf16 form reads oneDNN's pair-interleaved packing (where the CPU multiplies bf16 natively).
# 960x576 and 3072x576 are SmolLM2's q/k/v and gate/up; 300x513 pads the last block of 32 rows and an odd input
# width (oneDNN pads it to 544); 64x2304 is one block.
BF16_SHAPES = [(960, 576), (300, 513), (64, 2304), (3072, 576)]


def bf16_weight(out_features, in_features, generator):
    return (torch.randn(out_features, in_features, generator=generator) * 0.05).to(torch.bfloat16)


def assert_bf16_product(out, x, weight, bias):
    """out is the exact product (fp64) rounded once to bf16: within half a bf16 step (at most 2^-8 of it) plus what fp32
    sums lose against the magnitudes summed."""
    assert out.dtype == torch.bfloat16
    exact = x.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    magnitudes = x.double().abs() @ weight.double().abs().T
    error = (out.double() - exact).abs()
    assert (error <= exact.abs() * 2**-8 + magnitudes * 1e-5).all(), (error - exact.abs() * 2**-8).max()


@pytest.fixture(params=[True, False], ids=["tiles", "dot-products"])
def allow_tiles(request, monkeypatch):
    """Both routes of the bf16 form (the flag only matters on a CPU with AMX; elsewhere both are the second)."""
    monkeypatch.setattr(cpu_matvec.PackedMatvec, "allow_tiles", request.param)
    return request.param


@pytest.mark.parametrize("out_features,in_features", BF16_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_one_to_max_rows_equal_the_product_rounded_once(out_features, in_features, with_bias, allow_tiles,
                                                               kernel_calls):
    generator = torch.Generator().manual_seed(out_features * 7 + in_features)
    weight = bf16_weight(out_features, in_features, generator)
    bias = torch.randn(out_features, generator=generator).to(torch.bfloat16) if with_bias else None
    projection = packed_projection(weight, bias)
    assert projection._matvec.dtype == torch.bfloat16
    for rows in range(1, projection.matvec_rows + 1):
        x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
        out = projection(x)
        assert out.shape == (rows, out_features) and out.is_contiguous()
        assert_bf16_product(out, x, weight, bias)
    assert kernel_calls == list(range(1, projection.matvec_rows + 1))


def test_bf16_rows_of_a_wider_tensor_are_read_in_place(allow_tiles, kernel_calls):
    generator = torch.Generator().manual_seed(3)
    weight = bf16_weight(300, 513, generator)
    wide = torch.randn(40, 700, generator=generator).to(torch.bfloat16)
    projection = packed_projection(weight)
    # Past 16 rows (where tiles take them) the kernel multiplies x in chunks of 16 rows, each read in place.
    row_counts = [rows for rows in (1, 4, 17, 40) if rows <= projection.matvec_rows]
    for rows in row_counts:
        x = wide[:rows, 101:614]  # a row stride of 700 and an odd start: pairs of x are not 4-byte aligned
        assert_bf16_product(projection(x), x, weight, None)
    assert kernel_calls == row_counts


def test_bf16_tiles_take_up_to_64_rows_where_the_cpu_has_them(allow_tiles):
    """AMX multiplies 16 rows as cheaply as one: with tiles a whole decode batch goes to the kernel (oneDNN's
    inner product read the weight 1.2-1.4x slower at 32 rows); the dot-product form pays per row and keeps 4."""
    weight = bf16_weight(960, 576, torch.Generator().manual_seed(4))
    matvec = packed_projection(weight)._matvec
    tiles_here = cpu_native_library().matvec_bf16_tile_rows(576) > 0
    assert matvec.max_rows == (64 if allow_tiles and tiles_here else 4)


def test_bf16_layout_is_accepted_only_when_the_packed_bytes_hold_the_weight():
    weight = bf16_weight(300, 513, torch.Generator().manual_seed(9))
    projection = packed_projection(weight)
    block, padded_in = cpu_matvec.packed_pair_layout(weight, projection._packed)
    assert block in cpu_matvec.BF16_BLOCK_ROWS and padded_in % 2 == 0 and padded_in >= 513
    other = weight.clone()
    other[299, 512] = 1.0  # the last row's last input, beside the padding
    assert cpu_matvec.packed_pair_layout(other, projection._packed) is None
    assert cpu_matvec.packed_pair_layout(weight, weight) is None
    # oneDNN's fp32 packing of the same values is not read as bf16 pairs.
    assert cpu_matvec.packed_pair_layout(weight, Projection(weight.float())._packed) is None


def test_bf16_input_of_another_dtype_or_too_many_rows_is_refused_and_no_rows_give_none():
    weight = bf16_weight(960, 576, torch.Generator().manual_seed(1))
    matvec = packed_projection(weight)._matvec
    with pytest.raises(ValueError, match="float32"):
        matvec(torch.randn(1, 576))
    with pytest.raises(ValueError, match=f"up to {matvec.max_rows} rows"):
        matvec(torch.randn(matvec.max_rows + 1, 576).to(torch.bfloat16))
    assert matvec(torch.empty(0, 576, dtype=torch.bfloat16)).shape == (0, 960)


def test_the_switch_keeps_onednn_for_bf16(monkeypatch, kernel_calls):
    weight = bf16_weight(960, 576, torch.Generator().manual_seed(2))
    packed_projection(weight)
    monkeypatch.setenv("LORA_SERVING_CPU_MATVEC", "off")
    projection = Projection(weight)
    assert projection.backend == "onednn" and projection.matvec_rows == 0
    x = torch.randn(2, 576).to(torch.bfloat16)
    assert_bf16_product(projection(x), x, weight, None)
    assert kernel_calls == []
