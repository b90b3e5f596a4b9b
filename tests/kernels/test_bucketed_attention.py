"""bucketed_attention: T5's buckets, the bias, masks and gradients of the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastseq.kernels import PositionBias, bucketed_attention, relative_position_bucket
from fastseq.kernels._backend import draw_seed
from fastseq.kernels.bucketed_attention import (
    bucketed_attention_reference,
    distance_table,
    launch,
    relative_bias,
    tiles,
)
from fastseq.kernels.bucketed_attention.tiles import _block_d, _tiles
from tests.conftest import DEVICE, assert_close


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 9), (64, 1000)])
def test_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-5000, 5000)
    expected = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("is_decoder,past", [(False, 0), (True, 0), (True, 17)])
def test_bias_matches_transformers_compute_bias(is_decoder, past):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(
        num_heads=3, relative_attention_num_buckets=16, relative_attention_max_distance=20, is_decoder=is_decoder
    )
    attn = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    Lq, Lk = (1, past + 1) if past else (29, 31)
    expected = attn.compute_bias(Lq, Lk, past_seen_tokens=past)[0]
    got = relative_bias(
        attn.relative_attention_bias.weight, Lq, Lk, bidirectional=not is_decoder, max_distance=20, q_offset=past
    )
    assert torch.equal(got, expected)


def _dense_reference(q, k, v, table, *, bidirectional, max_distance, causal, mask, q_offset, scale):
    """float64, written from the definition: one query at a time over its allowed keys."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    for i in range(Lq):
        rel = torch.arange(Lk) - (q_offset + i)
        ok = torch.ones(B, Lk, dtype=torch.bool)
        if mask is not None:
            ok &= mask.bool()
        if causal:
            ok &= (rel <= 0)[None]
        s = torch.einsum("bhd,bhkd->bhk", q[:, :, i].double(), k.double()) * scale
        if table is not None:
            buckets = relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=table.shape[0], max_distance=max_distance
            )
            s = s + table.double()[buckets].t()[None]
        s = s.masked_fill(~ok[:, None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[:, :, i] = torch.einsum("bhk,bhkd->bhd", p, v.double())
    return out


CASES = [
    dict(Lq=7, Lk=7, causal=False, bidirectional=True, mask=True, q_offset=0, scale=1.0),
    dict(Lq=33, Lk=33, causal=True, bidirectional=False, mask=True, q_offset=0, scale=1.0),
    dict(Lq=1, Lk=40, causal=True, bidirectional=False, mask=False, q_offset=39, scale=1.0),
    dict(Lq=5, Lk=19, causal=False, bidirectional=True, mask=True, q_offset=0, scale=0.35),
    dict(Lq=129, Lk=127, causal=False, bidirectional=True, mask=False, q_offset=0, scale=1.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"Lq{c['Lq']}-Lk{c['Lk']}-causal{c['causal']}")
@pytest.mark.parametrize("with_bias", [True, False])
def test_reference_against_float64_definition(case, with_bias):
    g = torch.Generator().manual_seed(0)
    B, H, D = 2, 3, 16
    q = torch.randn(B, H, case["Lq"], D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, case["Lk"], D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, case["Lk"], D, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(16, H, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    mask = None
    if case["mask"]:
        mask = torch.ones(B, case["Lk"], dtype=torch.long)
        mask[0, 2:4] = 0
        mask[1, -3:] = 0
    kw = dict(
        bidirectional=case["bidirectional"],
        max_distance=20,
        causal=case["causal"],
        q_offset=case["q_offset"],
        scale=case["scale"],
    )
    inputs = [q, k, v] + ([table] if with_bias else [])
    expected = _dense_reference(q, k, v, table, mask=mask, **kw)
    got = bucketed_attention(
        *(t.float().detach().requires_grad_() for t in (q, k, v)),
        table.float().detach().requires_grad_() if with_bias else None,
        key_padding_mask=mask,
        **kw,
    )
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5)
    # Gradients: the reference in float64 (fp32 math is exact enough to follow autograd of the definition).
    grad_out = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, inputs, grad_out)
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    out = bucketed_attention(*leaves[:3], leaves[3] if with_bias else None, key_padding_mask=mask, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out.float())
    for name, a, b in zip("q k v bias_table".split()[: len(grads)], grads, ref_grads, strict=True):
        assert torch.allclose(a.double(), b, atol=1e-4, rtol=1e-4), name


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = (torch.randn(2, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 4)
    mask[1] = 0
    out = bucketed_attention(q, k, v, torch.randn(8, 2), key_padding_mask=mask)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_dropout_scales_kept_probabilities():
    torch.manual_seed(0)
    q, k = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 64, 4)
    v = torch.ones(1, 1, 64, 1).expand(1, 1, 64, 4).contiguous()
    out = bucketed_attention(q, k, v, dropout_p=0.5)
    # Uniform probabilities 1/64; each kept one is doubled, so out = 2 * (kept / 64).
    kept = out[0, 0, :, 0] * 32
    assert torch.allclose(kept, kept.round()) and not torch.allclose(out, torch.ones_like(out))


def test_bad_shapes_name_the_problem():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="bias_table must be"):
        bucketed_attention(q, q, q, torch.randn(8, 3))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        bucketed_attention(q, q, q, key_padding_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="dropout_p"):
        bucketed_attention(q, q, q, dropout_p=1.0)


def test_backend_switch(monkeypatch):
    q = torch.randn(1, 1, 2, 4)
    monkeypatch.setenv("FASTSEQ_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTSEQ_BACKEND='bogus'"):
        bucketed_attention(q, q, q)
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    assert bucketed_attention(q, q, q).shape == q.shape


# ---------------------------------------------------------------------------------------------
# The Triton kernel (on the GPU, or on the CPU through Triton's interpreter)
# ---------------------------------------------------------------------------------------------

TRITON_CASES = [
    dict(Lq=1, Lk=1, D=16, causal=False, bidirectional=True, mask=False, q_offset=0, scale=1.0, bias=True),
    dict(Lq=7, Lk=7, D=8, causal=False, bidirectional=True, mask=True, q_offset=0, scale=1.0, bias=True),
    dict(Lq=33, Lk=33, D=16, causal=True, bidirectional=False, mask=True, q_offset=0, scale=1.0, bias=True),
    dict(Lq=130, Lk=130, D=16, causal=False, bidirectional=True, mask=True, q_offset=0, scale=1.0, bias=True),
    dict(Lq=130, Lk=130, D=16, causal=True, bidirectional=False, mask=False, q_offset=0, scale=1.0, bias=True),
    dict(Lq=1, Lk=40, D=16, causal=True, bidirectional=False, mask=True, q_offset=39, scale=1.0, bias=True),
    dict(Lq=9, Lk=50, D=16, causal=True, bidirectional=False, mask=False, q_offset=41, scale=1.0, bias=True),
    dict(Lq=33, Lk=7, D=24, causal=False, bidirectional=True, mask=True, q_offset=0, scale=0.35, bias=False),
    dict(Lq=40, Lk=40, D=32, causal=False, bidirectional=True, mask=True, q_offset=0, scale=32**-0.5, bias=False),
]


def _random_inputs(case, *, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    B, H, D = case.get("B", 2), 3, case["D"]
    q = torch.randn(B, H, case["Lq"], D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, case["Lk"], D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, case["Lk"], D, generator=g, dtype=torch.float64)
    table = torch.randn(8, H, generator=g, dtype=torch.float64) if case["bias"] else None
    mask = None
    if case["mask"]:
        mask = torch.ones(B, case["Lk"], dtype=torch.long)
        mask[1, case["Lk"] // 3 : case["Lk"] // 3 + 3] = 0  # padding in the middle of a row
        mask[0, -2:] = 0
        mask[0, 0] = 1
        mask = mask.to(device)
    leaves = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    if table is not None:
        leaves.append(table.to(device=device, dtype=torch.float32))
    return [t.requires_grad_() for t in leaves], mask


def _kwargs(case):
    return dict(
        bidirectional=case["bidirectional"],
        max_distance=12,
        causal=case["causal"],
        q_offset=case["q_offset"],
        scale=case["scale"],
    )


def _allowed(mask, case, B: int, Lq: int, Lk: int, device) -> torch.Tensor:
    """`(B, 1, Lq, Lk)`: which scores a case keeps (its padding mask, and causality from q_offset)."""
    ok = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    if mask is not None:
        ok = ok & mask.bool()[:, None, None, :]
    if case["causal"]:
        ok = ok & (torch.arange(Lk, device=device)[None] <= torch.arange(Lq, device=device)[:, None] + case["q_offset"])
    return ok


def _rounded_output_term(leaves, mask, case, grad_out, exact_out, out):
    """What the table's gradient gains, in float64, from the kernel's delta = rowsum(dO * O) taken
    from its rounded output `out` (as every flash-style backward does) rather than the exact one. Each
    row's dS = P * (dP - delta) then gains P * c with c = rowsum(dO * (O - out)), and the sum over a
    row of P * c is c times the gradient of the row's log-sum-exp: a bucket, which sums whole rows'
    dS, is off by c where the rows' terms cancel, which no error bound on the table's size covers."""
    q, k, _, table = (t.detach().cpu().double() for t in leaves)
    table.requires_grad_()
    Lq, Lk = q.shape[2], k.shape[2]
    bias = relative_bias(table, Lq, Lk, bidirectional=case["bidirectional"], max_distance=12, q_offset=case["q_offset"])
    scores = torch.matmul(q, k.transpose(-1, -2)) * case["scale"] + bias
    ok = _allowed(None if mask is None else mask.cpu(), case, q.shape[0], Lq, Lk, q.device)
    lse = torch.logsumexp(scores.masked_fill(~ok, float("-inf")).where(ok.any(-1, keepdim=True), 0.0), -1)
    c = (grad_out.cpu().double() * (exact_out - out.detach().cpu().double())).sum(-1)
    return torch.autograd.grad((c * lse).sum(), table)[0]


def _float64_grads(leaves, mask, case, grad_out):
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    table = ref_leaves[3] if len(ref_leaves) == 4 else None
    out = _dense_reference(*ref_leaves[:3], table, mask=None if mask is None else mask.cpu(), **_kwargs(case))
    return out, torch.autograd.grad(out, ref_leaves, grad_out.cpu().double())


def _run(leaves, mask, case, grad_out, **extra):
    table = leaves[3] if len(leaves) == 4 else None
    out = bucketed_attention(*leaves[:3], table, key_padding_mask=mask, **_kwargs(case), **extra)
    return out, torch.autograd.grad(out, leaves, grad_out)


# The 130-long cases (many tiles, band tiles and tiles past the cut-off) are the full matrix's.
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c["Lq"] == 130 else c for c in TRITON_CASES],
    ids=lambda c: "Lq{Lq}-Lk{Lk}-D{D}-causal{causal}-off{q_offset}".format(**c),
)
def test_triton_fp32_against_float64(case, triton_backend):
    leaves, mask = _random_inputs(case)
    grad_out = torch.randn(2, 3, case["Lq"], case["D"], device=DEVICE)
    expected, ref_grads = _float64_grads(leaves, mask, case, grad_out)
    out, grads = _run(leaves, mask, case, grad_out)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_close(out.cpu(), expected, rel=1e-5, what="out")
    for name, g, r in zip(["q", "k", "v", "bias_table"], grads, ref_grads, strict=False):
        # floor 1: the inputs are O(1); a gradient that is exactly zero (q with one key) leaves rounding noise.
        assert_close(g.cpu(), r, rel=2e-5, floor=1.0, what=f"grad of {name}")


def _written_out(leaves, allowed, keep, p, case, grad_out, *, exact):
    """The attention written out with a given keep mask (True: none dropped, p = 0), and its gradients:
    in float64 on the CPU (`exact`), or as PyTorch computes it in the inputs' dtype (scores and products
    in that dtype, softmax in fp32), as `transformers` does. `allowed` `(B, 1, Lq, Lk)` holds the scores
    kept before dropout; without a table (three leaves) there is no bias."""
    if exact:
        leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
        allowed, grad_out = allowed.cpu(), grad_out.cpu().double()
        keep = keep.cpu() if isinstance(keep, torch.Tensor) else keep
    q, k, v = leaves[:3]
    Lq, Lk = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * case["scale"]
    if len(leaves) == 4:
        bias = relative_bias(
            leaves[3], Lq, Lk, bidirectional=case["bidirectional"], max_distance=12, q_offset=case["q_offset"]
        )
        scores = scores + bias.to(q.dtype)
    probs = torch.softmax((scores if exact else scores.float()).masked_fill(~allowed, float("-inf")), -1)
    probs = (probs.nan_to_num(0.0) * keep / (1 - p)).to(q.dtype)
    out = torch.matmul(probs, v)
    return out, torch.autograd.grad(out, leaves, grad_out)


def _torch_in_dtype(leaves, mask, case, grad_out):
    """The same attention computed by plain PyTorch in the inputs' dtype (`_written_out`)."""
    q, k = leaves[:2]
    allowed = _allowed(mask, case, q.shape[0], q.shape[2], k.shape[2], q.device)
    return _written_out(leaves, allowed, True, 0.0, case, grad_out, exact=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    [pytest.param(TRITON_CASES[3], marks=pytest.mark.slow), TRITON_CASES[5], TRITON_CASES[7]],
    ids=["bidir", "decode", "nobias"],
)
def test_triton_half_precision_within_twice_torch_error(case, dtype, triton_backend):
    leaves, mask = _random_inputs(case, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(2, 3, case["Lq"], case["D"], generator=g).to(dtype).to(DEVICE)
    expected, ref_grads = _float64_grads(leaves, mask, case, grad_out)
    out, grads = _run(leaves, mask, case, grad_out)
    t_out, t_grads = _torch_in_dtype(leaves, mask, case, grad_out)
    assert out.dtype == dtype
    if len(leaves) == 4:
        ref_grads = (*ref_grads[:3], ref_grads[3] + _rounded_output_term(leaves, mask, case, grad_out, expected, out))
    names = ["out", "q", "k", "v", "bias_table"]
    for name, got, torch_got, exact in zip(
        names, (out, *grads), (t_out, *t_grads), (expected, *ref_grads), strict=False
    ):
        err = (got.cpu().double() - exact).abs().max().item()
        torch_err = (torch_got.cpu().double() - exact).abs().max().item()
        # Gradients get one unit of the dtype on top: like every flash-style backward, the kernel
        # takes rowsum(dO * O) from the rounded output, where PyTorch sums P * dP.
        slack = 0.0 if name == "out" else torch.finfo(dtype).eps * exact.abs().max().item()
        assert err <= 2 * torch_err + slack, f"{name}: {err:.3e} vs torch {torch_err:.3e} (+{slack:.1e})"


def test_triton_fully_masked_rows(triton_backend):
    case = dict(TRITON_CASES[3], Lq=20, Lk=20)
    leaves, _ = _random_inputs(case)
    mask = torch.ones(2, 20, dtype=torch.bool, device=DEVICE)
    mask[1] = False
    out = bucketed_attention(*leaves[:3], leaves[3], key_padding_mask=mask, max_distance=12)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    out.square().sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    assert leaves[0].grad[1].abs().max() == 0 and leaves[1].grad[1].abs().max() == 0
    expected = bucketed_attention_reference(
        *(t.detach() for t in leaves[:3]), leaves[3].detach(), key_padding_mask=mask, max_distance=12
    )
    assert_close(out.detach().cpu(), expected.cpu(), what="out")


def test_triton_backward_is_deterministic(triton_backend):
    case = TRITON_CASES[2]
    leaves, mask = _random_inputs(case)
    grad_out = torch.randn(2, 3, case["Lq"], case["D"], device=DEVICE)
    first = _run(leaves, mask, case, grad_out, dropout_p=0.0)
    second = _run(leaves, mask, case, grad_out, dropout_p=0.0)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1]), strict=True):
        assert torch.equal(a, b)


def test_key_bias_is_the_mask_added_to_the_scores_and_follows_in_place_changes():
    """The kernels' padding mask: 0 where a key is attended, -inf where it is padding or past Lk, rows in
    whole groups of 64 keys, from a mask of any dtype; converted once for every layer that passes the
    same mask, and again after the mask changes in place."""
    launch._KEY_BIAS_CACHE.clear()
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[1, 5:9] = False
    bias = launch.key_bias(mask, 70, torch.device("cpu"))
    assert bias.shape == (2, 128) and bias.dtype == torch.float32 and bias.stride(0) % 16 == 0
    expected = torch.full((2, 128), float("-inf"))
    expected[:, :70] = torch.where(mask, 0.0, float("-inf"))
    assert torch.equal(bias, expected)
    assert launch.key_bias(mask, 70, torch.device("cpu")) is bias
    assert launch.key_bias(launch.KeyBias(bias), 70, torch.device("cpu")) is bias
    alias = mask.view(torch.int8)  # another tensor on the same storage: converted on its own
    assert launch.key_bias(alias, 70, torch.device("cpu")) is not bias
    assert torch.equal(launch.key_bias(alias, 70, torch.device("cpu")), bias)
    assert torch.equal(launch.key_bias(mask.long(), 70, torch.device("cpu")), bias)
    assert torch.equal(launch.key_bias(mask.t().contiguous().t(), 70, torch.device("cpu")), bias)  # strided
    assert launch.key_bias(mask, 69, torch.device("cpu"))[:, 69].isneginf().all()  # Lk is part of the key
    mask[0, 3] = False
    again = launch.key_bias(mask, 70, torch.device("cpu"))
    assert again is not bias and again[0, 3] == float("-inf") and bias[0, 3] == 0.0
    inference = torch.ones(1, 3, dtype=torch.bool)
    with torch.inference_mode():
        inference_mask = inference.clone()
    assert torch.equal(launch.key_bias(inference_mask, 3, torch.device("cpu"))[0, :4],
                       torch.tensor([0.0, 0.0, 0.0, float("-inf")]))  # fmt: skip
    assert launch.key_bias(None, 3, torch.device("cpu")).shape == (0, 64)


def test_key_bias_converts_the_mask_anew_while_a_cuda_graph_captures(monkeypatch):
    """While a CUDA graph captures the mask's device, each call converts its mask (a replay must convert
    what its mask then holds) and keeps nothing."""
    launch._KEY_BIAS_CACHE.clear()
    mask = torch.ones(2, 70, dtype=torch.bool)
    monkeypatch.setattr(launch, "capturing", lambda tensor: tensor is mask)
    first = launch.key_bias(mask, 70, torch.device("cpu"))
    assert launch.key_bias(mask, 70, torch.device("cpu")) is not first and not launch._KEY_BIAS_CACHE


def test_triton_backward_reads_the_mask_its_forward_read(triton_backend):
    """A mask changed in place between the forward and the backward: the gradients are the forward's
    mask's."""
    case = TRITON_CASES[2]
    leaves, mask = _random_inputs(case)
    grad_out = torch.randn(2, 3, case["Lq"], case["D"], device=DEVICE)
    expected = _run(leaves, mask.clone(), case, grad_out)
    out = bucketed_attention(*leaves[:3], leaves[3], key_padding_mask=mask, **_kwargs(case))
    mask[0, :20] = 0
    grads = torch.autograd.grad(out, leaves, grad_out)
    for name, a, b in zip("q k v bias_table".split(), grads, expected[1], strict=True):
        assert torch.equal(a, b), name


def test_launchers_refuse_a_padding_mask_beside_segment_ids():
    q = torch.zeros(1, 1, 4, 16)
    segs = launch._segments(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="fold the padding mask into the segment ids"):
        launch.attention_forward(q, q, q, None, torch.ones(1, 4, dtype=torch.bool), None, False, 0, 1.0, 0.0,
                                 segs=segs)  # fmt: skip


def test_triton_reads_a_mask_changed_in_place(triton_backend):
    case = TRITON_CASES[2]
    leaves, mask = _random_inputs(case)
    mask = mask.bool()
    first = bucketed_attention(*leaves[:3], leaves[3], key_padding_mask=mask, **_kwargs(case)).detach()
    mask[0, :20] = False
    out = bucketed_attention(*leaves[:3], leaves[3], key_padding_mask=mask, **_kwargs(case)).detach()
    expected = bucketed_attention_reference(
        *(t.detach() for t in leaves[:3]), leaves[3].detach(), key_padding_mask=mask, **_kwargs(case)
    )
    assert_close(out.cpu(), expected.cpu(), what="out")
    assert not torch.allclose(out, first)


class _Recorder:
    """Stands in for `kernel` in `kernel[grid](...)`, calling `record(grid, kernel)` for the launch."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        return self.record(grid, self.kernel)


def record_dq_launches(monkeypatch, budget=None) -> list:
    """Stand in for the dQ kernel (with `budget` as _DQ_SCRATCH_BYTES): a list that receives each
    launch's grid and the bytes of its per-program buffers (one-element placeholders of buffers a
    launch does not use left out)."""
    launches = []

    def record(grid, kernel):
        def launch(*args, **kwargs):
            named = dict(zip(kernel.arg_names, args, strict=False))  # the constexprs come as keywords
            buffers = [named[n] for n in ("DQP", "DDT", "DDTG", "SCR") if named[n].numel() > 1]
            launches.append((grid, sum(t.numel() * t.element_size() for t in buffers)))
            return kernel[grid](*args, **kwargs)

        return launch

    kernel = launch._bucketed_attention_bwd_dq_kernel
    kernel = kernel.kernel if isinstance(kernel, _Recorder) else kernel
    monkeypatch.setattr(launch, "_bucketed_attention_bwd_dq_kernel", _Recorder(kernel, record))
    if budget is not None:
        monkeypatch.setattr(launch, "_DQ_SCRATCH_BYTES", budget)
    return launches


def dq_slot_bytes(D, dtype, cut, global_cut=None):
    """The bytes of one dQ program's buffers: its dS tile, a per-distance row per table, and with
    global tokens its fp32 dQ tile (`_backward`)."""
    tiles = _tiles(D, dtype, torch.device(DEVICE))
    block_m, block_n = (tiles.dq if global_cut is None else tiles.dq_global)[:2]
    words = block_m * block_n + 2 * cut + 1
    if global_cut is not None:
        words += 2 * global_cut + 1 + block_m * _block_d(D)
    return 4 * words


@pytest.mark.parametrize(
    "slots,tiles,B", [(3, "interpreter", 2), (3, "head-chunks", 2), (30, "interpreter", 3),
                      *(pytest.param(n, "interpreter", 2, marks=pytest.mark.slow) for n in (7, 16))]
)  # fmt: skip
def test_triton_dq_scratch_is_bounded(slots, tiles, B, triton_backend, monkeypatch, request):
    """The dQ programs' buffers (a dS tile and a per-distance row each, for the bias gradient) take at
    most _DQ_SCRATCH_BYTES per launch, whatever B * H * L; one buffer per program of the whole
    backward took 4 GiB at t5-11b (B = 32, L = 4096). Squeezed to 3, 7, 16 or 30 programs' worth, the
    backward runs in chunks of query tiles, of heads or of batch elements (30 of the 45 programs of
    B = 3: every head of two batch elements, then of the third, where the slots' head-major order
    differs from a batch-major one); dQ, dK and dV are bitwise those of one launch, and the table's
    gradient adds the same partials in another order. On tiles written in chunks of the head dim
    (`chunked_tiles`), the launches after the first start at a later query tile (`m_base`) with
    several programs per tile."""
    if tiles == "head-chunks":
        request.getfixturevalue("chunked_tiles")
    case = dict(Lq=70, Lk=70, D=16, causal=False, bidirectional=True, mask=True, q_offset=0, scale=1.0, bias=True,
                B=B)  # fmt: skip
    leaves, mask = _random_inputs(case)
    grad_out = torch.randn(B, 3, case["Lq"], case["D"], device=DEVICE)
    one = record_dq_launches(monkeypatch)
    expected = _run(leaves, mask, case, grad_out)
    assert len(one) == 1

    budget = slots * dq_slot_bytes(case["D"], torch.float32, launch._clamped_buckets(8, 12, True)[0])
    chunked = record_dq_launches(monkeypatch, budget)
    got = _run(leaves, mask, case, grad_out)
    over = [(grid, size) for grid, size in chunked if size > budget]
    assert not over, f"dQ buffers over the {budget} bytes allowed: {over}"
    assert len(chunked) > 1
    for a, b in zip((expected[0], *expected[1][:3]), (got[0], *got[1][:3]), strict=True):
        assert torch.equal(a, b)
    assert_close(got[1][3], expected[1][3], rel=1e-6, what="grad of bias_table")


def _keep_mask(case, seed, dropout_p, leaves, mask):
    """The kernel's dropout mask, read back exactly: with v = identity (Lk = D) each output entry
    is p_ij * keep_ij / (1 - dropout_p)."""
    eye = torch.eye(case["Lk"], device=DEVICE).expand(2, 3, -1, -1)
    torch.manual_seed(seed)
    probe = bucketed_attention(
        leaves[0].detach(),
        leaves[1].detach(),
        eye,
        leaves[3].detach(),
        key_padding_mask=mask,
        dropout_p=dropout_p,
        **_kwargs(case),
    )
    plain = bucketed_attention(
        leaves[0].detach(), leaves[1].detach(), eye, leaves[3].detach(), key_padding_mask=mask, **_kwargs(case)
    )
    return probe, plain


DROPOUT_CASE = dict(Lq=40, Lk=16, D=16, causal=False, bidirectional=True, mask=True, q_offset=0, scale=1.0, bias=True)
# 40 rows (two and a half 16-row blocks) and 48 keys (one and a half 32-key blocks); v = eye needs D = Lk.
MASK_CASE = dict(DROPOUT_CASE, Lk=48, D=48)
_MASK32 = 0xFFFFFFFF


def _philox_keep(seed: int, B: int, H: int, Lq: int, Lk: int, dropout_p: float) -> torch.Tensor:
    """The keep mask `(B, H, Lq, Lk)` that `_dropout_keep` documents, from Philox4x32-7 written out
    here (in uint64: a 32 x 32-bit product fits): one call per 16 elements, byte c + 2d of word x + 2r."""
    i = np.arange(Lq, dtype=np.uint64)[:, None]
    j = np.arange(Lk, dtype=np.uint64)[None, :]
    bh = np.arange(B * H, dtype=np.uint64).reshape(B, H, 1, 1)
    lq16 = np.uint64(-(-Lq // 16) * 16)
    c0 = np.broadcast_to(32 * (j // 32) + 2 * ((j // 2) % 4), (B, H, Lq, Lk))
    c1 = np.broadcast_to(bh * lq16 + 16 * (i // 16) + i % 8, (B, H, Lq, Lk))
    c2 = c3 = np.zeros((B, H, Lq, Lk), dtype=np.uint64)
    k0, k1 = np.uint64(seed & _MASK32), np.uint64(seed >> 32)
    ra, rb, mask32 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(_MASK32)
    for _ in range(7):
        a0, a2 = c0, c2
        c0 = ((rb * a2) >> np.uint64(32)) ^ c1 ^ k0
        c2 = ((ra * a0) >> np.uint64(32)) ^ c3 ^ k1
        c1 = (rb * a2) & mask32
        c3 = (ra * a0) & mask32
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    word = np.broadcast_to((j // 16) % 2 + 2 * ((i // 8) % 2), (B, H, Lq, Lk)).astype(np.int64)
    chosen = np.take_along_axis(np.stack([c0, c1, c2, c3]), word[None], 0)[0]
    byte = j % 2 + 2 * ((j // 8) % 2)
    return torch.from_numpy(((chosen >> (np.uint64(8) * byte)) & np.uint64(0xFF)) < round(256 * (1 - dropout_p)))


# Tiles (BLOCK_M, BLOCK_N): the interpreter's own, and the GPU's shapes at this size; keys past a
# 32-key block, a block split across tiles (BLOCK_N = 16) and rows past a 16-row block.
@pytest.mark.parametrize("tile", [(16, 16), (32, 32), (16, 64), (64, 32)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_triton_dropout_mask_is_the_documented_philox_draw_on_every_tile(tile, triton_backend, monkeypatch):
    """The mask read back from the forward is, bit for bit, the documented draw whatever the tile (the
    forward and the backward's kernels run different tiles on a GPU), kept entries scaled by exactly
    1 / (1 - p); the backward regenerates it: gradients equal float64 autograd through that mask."""
    monkeypatch.setattr(tiles, "_INTERPRET_TILE", (*tile, 4, 1))
    case, p = MASK_CASE, 0.25
    leaves, mask = _random_inputs(case)
    probe, plain = _keep_mask(case, 7, p, leaves, mask)
    torch.manual_seed(7)
    seed = int(draw_seed(p, torch.device(DEVICE)).item())  # the draw `attention_with_lse` makes
    keep = _philox_keep(seed, 2, 3, case["Lq"], case["Lk"], p)
    allowed = (plain > 0).cpu()
    assert torch.equal((probe.cpu() > 0)[allowed], keep[allowed])
    assert_close(probe[probe > 0], plain[probe > 0] / (1 - p), rel=1e-6, what="kept probabilities")
    fraction = keep[allowed].float().mean().item()
    assert abs(fraction - (1 - p)) < 0.03, fraction  # 9,600 Bernoulli draws: 7 sigma
    other, _ = _keep_mask(case, 8, p, leaves, mask)
    assert not torch.equal(probe, other)
    _check_dropout_against_float64(case, leaves, mask, keep, p, seed=7, floor=0.0)


def _check_dropout_against_float64(case, leaves, mask, keep, p, *, seed, floor):
    """The output and gradients of a call with dropout p, its generator seeded with `seed`, against
    float64 autograd through `keep` (`_philox_keep` of that seed's draw)."""
    grad_out = torch.randn(2, 3, case["Lq"], case["D"], device=DEVICE)
    torch.manual_seed(seed)
    out, grads = _run(leaves, mask, case, grad_out, dropout_p=p)
    ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
    eye = torch.eye(case["Lk"], dtype=torch.float64).expand(2, 3, -1, -1)
    probs = _dense_reference(ref[0], ref[1], eye, ref[3], mask=mask.cpu(), **_kwargs(case))
    expected = torch.matmul(probs * keep.double() / (1 - p), ref[2])
    assert_close(out.detach().cpu(), expected.detach(), what="dropout out")
    for name, g, r in zip(
        "q k v bias_table".split(), grads, torch.autograd.grad(expected, ref, grad_out.cpu().double()), strict=True
    ):
        assert_close(g.cpu(), r, rel=2e-5, floor=floor, what=f"dropout grad of {name}")


def test_a_tile_chunk_must_split_the_head_dim():
    """A backward tile's fifth field (`head_chunk`) is the columns one program writes: a power of two
    that divides BLOCK_D, so that the chunks cover every column once; anything else is refused."""
    from fastseq.kernels.bucketed_attention.tiles import head_chunk

    assert head_chunk((64, 32, 4, 2), 256) == 256 and head_chunk((64, 32, 4, 2, 64), 256) == 64
    for chunk in (96, 512, 0):
        with pytest.raises(ValueError, match="BLOCK_DC must be a power of two"):
            head_chunk((64, 32, 4, 2, chunk), 256)


def test_every_launch_names_only_its_kernels_parameters():
    """On a GPU Triton refuses a keyword that is none of a kernel's parameters or launch options; the
    interpreter passes over it. Every plan's meta-parameters, T5's and LongT5's, name their kernel's."""
    from fastseq.kernels.bucketed_attention import kernels

    options = {"num_warps", "num_stages"}
    device = torch.device(DEVICE)

    def unknown(meta, kernel):
        return set(meta) - set(kernel.arg_names) - options

    for G, row, grow in ((0, 17, 0), (4, 17, 9)):
        plan = launch._backward_plan(2, 3, 40, 40, 64, torch.bfloat16, device, launch._tile_source(), G, 16, row, grow,
                                     (True, True, G > 0, True, G == 0), launch._DQ_SCRATCH_BYTES)  # fmt: skip
        for meta, kernel in ((plan.preprocess, kernels._bucketed_attention_bwd_preprocess_kernel),
                             (plan.dkdv, kernels._bucketed_attention_bwd_dkdv_kernel),
                             (plan.dkdv_global, kernels._bucketed_attention_bwd_dkdv_kernel),
                             (plan.dq, kernels._bucketed_attention_bwd_dq_kernel),
                             (plan.dq_global, kernels._bucketed_attention_bwd_dq_kernel)):  # fmt: skip
            assert not unknown(meta, kernel), unknown(meta, kernel)
        *_, meta = launch._forward_plan(2, 3, 40, 64, torch.bfloat16, device, launch._tile_source(), G, 16,
                                        (True, True, True, G > 0, G == 0, G > 0, True))  # fmt: skip
        assert not unknown(meta, kernels._bucketed_attention_fwd_kernel)


def _t5_gradients():
    case = dict(MASK_CASE, D=16, causal=True, bidirectional=False)  # 48 keys: three of the interpreter's key tiles
    leaves, mask = _random_inputs(case)
    torch.manual_seed(7)
    grad_out = torch.randn(2, 3, case["Lq"], case["D"], device=DEVICE)
    return _run(leaves, mask, case, grad_out, dropout_p=0.25)[1]


def _longt5_gradients():
    from fastseq.kernels import local_attention

    g = torch.Generator().manual_seed(3)
    B, H, L, D, gbs = 1, 2, 40, 16, 4
    tensors = [torch.randn(B, H, L, D, generator=g) for _ in range(3)] + [torch.randn(B, H, L // gbs, D, generator=g)
                                                                          for _ in range(2)]  # fmt: skip
    tables = [torch.randn(8, H, generator=g) for _ in range(2)]
    leaves = [t.to(DEVICE).requires_grad_() for t in tensors + tables]
    mask = torch.ones(B, L, dtype=torch.long, device=DEVICE)
    mask[0, -5:] = 0
    torch.manual_seed(7)
    globals_ = dict(global_k=leaves[3], global_v=leaves[4], global_bias_table=leaves[6], global_block_size=gbs)
    out = local_attention(*leaves[:3], leaves[5], radius=15, max_distance=12, key_padding_mask=mask, dropout_p=0.25,
                          **globals_)  # fmt: skip
    return torch.autograd.grad(out, leaves, torch.randn_like(out))


@pytest.mark.parametrize("gradients,launches", [(_t5_gradients, 1), (_longt5_gradients, 2)], ids=["t5", "longt5"])
def test_triton_backward_is_bitwise_the_same_with_its_products_apart(gradients, launches, triton_backend, monkeypatch):
    """Below Hopper dK/dV's products run under a branch that every program takes (`_accumulate`, APART, so
    that Triton lays them out apart from the scores): the gradients are bitwise those of the products in
    the key loop itself, with bias, padding, causality (T5) or LongT5's window and global tokens, dropout,
    several key tiles; and each dK/dV launch, of the ordinary keys and of the global tokens, gets the flag."""
    real, seen = launch._bucketed_attention_bwd_dkdv_kernel, []

    class Spy:  # the dK/dV kernel, recording the APART of each launch
        def __getitem__(self, grid):
            def launch_(*args, **meta):
                seen.append(meta["APART"])
                return real[grid](*args, **meta)

            return launch_

    monkeypatch.setattr(launch, "_bucketed_attention_bwd_dkdv_kernel", Spy())
    runs = []
    for apart in (False, True):
        launch._backward_plan.cache_clear()
        monkeypatch.setattr(launch, "apart", lambda arch, tile, apart=apart: apart)
        runs.append(gradients())
    launch._backward_plan.cache_clear()
    assert seen == [False] * launches + [True] * launches
    for i, (plain, apart) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(plain, apart), i


@pytest.mark.parametrize("case", [dict(DROPOUT_CASE, causal=True, bidirectional=False),
                                  dict(MASK_CASE, causal=True, bidirectional=False, q_offset=3)],
                         ids=["causal-D16", "causal-offset-D48"])  # fmt: skip
def test_triton_backward_on_head_chunks_and_key_major_tiles(case, triton_backend, chunked_tiles):
    """sm_90's backward at D = 256, scaled down (`chunked_tiles`): each tile's programs write half of the
    head dim (D = 48 leaves the second half partly past D) and dK/dV's 16 x 32 tile computes its scores
    and dP key-major. Bias, padding, causality and dropout (0.25, through the documented draw) give the
    float64 gradients, the table's from the first chunk's programs alone."""
    p = 0.25
    leaves, mask = _random_inputs(case)
    torch.manual_seed(7)
    seed = int(draw_seed(p, torch.device(DEVICE)).item())  # the draw `attention_with_lse` makes
    keep = _philox_keep(seed, 2, 3, case["Lq"], case["Lk"], p)
    _check_dropout_against_float64(case, leaves, mask, keep, p, seed=7, floor=1.0)


@pytest.mark.parametrize("dropout_p,applied", [(0.1, 26 / 256), (0.25, 0.25), (0.3, 77 / 256), (0.001, 0.0),
                                               (0.999, 255 / 256)])  # fmt: skip
def test_triton_dropout_rate_is_the_nearest_multiple_of_1_256(dropout_p, applied, triton_backend):
    """The kernels draw bytes: p is rounded to 1/256 (T5's 0.1 drops 26 of 256) and the kept entries
    are scaled by 1 / (1 - the rate applied), so the output stays unbiased."""
    assert launch.quantized_dropout(dropout_p) == applied
    case = MASK_CASE
    leaves, mask = _random_inputs(case)
    probe, plain = _keep_mask(case, 3, dropout_p, leaves, mask)
    kept = probe > 0
    if applied == 0.0:
        assert torch.equal(probe, plain)
    else:
        assert_close(probe[kept], plain[kept] / (1 - applied), rel=1e-6, what="kept probabilities")


@pytest.mark.slow
def test_triton_dropout_gradient_matches_finite_differences(triton_backend):
    """Directional derivatives at a fixed seed: central differences with Richardson extrapolation."""
    case, p = DROPOUT_CASE, 0.3
    leaves, mask = _random_inputs(case, seed=3)
    g = torch.Generator().manual_seed(5)
    weights = torch.randn(2, 3, case["Lq"], case["D"], generator=g).to(DEVICE)

    def f(*inputs):
        torch.manual_seed(11)
        out = bucketed_attention(*inputs[:3], inputs[3], key_padding_mask=mask, dropout_p=p, **_kwargs(case))
        return (out.double() * weights.double()).sum()

    grads = torch.autograd.grad(f(*leaves), leaves)

    def central(i, direction, eps):
        with torch.no_grad():
            plus = [t + eps * direction if j == i else t for j, t in enumerate(leaves)]
            minus = [t - eps * direction if j == i else t for j, t in enumerate(leaves)]
            return (f(*plus) - f(*minus)) / (2 * eps)

    for i, name in enumerate("q k v bias_table".split()):
        direction = torch.randn(leaves[i].shape, generator=g).to(DEVICE)
        numeric = (4 * central(i, direction, 1e-2) - central(i, direction, 2e-2)) / 3
        analytic = (grads[i] * direction).sum().double()
        # fp32 rounding of f (~1e-5) over 2 eps leaves ~1e-3 of noise on derivatives of size ~10.
        assert abs(numeric - analytic) <= 1e-3 * max(abs(analytic.item()), 1.0), (name, numeric, analytic)


@pytest.mark.slow
def test_triton_dropout_mean_effect(triton_backend):
    """Averaged over seeds, attention with dropout is attention without it."""
    case = DROPOUT_CASE
    leaves, mask = _random_inputs(case, seed=4)
    args = [t.detach() for t in leaves]
    plain = bucketed_attention(*args[:3], args[3], key_padding_mask=mask, **_kwargs(case))
    torch.manual_seed(0)
    runs = 24
    mean = (
        sum(
            bucketed_attention(*args[:3], args[3], key_padding_mask=mask, dropout_p=0.2, **_kwargs(case))
            for _ in range(runs)
        )
        / runs
    )
    spread = (mean - plain).abs().mean() / plain.abs().mean()
    # Measured 0.077-0.092 over four seeds (24 runs of 1,440 outputs each); without the 1 / (1 - p)
    # rescaling it is 0.2.
    assert spread < 0.12, spread.item()


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 9), (64, 1000), (32, 33)])
def test_clamped_distances_keep_every_bucket(bidirectional, num_buckets, max_distance):

    cut, buckets = launch._clamped_buckets(num_buckets, max_distance, bidirectional)
    d = torch.arange(-4 * max_distance - 50, 4 * max_distance + 50)
    exact = relative_position_bucket(d, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(torch.tensor(buckets)[d.clamp(-cut, cut) + cut], exact)
    table = torch.randn(num_buckets, 3)
    assert torch.equal(
        distance_table(table, bidirectional=bidirectional, max_distance=max_distance), table[torch.tensor(buckets)].t()
    )


@pytest.mark.slow
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["plain", "dropout"])
def test_triton_op_traces_under_torch_compile(triton_backend, dropout_p):
    """The ops traced whole (the seed drawn on the device inside the graph): output and gradients
    bitwise those of eager mode at the same `torch.manual_seed`."""
    case = TRITON_CASES[2]
    leaves, mask = _random_inputs(case)

    def attend(q, k, v, table):
        return bucketed_attention(q, k, v, table, key_padding_mask=mask, dropout_p=dropout_p, **_kwargs(case))

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    out = compiled(*leaves)
    out.sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(3)
    eager = attend(*leaves)
    eager.sum().backward()
    assert torch.equal(out, eager)
    for g, t in zip(grads, leaves, strict=True):
        assert torch.equal(g, t.grad)


def test_triton_eager_path_is_the_custom_ops(triton_backend):
    """Eager mode runs the ops' forward and backward without the dispatcher (`_EagerAttention`); the
    ops, what torch.compile traces, give bitwise the same outputs, log-sum-exps and gradients, the
    table's and dropout's included, through the natural log-sum-exp that callers read."""
    from fastseq.kernels.bucketed_attention import op

    case = MASK_CASE
    leaves, mask = _random_inputs(case)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(2, case["Lq"], 3, case["D"], generator=g).to(DEVICE)
    w_lse = torch.randn(2, 3, case["Lq"], generator=g).to(DEVICE)
    results = []
    for forward in (op._eager, torch.ops.fastseq.bucketed_attention_fwd):
        table = distance_table(leaves[3], bidirectional=True, max_distance=12)
        seed = torch.tensor([12345], dtype=torch.int32, device=DEVICE)
        out, lse = forward(*leaves[:3], table, mask, seed, True, 0, 1.0, 0.25, -1, None, None)
        out = out.transpose(1, 2) if forward is op._eager else out  # as the op's, (B, Lq, H, D)
        lse = launch.natural_lse(lse)
        loss = (out * w_out).sum() + (lse.clamp(min=-1e4) * w_lse).sum()
        results.append((out, lse, *torch.autograd.grad(loss, leaves)))
    for name, a, b in zip("out lse q k v bias_table".split(), *results, strict=True):
        assert torch.equal(a, b), name


def test_triton_log_sum_exp_and_its_gradient_against_float64(triton_backend):
    """`attention_with_lse`: each row's natural log-sum-exp (-inf where no key is allowed) and the
    gradients of a loss on the output and the log-sum-exp, against float64 autograd from the definition:
    bias, padding, causal with a query offset, and a batch element whose keys are all padding."""
    from fastseq.kernels.bucketed_attention import attention_with_lse

    case = dict(Lq=20, Lk=24, D=16, causal=True, bidirectional=False, mask=True, q_offset=4, scale=0.5, bias=True)
    leaves, mask = _random_inputs(case)
    mask[1] = 0  # batch element 1 has no key
    g = torch.Generator().manual_seed(2)
    w_out = torch.randn(2, 3, 20, 16, generator=g).to(DEVICE)
    w_lse = torch.randn(2, 3, 20, generator=g).to(DEVICE)

    def loss(out, lse):
        return (out * w_out).sum() + (torch.where(torch.isinf(lse), 0.0, lse) * w_lse).sum()

    table = distance_table(leaves[3], bidirectional=False, max_distance=12)
    out, lse = attention_with_lse(*leaves[:3], table, key_padding_mask=mask, causal=True, q_offset=4, scale=0.5)
    grads = torch.autograd.grad(loss(out, lse), leaves)

    q, k, v, bias_table = (t.detach().double().requires_grad_() for t in leaves)
    allowed = _allowed(mask, case, 2, 20, 24, DEVICE)  # (B, 1, Lq, Lk)
    bias = relative_bias(bias_table, 20, 24, bidirectional=False, max_distance=12, q_offset=4)
    s = (q @ k.transpose(-1, -2) * 0.5 + bias).masked_fill(~allowed, float("-inf"))
    some = allowed.any(-1)  # (B, 1, Lq): rows with a key
    safe = s.masked_fill(~some[..., None], 0.0)
    ref_lse = torch.where(some, torch.logsumexp(safe, -1), float("-inf"))
    ref_out = (torch.softmax(safe, -1) * some[..., None]) @ v
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v, bias_table))

    assert torch.equal(torch.isinf(lse), ~some.expand_as(lse)) and (lse[torch.isinf(lse)] < 0).all()
    assert_close(lse[~torch.isinf(lse)], ref_lse[~torch.isinf(ref_lse)], rel=1e-5, what="log-sum-exp")
    assert_close(out, ref_out, rel=1e-5, what="out")
    for name, got, expected in zip(["q", "k", "v", "bias_table"], grads, ref_grads, strict=True):
        assert_close(got, expected, rel=2e-5, floor=1.0, what=f"grad of {name}")


@pytest.mark.parametrize("Lq,Lk", [(0, 5), (4, 0)], ids=["no-query", "no-key"])
def test_triton_no_query_or_no_key_gives_zero_gradients(Lq, Lk, triton_backend):
    """A call with no query or no key returns an empty or zero output and zero gradients (the table's
    too), as the reference does, without a launch."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(DEVICE).requires_grad_() for n in (Lq, Lk, Lk))
    table = torch.randn(8, 3, generator=g).to(DEVICE).requires_grad_()
    mask = torch.ones(2, Lk, dtype=torch.long, device=DEVICE)
    out = bucketed_attention(q, k, v, table, key_padding_mask=mask, causal=True, bidirectional=False, max_distance=12,
                             dropout_p=0.1)  # fmt: skip
    assert out.shape == (2, 3, Lq, 16) and not out.any()
    grads = torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out))
    for t, grad in zip((q, k, v, table), grads, strict=True):
        assert grad.shape == t.shape and not grad.any()


def test_triton_call_is_the_custom_ops(triton_backend):
    """`bucketed_attention` in eager mode (no log-sum-exp asked for: nothing converts the forward's for
    its backward) gives bitwise the outputs and gradients of the ops, with dropout, causality, padding and
    the table's gradient; with the table as a `PositionBias` and the mask as bool (what the models pass)
    too."""

    case = dict(MASK_CASE, causal=True, bidirectional=False)
    leaves, mask = _random_inputs(case)
    w_out = torch.randn(2, 3, case["Lq"], case["D"], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kwargs = dict(_kwargs(case), dropout_p=0.25)

    def ops():
        seed = draw_seed(0.25, torch.device(DEVICE))
        table = distance_table(leaves[3], bidirectional=False, max_distance=12)
        out, _ = torch.ops.fastseq.bucketed_attention_fwd(*leaves[:3], table, mask, seed, True, 0, 1.0, 0.25, -1,
                                                          None, None)  # fmt: skip
        return out.transpose(1, 2)

    def eager():
        return bucketed_attention(*leaves, key_padding_mask=mask, **kwargs)

    def prepared():
        bias = PositionBias(leaves[3], bidirectional=False, max_distance=12)
        return bucketed_attention(*leaves[:3], bias, key_padding_mask=mask != 0, **kwargs)

    results = []
    for attend in (ops, eager, prepared):
        torch.manual_seed(7)  # the same dropout seed
        out = attend()
        results.append((out, *torch.autograd.grad((out * w_out).sum(), leaves)))
    for other in results[1:]:
        for name, a, b in zip("out q k v bias_table".split(), results[0], other, strict=True):
            assert torch.equal(a, b), name


def test_position_bias_is_shared_and_checked(triton_backend):
    """One `PositionBias` serves several layers: each reads its padded table from the one copy made per
    tile, the layers' gradients add up in its distance table, and the table's gradient matches layers
    that each take the table; a call whose bucket settings differ from the bias's is refused."""
    case = dict(TRITON_CASES[2], bidirectional=True, causal=False)  # 33 tokens: three tiles a side
    leaves, mask = _random_inputs(case)
    q, k, v, table = leaves
    bias = PositionBias(table, bidirectional=True, max_distance=12)
    kwargs = dict(_kwargs(case), key_padding_mask=mask)
    out = bucketed_attention(bucketed_attention(q, k, v, bias, **kwargs), k, v, bias, **kwargs)
    assert len(bias._padded) == 1  # under the interpreter every kernel's tile is 16 x 16
    shared = torch.autograd.grad(out.sum(), leaves)
    out = bucketed_attention(bucketed_attention(q, k, v, table, **kwargs), k, v, table, **kwargs)
    separate = torch.autograd.grad(out.sum(), leaves)
    for name, a, b in zip("q k v bias_table".split(), shared, separate, strict=True):
        if name == "bias_table":  # the same sums, added up in another order
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="bidirectional=True, max_distance=12"):
        bucketed_attention(q, k, v, bias, bidirectional=False, max_distance=12)
    with pytest.raises(ValueError, match="bias_table must be"):
        bucketed_attention(q[:, :2], k[:, :2], v[:, :2], bias, max_distance=12)


def test_triton_custom_op_passes_opcheck(triton_backend):

    case = TRITON_CASES[1]
    leaves, mask = _random_inputs(case)
    table = distance_table(leaves[3].detach(), bidirectional=True, max_distance=12).requires_grad_()
    args = (*leaves[:3], table, mask, None, False, 0, 1.0, 0.0, -1, None, None)
    torch.library.opcheck(torch.ops.fastseq.bucketed_attention_fwd.default, args)
    ids = _segment_ids([[3, 4], [7]], case["Lq"]).to(DEVICE)
    args = (*leaves[:3], table, None, None, False, 0, 1.0, 0.0, -1, ids, ids)
    torch.library.opcheck(torch.ops.fastseq.bucketed_attention_fwd.default, args)


def test_triton_refuses_what_it_cannot_run(triton_backend):
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="float64"):
        bucketed_attention(q, q, q)


def test_triton_takes_a_large_max_distance(triton_backend):
    """The backward keeps its per-distance gradients in memory, not in registers: a table over
    10,000 clamped distances runs, and matches the reference, gradients of the table included."""
    g = torch.Generator().manual_seed(9)
    leaves = [torch.randn(1, 2, 7, 8, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]
    leaves.append(torch.randn(32, 2, generator=g).to(DEVICE).requires_grad_())
    kwargs = dict(bidirectional=False, max_distance=5000, causal=True)
    out = bucketed_attention(*leaves, **kwargs)
    expected = bucketed_attention_reference(*leaves, **kwargs)
    assert_close(out, expected, what="out")
    weights = torch.randn(out.shape, generator=g).to(DEVICE)
    for name, got, want in zip("q k v bias_table".split(), torch.autograd.grad((out * weights).sum(), leaves),
                               torch.autograd.grad((expected * weights).sum(), leaves), strict=True):  # fmt: skip
        assert_close(got, want, what=name)


CUDA_CASES = [
    dict(Lq=1000, Lk=1000, D=64, causal=False, bidirectional=True, mask=True, q_offset=0, scale=1.0, bias=True),
    dict(Lq=777, Lk=777, D=128, causal=True, bidirectional=False, mask=True, q_offset=0, scale=1.0, bias=True),
    dict(Lq=1, Lk=513, D=64, causal=True, bidirectional=False, mask=False, q_offset=512, scale=1.0, bias=True),
    dict(Lq=300, Lk=129, D=32, causal=False, bidirectional=True, mask=True, q_offset=0, scale=0.2, bias=False),
]


def test_float32_on_a_gpu_takes_pytorchs_attention():
    """The kernels take 16-bit inputs on a GPU (65 of their 195 fp32 builds spilled); float32 there
    is PyTorch's attention in fp32, with the reason said when the kernels are forced."""
    from types import SimpleNamespace

    from fastseq.kernels.bucketed_attention import unsupported_inputs

    def gpu(dtype, D=64):
        return SimpleNamespace(dtype=dtype, is_cuda=True, shape=(2, 3, 5, D))

    assert "float32 on a GPU" in unsupported_inputs(gpu(torch.float32))
    assert unsupported_inputs(gpu(torch.bfloat16)) is None and unsupported_inputs(gpu(torch.float16)) is None
    assert unsupported_inputs(torch.randn(2, 3, 5, 64)) is None  # the interpreter runs fp32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float32_runs_the_reference(monkeypatch):
    leaves, mask = _random_inputs(CUDA_CASES[0])
    monkeypatch.setenv("FASTSEQ_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match="float32 on a GPU"):
        _run(leaves, mask, CUDA_CASES[0], torch.ones(2, 3, 1000, 64, device=DEVICE))
    monkeypatch.setenv("FASTSEQ_BACKEND", "auto")
    monkeypatch.setattr("fastseq.kernels._backend._WARNED", set())
    with pytest.warns(UserWarning, match="bucketed_attention runs its PyTorch reference for float32 on a GPU"):
        out, _ = _run(leaves, mask, CUDA_CASES[0], torch.ones(2, 3, 1000, 64, device=DEVICE))
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    expected, _ = _run(leaves, mask, CUDA_CASES[0], torch.ones(2, 3, 1000, 64, device=DEVICE))
    assert torch.equal(out, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "Lq{Lq}-Lk{Lk}-D{D}-causal{causal}".format(**c))
def test_cuda_kernel_at_real_tile_sizes(case, dtype, triton_backend):
    """The compiled kernel with its GPU tiles (128 x 64 and 64 x 64), against float64 on the GPU."""
    leaves, mask = _random_inputs(case, dtype=dtype)
    grad_out = torch.randn(2, 3, case["Lq"], case["D"], device=DEVICE).to(dtype)
    kwargs = dict(_kwargs(case), key_padding_mask=mask)
    out, grads = _run(leaves, mask, case, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    table = ref_leaves[3] if case["bias"] else None
    expected = bucketed_attention_reference(*ref_leaves[:3], table, **kwargs)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out.double())
    t_out, t_grads = _torch_in_dtype(leaves, mask, case, grad_out)
    for name, got, torch_got, exact in zip(
        ["out", "q", "k", "v", "bias_table"], (out, *grads), (t_out, *t_grads), (expected, *ref_grads), strict=False
    ):
        err = (got.double() - exact).abs().max().item()
        torch_err = (torch_got.double() - exact).abs().max().item()
        slack = 0.0 if name == "out" else torch.finfo(dtype).eps * exact.abs().max().item()
        assert err <= 2 * torch_err + slack, f"{name}: {err:.3e} vs torch {torch_err:.3e} (+{slack:.1e})"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("D, packed", [(64, False), (128, False), (64, True)], ids=["D64", "D128", "D64-packed"])
def test_cuda_t5_training_call_with_dropout_at_real_tiles(D, packed, triton_backend):
    """T5's training call with the GPU's tiles, bf16: bias, causal, dropout 0.1 and padding (or packed rows,
    which the kernels read as segment ids). The mask is the documented draw (`_philox_keep` of the call's
    seed) and the backward regenerates it: output and gradients within twice PyTorch's own bf16 error
    (through that mask) of float64, the gradients one unit of bf16 more (as at real tiles without dropout)."""
    dtype, p, L = torch.bfloat16, launch.quantized_dropout(0.1), 300
    case = dict(Lq=L, Lk=L, D=D, causal=True, bidirectional=False, mask=True, q_offset=0, scale=1.0, bias=True)
    leaves, mask = _random_inputs(case, dtype=dtype)
    grad_out = torch.randn(2, 3, L, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    allowed = _allowed(mask, case, 2, L, L, DEVICE)
    extra = dict(dropout_p=0.1)
    if packed:
        ids = _segment_ids([[150, 1, 90, 40], [17, 283]], L).to(DEVICE)  # 19 padding rows at the end of row 0
        mask, extra = None, dict(extra, q_segment_ids=ids, k_segment_ids=ids)
        same = (ids[:, :, None] == ids[:, None, :]) & (ids > 0)[:, :, None]  # a real query and its segment's keys
        allowed = _allowed(None, case, 2, L, L, DEVICE) & same[:, None]
    torch.manual_seed(7)
    out, grads = _run(leaves, mask, case, grad_out, **extra)
    torch.manual_seed(7)
    seed = int(draw_seed(0.1, torch.device(DEVICE)).item())  # the draw the call made
    keep = _philox_keep(seed, 2, 3, L, L, p).to(DEVICE)
    exact, exact_grads = _written_out(leaves, allowed, keep, p, case, grad_out, exact=True)
    t_out, t_grads = _written_out(leaves, allowed, keep, p, case, grad_out, exact=False)
    for name, got, torch_got, ref in zip(
        ["out", "q", "k", "v", "bias_table"], (out, *grads), (t_out, *t_grads), (exact, *exact_grads), strict=True
    ):
        err = (got.cpu().double() - ref).abs().max().item()
        torch_err = (torch_got.cpu().double() - ref).abs().max().item()
        slack = 0.0 if name == "out" else torch.finfo(dtype).eps * ref.abs().max().item()
        assert err <= 2 * torch_err + slack, f"{name}: {err:.3e} vs torch {torch_err:.3e} (+{slack:.1e})"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_draw_a_new_dropout_mask_each_time():
    """A CUDA graph that captures the attention with dropout, forward and backward, draws the seed on the
    device at every replay (`draw_seed`): two replays draw different seeds, and each replay's output and
    gradients are bitwise those of an eager call with the seed that replay drew."""
    case = dict(Lq=300, Lk=300, D=64, causal=True, bidirectional=False, mask=True, q_offset=0, scale=1.0, bias=True)
    leaves, mask = _random_inputs(case, dtype=torch.bfloat16)  # T5's training call: the builds of the test above
    q, k, v = (t.detach() for t in leaves[:3])
    table = distance_table(leaves[3].detach().float(), bidirectional=False, max_distance=12)
    grad_out = torch.randn_like(q)
    args = (True, 0, 1.0, 0.1)  # causal, q_offset, scale, dropout_p

    def step(seed=None):
        seed = draw_seed(0.1, q.device) if seed is None else seed
        out, lse = launch.attention_forward(q, k, v, table, mask, seed, *args)
        dq, dk, dv, ddt, *_ = launch.attention_backward(grad_out, q, k, v, out, lse, table, mask, seed, *args)
        return seed, (out, dq, dk, dv, ddt)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiled and cached before the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seed, results = step()
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append((seed.clone(), [t.clone() for t in results]))
    assert not torch.equal(replays[0][0], replays[1][0])
    assert not torch.equal(replays[0][1][0], replays[1][1][0])
    for drawn, got in replays:
        _, expected = step(drawn)
        for name, a, b in zip(("out", "dq", "dk", "dv", "ddt"), got, expected, strict=True):
            assert torch.equal(a, b), name


def test_launchers_refuse_a_batch_element_past_32_bit_offsets():
    """Only the batch offsets are 64-bit in the kernels: a tensor whose one batch element spans 2**31
    elements is refused with the reason, while any number of smaller batch elements is taken."""

    q = torch.empty(2, 3, 2**15, 2**15, dtype=torch.bfloat16, device="meta")  # 3 * 2**30 elements per batch element
    with pytest.raises(ValueError, match=r"2\*\*31 per batch element"):
        launch.attention_forward(q, q, q, None, None, None, False, 0, 1.0, 0.0)
    launch._check_batch_span(torch.empty(2, 2, 2**15, 2**15, device="meta"))  # the largest offset is 2**31 - 1
    launch._check_batch_span(torch.empty(2**24, 8, 128, 64, device="meta"))  # 2**40 elements in all


# ---------------------------------------------------------------------------------------------
# Packed rows: segment ids
# ---------------------------------------------------------------------------------------------


def _segment_ids(rows: list[list[int]], length: int) -> torch.Tensor:
    """`(B, length)` ids of rows packed with segments of the given lengths (1, 2, ... then 0 padding)."""
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for b, lengths in enumerate(rows):
        start = 0
        for segment, n in enumerate(lengths, start=1):
            out[b, start : start + n] = segment
            start += n
    return out


# Self-attention of the encoder (bias, bidirectional) and the decoder (bias, causal), and
# cross-attention (no bias, other ids on the key side): segments of odd lengths, shorter and longer
# than a tile (16 under the interpreter), a one-token segment, padding at the end of a row.
PACKED_CASES = {
    "encoder": dict(q=[[20, 13, 9], [3, 30, 1, 10]], k=None, L=(50, 50), causal=False, bidirectional=True, bias=True),
    "decoder": dict(q=[[17, 1, 16], [5, 40]], k=None, L=(47, 47), causal=True, bidirectional=False, bias=True),
    "cross": dict(q=[[9, 2, 10], [6, 6, 6, 3]], k=[[30, 5, 7], [10, 1, 16, 3]], L=(23, 42), causal=False,
                  bidirectional=True, bias=False),
}  # fmt: skip


def _packed_inputs(case, *, seed=0):
    Lq, Lk = case["L"]
    q_ids = _segment_ids(case["q"], Lq)
    k_ids = q_ids if case["k"] is None else _segment_ids(case["k"], Lk)
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk)]
    if case["bias"]:
        leaves.append(torch.randn(8, 3, generator=g, dtype=torch.float64))
    kwargs = dict(bidirectional=case["bidirectional"], max_distance=12, causal=case["causal"])
    return leaves, q_ids, k_ids, kwargs


def _attend(leaves, q_ids, k_ids, kwargs, weights, fn=bucketed_attention):
    table = leaves[3] if len(leaves) == 4 else None
    out = fn(*leaves[:3], table, q_segment_ids=q_ids, k_segment_ids=k_ids, **kwargs)
    return out, torch.autograd.grad((out * weights).sum(), leaves)


@pytest.mark.parametrize("name", PACKED_CASES)
def test_packed_rows_are_the_examples_unpacked(name):
    """The reference on packed rows gives each example exactly what it gives the example alone
    (float64), gradients of the bias table included: the bias over row positions is exact."""
    case = PACKED_CASES[name]
    leaves, q_ids, k_ids, kwargs = _packed_inputs(case)
    leaves = [t.requires_grad_() for t in leaves]
    packed = bucketed_attention_reference(*leaves[:3], leaves[3] if case["bias"] else None, q_segment_ids=q_ids,
                                          k_segment_ids=k_ids, **kwargs)  # fmt: skip
    table_grad = torch.zeros(8, 3, dtype=torch.float64)
    for b in range(2):
        for segment in range(1, len(case["q"][b]) + 1):
            rows, keys = (q_ids[b] == segment).nonzero()[:, 0], (k_ids[b] == segment).nonzero()[:, 0]
            q, k, v = leaves[0][b : b + 1, :, rows], leaves[1][b : b + 1, :, keys], leaves[2][b : b + 1, :, keys]
            alone = bucketed_attention_reference(q, k, v, leaves[3] if case["bias"] else None, **kwargs)
            assert_close(packed[b : b + 1, :, rows], alone, rel=1e-12, what=f"row {b} segment {segment}")
            if case["bias"]:
                table_grad += torch.autograd.grad(alone.sum(), leaves[3])[0]
    pad = q_ids == 0
    assert packed.permute(0, 2, 1, 3)[pad].abs().max() == 0  # padding queries attend nothing
    if case["bias"]:
        assert_close(torch.autograd.grad(packed.sum(), leaves[3])[0], table_grad, rel=1e-12, what="bias table")


@pytest.mark.parametrize("tiles", ["interpreter", "head-chunks"])
@pytest.mark.parametrize("name", PACKED_CASES)
def test_triton_packed_rows_against_float64(name, tiles, triton_backend, request):
    """Packed rows against float64, on the interpreter's tiles and on tiles written in chunks of the
    head dim (`chunked_tiles`: a key tile's span of queries is read by its tile, not its program)."""
    if tiles == "head-chunks":
        request.getfixturevalue("chunked_tiles")
    case = PACKED_CASES[name]
    leaves, q_ids, k_ids, kwargs = _packed_inputs(case)
    weights = torch.randn(2, 3, case["L"][0], 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected, ref_grads = _attend([t.requires_grad_() for t in leaves], q_ids, k_ids, kwargs, weights,
                                  bucketed_attention_reference)  # fmt: skip
    got_leaves = [t.detach().float().to(DEVICE).requires_grad_() for t in leaves]
    out, grads = _attend(got_leaves, q_ids.to(DEVICE), k_ids.to(DEVICE), kwargs, weights.float().to(DEVICE))
    assert_close(out.cpu(), expected, rel=1e-5, what="out")
    for what, g, r in zip(["q", "k", "v", "bias_table"], grads, ref_grads, strict=False):
        assert_close(g.cpu(), r, rel=2e-5, floor=1.0, what=f"grad of {what}")


def test_triton_never_reads_tiles_the_segments_do_not_meet(triton_backend):
    """Cross-attention where the keys hold a segment that no query has, in whole tiles: their keys
    and values are NaN, so a kernel that loaded any of them (forward, dQ or dK/dV) would give NaN."""
    case = dict(PACKED_CASES["cross"], q=[[9, 14], [23]], k=[[5, 11, 32, 16], [17, 15, 32]], L=(23, 64))
    leaves, q_ids, k_ids, kwargs = _packed_inputs(case)
    unmet = (k_ids == 3) | ((k_ids == 4) & (torch.arange(64) >= 48))  # keys 16..47 (segment 3), 48..63
    assert unmet.view(2, 4, 16).all(-1).sum() >= 3  # whole tiles of 16 keys
    for t in leaves[1:3]:
        t.permute(0, 2, 1, 3)[unmet] = float("nan")
    got_leaves = [t.float().to(DEVICE).requires_grad_() for t in leaves]
    weights = torch.randn(2, 3, 23, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, grads = _attend(got_leaves, q_ids.to(DEVICE), k_ids.to(DEVICE), kwargs, weights)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    clean = [t.nan_to_num(0.0) for t in leaves]
    expected, _ = _attend([t.requires_grad_() for t in clean], q_ids, k_ids, kwargs, weights.double().cpu(),
                          bucketed_attention_reference)  # fmt: skip
    assert_close(out.detach().cpu(), expected, rel=1e-5, what="out")
    assert grads[1].cpu().permute(0, 2, 1, 3)[unmet].abs().max() == 0


def test_segment_spans_bound_each_tile():
    """Each tile's span holds every column its rows meet and, for contiguous segments, no more; a
    tile of padding meets nothing; ids that repeat apart or exceed the length are still covered."""

    rows = torch.tensor([[1, 1, 1, 2, 2, 2, 0, 0], [5, 5, 1, 1, 99, 99, 1, 1]], dtype=torch.int32)
    cols = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 99, 5, 5, 1, 7]], dtype=torch.int32)
    spans = launch._segment_spans(rows, cols, 3)  # (B, 2, tiles): [lo, hi) per tile of 3 rows
    assert spans[0].tolist() == [[0, 2, 6], [2, 5, 0]]
    for b in range(2):
        for tile in range(3):
            lo, hi = spans[b, :, tile].tolist()
            met = [
                j
                for j in range(6)
                for i in range(3 * tile, min(3 * tile + 3, 8))
                if rows[b, i] > 0 and rows[b, i] == cols[b, j]
            ]
            assert all(lo <= j < hi for j in met), (b, tile, lo, hi, met)


def test_segment_ids_come_in_pairs_of_the_right_shape():
    q = torch.randn(2, 1, 5, 4)
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="both q_segment_ids and k_segment_ids"):
        bucketed_attention(q, q, q, q_segment_ids=ids)
    with pytest.raises(ValueError, match=r"k_segment_ids must be integer \(B=2, Lk=5\)"):
        bucketed_attention(q, q, q, q_segment_ids=ids, k_segment_ids=ids[:, :4])
    with pytest.raises(ValueError, match="q_segment_ids must be integer"):
        bucketed_attention(q, q, q, q_segment_ids=ids.float(), k_segment_ids=ids)
