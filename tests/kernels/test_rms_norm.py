"""rms_norm against transformers' T5LayerNorm, including its casting rules."""

from __future__ import annotations

import pytest
import torch

from fastseq.kernels import rms_norm
from fastseq.kernels.rms_norm import rms_norm_reference
from tests.conftest import DEVICE, assert_close

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


# ---------------------------------------------------------------------------------------------
# The Triton kernel (on the GPU, or on the CPU through Triton's interpreter)
# ---------------------------------------------------------------------------------------------


def _case(rows, width, x_dtype, w_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g, dtype=torch.float64) * 2).to(DEVICE, x_dtype).requires_grad_()
    w = (torch.rand(width, generator=g, dtype=torch.float64) + 0.5).to(DEVICE, w_dtype).requires_grad_()
    dy = torch.randn(rows, width, generator=g, dtype=torch.float64)
    return x, w, dy


def _float64(x, w, dy):
    x64, w64 = (t.detach().cpu().double().requires_grad_() for t in (x, w))
    out = rms_norm_reference(x64, w64, 1e-6)
    return (out, *torch.autograd.grad(out, (x64, w64), dy))


# 9000 pads to 16,384: wider than one backward pass holds, so dX and dW take a pass each.
@pytest.mark.parametrize("rows,width", [(1, 64), (3, 37), (129, 200), (130, 512), (5, 9000)])
def test_triton_fp32_against_float64(rows, width, triton_backend):
    x, w, dy = _case(rows, width, torch.float32, torch.float32)
    out = rms_norm(x, w, 1e-6)
    grads = torch.autograd.grad(out, (x, w), dy.to(DEVICE, out.dtype))
    for name, got, exact in zip(("out", "dx", "dw"), (out, *grads), _float64(x, w, dy), strict=True):
        assert_close(got.cpu(), exact, rel=1e-5, what=name)


@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("rows,width", [(3, 37), (129, 200)])
def test_triton_half_precision(rows, width, x_dtype, w_dtype, triton_backend):
    x, w, dy = _case(rows, width, x_dtype, w_dtype)
    out = rms_norm(x, w, 1e-6)
    expected = rms_norm_reference(x, w, 1e-6)
    # The same rounding steps as T5LayerNorm: equal to it up to a unit of the output dtype (of the
    # largest value), two under the interpreter with bf16 (it truncates fp32 -> bf16 where GPUs
    # round to nearest); fp32 outputs differ only in the order of the sum of squares.
    assert out.dtype == expected.dtype
    units = 2 if DEVICE == "cpu" and torch.bfloat16 in (x_dtype, w_dtype) else 1
    assert_close(out, expected, rel=units * torch.finfo(out.dtype).eps, what="out")
    grads = torch.autograd.grad(out, (x, w), dy.to(DEVICE, out.dtype))
    torch_grads = torch.autograd.grad(expected, (x, w), dy.to(DEVICE, out.dtype))
    exact = _float64(x, w, dy)[1:]
    for name, got, theirs, ref in zip(("dx", "dw"), grads, torch_grads, exact, strict=True):
        assert got.dtype == theirs.dtype
        err = (got.cpu().double() - ref).abs().max().item()
        torch_err = (theirs.cpu().double() - ref).abs().max().item()
        assert err <= 2 * torch_err + torch.finfo(got.dtype).eps * ref.abs().max().item(), (name, err, torch_err)


def test_triton_matches_t5_layer_norm_in_a_model_layout(triton_backend):
    """A (B, L, d) input that is a non-contiguous view, as in the models."""
    x = torch.randn(2, 40, 7, 64, device=DEVICE)[:, :, 3]  # (B, L, 64), row stride 7 * 64
    w = torch.rand(64, device=DEVICE) + 0.5
    assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), rel=1e-6, what="out")


def test_triton_rms_norm_under_torch_compile_and_opcheck(triton_backend):
    x, w, dy = _case(5, 48, torch.float32, torch.float32)
    compiled = torch.compile(lambda a, b: rms_norm(a, b, 1e-6), backend="aot_eager", fullgraph=True)
    out = compiled(x, w)
    assert torch.equal(out, rms_norm(x, w, 1e-6))
    torch.library.opcheck(torch.ops.fastseq.rms_norm_fwd.default, (x, w, 1e-6))
