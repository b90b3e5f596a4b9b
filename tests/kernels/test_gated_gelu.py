"""gated_gelu against transformers' gelu_new."""

from __future__ import annotations

import pytest
import torch

from fastseq.kernels import gated_ffn, gated_gelu, relu_ffn
from fastseq.kernels.gated_gelu import gated_ffn_reference, gated_gelu_reference, relu_ffn_reference
from tests.conftest import DEVICE, assert_close


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


# ---------------------------------------------------------------------------------------------
# The Triton kernels (on the GPU, or on the CPU through Triton's interpreter)
# ---------------------------------------------------------------------------------------------


def _pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    return [t.to(DEVICE, dtype).requires_grad_() for t in (gate, up)]


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (129, 200), (2, 5, 1031)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_elementwise_against_float64(shape, dtype, triton_backend):
    gate, up = _pair(shape, dtype)
    out = gated_gelu(gate, up)
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, (gate, up), dout)
    g64, u64 = (t.detach().cpu().double().requires_grad_() for t in (gate, up))
    exact = gated_gelu_reference(g64, u64)
    exact_grads = torch.autograd.grad(exact, (g64, u64), dout.cpu().double())
    torch_out = gated_gelu_reference(gate, up)  # fp32 math, one rounding: PyTorch's best in this dtype
    torch_grads = torch.autograd.grad(torch_out, (gate, up), dout)
    assert out.dtype == dtype
    for name, got, theirs, ref in zip(("out", "dgate", "dup"), (out, *grads), (torch_out, *torch_grads),
                                      (exact, *exact_grads), strict=True):  # fmt: skip
        err = (got.cpu().double() - ref).abs().max().item()
        torch_err = (theirs.cpu().double() - ref).abs().max().item()
        # fp32: the tanh identity and the summation order differ from PyTorch's by a few ulps.
        floor = 8 * torch.finfo(dtype).eps * ref.abs().max().item()
        # bf16 under the interpreter: it truncates where GPUs round (one more unit).
        if dtype == torch.bfloat16 and DEVICE == "cpu":
            floor = torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= 2 * torch_err + floor, (name, err, torch_err)


def _ffn_weights(d_model, d_ff, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, d_model, generator=g, dtype=torch.float64)
    w = [torch.randn(shape, generator=g, dtype=torch.float64) * shape[1] ** -0.5
         for shape in ((d_ff, d_model), (d_ff, d_model), (d_model, d_ff))]  # fmt: skip
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, *w)]


def test_triton_ffn_against_float64(triton_backend):
    leaves = _ffn_weights(24, 70, torch.float32)
    out = gated_ffn(*leaves)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = torch.autograd.grad(out, leaves, dy)
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    exact = gated_ffn_reference(*ref)
    exact_grads = torch.autograd.grad(exact, ref, dy.cpu().double())
    assert_close(out.cpu(), exact, rel=1e-5, what="out")
    for name, g, r in zip(("x", "wi_0", "wi_1", "wo"), grads, exact_grads, strict=True):
        assert_close(g.cpu(), r, rel=1e-5, what=f"grad of {name}")


def _saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_triton_ffn_keeps_two_fewer_activations(triton_backend):
    """Saved for backward: x, gate, up (and the weights), not gelu(gate), the mask or h."""
    x, wi_0, wi_1, wo = _ffn_weights(16, 512, torch.float32)
    tokens, d_ff = x.shape[0] * x.shape[1], wi_0.shape[0]
    ours = _saved_bytes(lambda: gated_ffn(x, wi_0, wi_1, wo, dropout_p=0.1))
    theirs = _saved_bytes(lambda: gated_ffn_reference(x, wi_0, wi_1, wo, dropout_p=0.1))
    activation = tokens * d_ff * 4
    assert theirs - ours >= 2 * activation, (ours, theirs, activation)


def test_triton_ffn_dropout_mask_regenerated_in_backward(triton_backend):
    """With up = 1 and wo = identity, the output reads back gelu(gate) * keep / (1 - p) exactly."""
    p, d = 0.25, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 11, d, generator=g).to(DEVICE)
    wi_0 = (torch.randn(d, d, generator=g) / d**0.5).to(DEVICE).requires_grad_()
    wi_1 = torch.zeros(d, d, device=DEVICE)
    eye = torch.eye(d, device=DEVICE)
    # up = x @ wi_1.T must be 1: feed a constant-one input column through wi_1.
    x_one = torch.cat([x[..., :-1], torch.ones(3, 11, 1, device=DEVICE)], -1).requires_grad_()
    wi_1[:, -1] = 1.0
    torch.manual_seed(5)
    probe = gated_ffn(x_one, wi_0, wi_1, eye, dropout_p=p)
    plain = gated_gelu_reference(x_one.detach() @ wi_0.detach().t(), torch.ones_like(probe))
    keep = probe != 0
    assert_close(probe[keep], plain[keep] / (1 - p), rel=1e-5, what="kept")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.06  # 1,056 draws: 4 sigma = 0.053
    torch.manual_seed(5)
    assert torch.equal(gated_ffn(x_one, wi_0, wi_1, eye, dropout_p=p), probe)
    # The gradient through the fused path uses that same mask.
    wo = torch.randn(d, d, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(3, 11, d, generator=g).to(DEVICE)
    torch.manual_seed(5)
    out = gated_ffn(x_one, wi_0, wi_1, wo, dropout_p=p)
    grads = torch.autograd.grad(out, (x_one, wi_0, wo), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x_one, wi_0, wo)]
    h = gated_gelu_reference(leaves[0] @ leaves[1].t(), leaves[0] @ wi_1.double().t()) * keep / (1 - p)
    expected = h @ leaves[2].t()
    for name, got, ref in zip(("x", "wi_0", "wo"), grads, torch.autograd.grad(expected, leaves, dy.double()),
                              strict=True):  # fmt: skip
        assert_close(got.double(), ref, rel=1e-5, what=f"grad of {name}")


def test_triton_gated_gelu_opcheck_and_compile(triton_backend):
    gate, up = _pair((3, 37), torch.float32)
    torch.library.opcheck(torch.ops.fastseq.ffn_activation_fwd.default, (gate, up, None, 0.0))
    compiled = torch.compile(gated_gelu, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(gate, up), gated_gelu(gate, up))


def test_triton_relu_ffn_against_float64_and_saves_less(triton_backend):
    x, wi, _, wo = _ffn_weights(24, 70, torch.float32)
    out = relu_ffn(x, wi, wo)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = torch.autograd.grad(out, (x, wi, wo), dy)
    ref = [t.detach().cpu().double().requires_grad_() for t in (x, wi, wo)]
    exact = relu_ffn_reference(*ref)
    assert_close(out.cpu(), exact, rel=1e-5, what="out")
    for name, g, r in zip(("x", "wi", "wo"), grads, torch.autograd.grad(exact, ref, dy.cpu().double()), strict=True):
        assert_close(g.cpu(), r, rel=1e-5, what=f"grad of {name}")
    x, wi, _, wo = _ffn_weights(16, 512, torch.float32)
    ours = _saved_bytes(lambda: relu_ffn(x, wi, wo, dropout_p=0.1))
    theirs = _saved_bytes(lambda: relu_ffn_reference(x, wi, wo, dropout_p=0.1))
    # Not kept: relu's output and the dropout output (a mask too, here a float one); kept: a seed.
    assert theirs - ours >= 2 * x.shape[0] * x.shape[1] * 512 * 4 - 8, (ours, theirs)


def test_triton_relu_ffn_dropout_regenerated_in_backward(triton_backend):
    """wo = identity reads back relu(a) * keep / (1 - p); the gradients use that same mask."""
    p, d = 0.3, 32
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, d, generator=g).to(DEVICE).requires_grad_()
    wi = (torch.randn(d, d, generator=g) / d**0.5).to(DEVICE).requires_grad_()
    torch.manual_seed(9)
    probe = relu_ffn(x, wi, torch.eye(d, device=DEVICE), dropout_p=p)
    a = (x @ wi.t()).detach()
    keep = probe != 0
    assert_close(probe[keep], torch.relu(a)[keep] / (1 - p), rel=1e-5, what="kept")
    positive = a > 0
    assert abs(keep[positive].float().mean().item() - (1 - p)) < 0.08  # ~570 positive entries: 4 sigma
    wo = torch.randn(d, d, generator=g).to(DEVICE).requires_grad_()
    dy = torch.randn(4, 9, d, generator=g).to(DEVICE)
    torch.manual_seed(9)
    grads = torch.autograd.grad(relu_ffn(x, wi, wo, dropout_p=p), (x, wi, wo), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, wi, wo)]
    expected = (torch.relu(leaves[0] @ leaves[1].t()) * keep / (1 - p)) @ leaves[2].t()
    exact = torch.autograd.grad(expected, leaves, dy.double())
    for name, got, ref in zip(("x", "wi", "wo"), grads, exact, strict=True):
        assert_close(got.double(), ref, rel=1e-5, what=f"grad of {name}")
