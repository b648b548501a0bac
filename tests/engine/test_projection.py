"""Projection(W, b)(x) is x @ W.T + b, whichever backend and operand order it picks for the row count."""

import pytest
import torch
import torch.nn.functional as F

from lora_serving.handler.cpu_dtype import native_bf16
from lora_serving.handler.models.projection import (
    ONEDNN_MAX_ROWS,
    ONEDNN_MIN_WEIGHT_ELEMENTS,
    ONEDNN_SMALL_ROWS,
    WEIGHT_MAJOR_MAX_ROWS,
    Projection,
    onednn_pieces,
    onednn_usable_for,
)


@pytest.mark.parametrize("rows", [1, 2, 17, WEIGHT_MAJOR_MAX_ROWS, WEIGHT_MAJOR_MAX_ROWS + 1, 300])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("use_onednn", [False, True])
def test_projection_equals_linear(rows, with_bias, use_onednn):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=generator)
    weight = torch.randn(512, 256, generator=generator)  # big enough for oneDNN (ONEDNN_MIN_WEIGHT_ELEMENTS)
    bias = torch.randn(512, generator=generator) if with_bias else None
    projection = Projection(weight, bias, use_onednn=use_onednn)
    if use_onednn and not onednn_usable_for(weight):
        pytest.skip("this torch build has no usable oneDNN prepacked linear")
    assert projection.backend == ("onednn" if use_onednn else "dense")
    out = projection(x)
    assert out.shape == (rows, 512)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-4, atol=1e-3)


def test_the_packed_form_replaces_the_plain_weight():
    weight = torch.randn(512, 256)
    if not onednn_usable_for(weight):
        pytest.skip("this torch build has no usable oneDNN prepacked linear")
    assert Projection(weight).weight is None


def test_small_weights_stay_plain():
    weight = torch.randn(80, 48)
    assert weight.numel() < ONEDNN_MIN_WEIGHT_ELEMENTS
    projection = Projection(weight)
    assert projection.backend == "dense" and projection.weight is weight


def test_other_dtypes_keep_the_plain_weight():
    weight = torch.randn(80, 48, dtype=torch.bfloat16)
    projection = Projection(weight)
    assert projection.backend == "dense" and projection.weight is weight
    x = torch.randn(5, 48, dtype=torch.bfloat16)
    torch.testing.assert_close(projection(x), F.linear(x, weight))


def test_onednn_never_sees_more_than_its_row_cap():
    # It keeps state per input shape for good: prefills must reach it in pieces of bounded size.
    weight, x = torch.randn(512, 256), torch.randn(300, 256)
    projection = Projection(weight)
    if projection.backend != "onednn":
        pytest.skip("this torch build has no usable oneDNN prepacked linear")
    seen = []
    inner = projection._onednn

    def spy(rows):
        seen.append(rows.shape[0])
        return inner(rows)

    projection._onednn = spy
    torch.testing.assert_close(projection(x), F.linear(x, weight), rtol=1e-4, atol=1e-3)
    assert seen == [256, 300 - 256]


def test_onednn_sees_a_bounded_set_of_row_counts():
    seen = set()
    for rows in range(1, 3 * ONEDNN_MAX_ROWS + 100):
        pieces = onednn_pieces(rows) if rows > ONEDNN_SMALL_ROWS else [rows]
        assert sum(pieces) == rows and max(pieces) <= ONEDNN_MAX_ROWS
        seen.update(pieces)
    powers = {ONEDNN_SMALL_ROWS << k for k in range((ONEDNN_MAX_ROWS // ONEDNN_SMALL_ROWS).bit_length())}
    assert seen == set(range(1, ONEDNN_SMALL_ROWS)) | powers
    assert onednn_pieces(4096 + 1000) == [4096, 512, 256, 128, 64, 40]


@pytest.mark.parametrize("rows", [1, 5, 32, 300])
def test_bf16_weights_go_to_onednn_where_the_cpu_multiplies_bf16(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(512, 256, generator=generator).to(torch.bfloat16)
    bias = torch.randn(512, generator=generator).to(torch.bfloat16)
    x = torch.randn(rows, 256, generator=generator).to(torch.bfloat16)
    projection = Projection(weight, bias)
    assert projection.backend == ("onednn" if native_bf16() and onednn_usable_for(weight) else "dense")
    out = projection(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 512) and out.is_contiguous()
    # The exact product of the bf16 operands, rounded to bf16 once (and the bias added in bf16): about two
    # units of bf16's 8 bits on sums of magnitude ~16.
    expected = F.linear(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, rtol=2**-7, atol=0.25)


def test_without_native_bf16_the_bf16_weights_stay_plain(monkeypatch):
    monkeypatch.setenv("LORA_SERVING_CPU_BF16", "off")
    native_bf16.cache_clear()
    try:
        weight = torch.randn(512, 256).to(torch.bfloat16)
        assert Projection(weight).backend == "dense"
    finally:
        monkeypatch.delenv("LORA_SERVING_CPU_BF16")
        native_bf16.cache_clear()
