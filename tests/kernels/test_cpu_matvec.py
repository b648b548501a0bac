"""The C matrix-vector kernel (lora_serving/kernels/cpu_matvec.c) against the fp64 product, read from oneDNN's
packed weight."""

import pytest
import torch

from lora_serving.handler.models.projection import ONEDNN_MAX_ROWS, Projection, onednn_usable_for
from lora_serving.kernels import cpu_matvec


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
