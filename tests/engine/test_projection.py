"""project() is x @ W.T + b whichever operand order it picks for the row count."""

import pytest
import torch
import torch.nn.functional as F

from handler.models.projection import WEIGHT_MAJOR_MAX_ROWS, project


@pytest.mark.parametrize("rows", [1, 2, 17, WEIGHT_MAJOR_MAX_ROWS, WEIGHT_MAJOR_MAX_ROWS + 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_project_equals_linear(rows, with_bias):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 48, generator=generator)
    weight = torch.randn(80, 48, generator=generator)
    bias = torch.randn(80, generator=generator) if with_bias else None
    out = project(x, weight, bias)
    assert out.shape == (rows, 80)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
