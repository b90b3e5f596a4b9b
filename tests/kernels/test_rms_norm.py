"""rms_norm against transformers' T5LayerNorm, including its casting rules."""

from __future__ import annotations

import pytest
import torch
from fastseq.kernels import rms_norm

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
def test_bitwise_equal_to_t5_layer_norm(x_dtype, w_dtype):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    norm = T5LayerNorm(37, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm = norm.to(w_dtype)
    x = (torch.randn(3, 5, 37) * 3).to(x_dtype)
    expected = norm(x)
    got = rms_norm(x, norm.weight, 1e-6)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_gradients_float64():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x, w))


def test_weight_shape_checked():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 4), torch.ones(5))
