"""gated_gelu against transformers' gelu_new."""

from __future__ import annotations

import pytest
import torch
from fastseq.kernels import gated_gelu


def test_matches_gelu_new_in_float64():
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 129, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    expected = ACT2FN["gelu_new"](gate) * up
    assert torch.allclose(gated_gelu(gate, up), expected, atol=1e-12, rtol=1e-12)


def test_gradients():
    gate, up = (torch.randn(5, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(gated_gelu, (gate, up))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_fp32(dtype):
    gate, up = (torch.randn(4, 33) for _ in range(2))
    out = gated_gelu(gate.to(dtype), up.to(dtype))
    assert out.dtype == dtype
    exact = gated_gelu(gate.to(dtype).double(), up.to(dtype).double())
    # One rounding of the result: at most half an ulp of the output dtype.
    assert torch.allclose(out.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape"):
        gated_gelu(torch.randn(2, 3), torch.randn(3, 2))
