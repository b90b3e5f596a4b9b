"""Every op under autocast: inputs cast as torch casts a matmul's (floating, not fp64, to autocast's
dtype), the T5 bias and the softmax in fp32 as in `transformers`, the output dtype torch's own
composition gives, gradients in each input's own dtype, and the Triton kernels (the interpreter on
the CPU) as accurate as PyTorch. On the CPU, CPU autocast applies CUDA's casts; on a GPU (the
harvest runs the tests marked `cuda`) the same test runs CUDA autocast and the compiled kernels.

The reference backend under autocast is defined as the reference on the cast inputs with autocast
off, asserted bit for bit. Accuracy, as STYLE.md measures it: against float64 on the values autocast
computes with (the cast inputs), the Triton kernels' output and every gradient are at most twice the
error of PyTorch's own composition (the reference function run directly under autocast, which rounds
where torch's autocast rounds: the scores and the probabilities in bf16, as `transformers` does; for
the global aggregates `transformers`' einsum, for the fused loss its LM head and `cross_entropy`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastseq.kernels import (
    bucketed_attention,
    gated_ffn,
    gated_gelu,
    global_aggregate,
    linear_cross_entropy,
    local_attention,
    relu_ffn,
    rms_norm,
)
from fastseq.kernels._backend import interpreting
from fastseq.kernels.bucketed_attention import bucketed_attention_reference, distance_table
from fastseq.kernels.gated_gelu import gated_ffn_reference, gated_gelu_reference, relu_ffn_reference
from fastseq.kernels.global_aggregate import global_block_ids
from fastseq.kernels.local_attention import local_attention_reference
from fastseq.kernels.rms_norm import rms_norm_reference
from tests.conftest import DEVICE

BF16 = torch.bfloat16
# Twice PyTorch's error on a GPU. The interpreter converts fp32 to bf16 by truncation where a GPU
# rounds to nearest (about half of all conversions differ, for Triton 3.6 and 3.9 alike), which
# doubles the error of every bf16 value a kernel stores; so twice that under the interpreter.
FACTOR = 4.0 if interpreting() else 2.0


def _randn(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def _mask(B, L):
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, L - 3 :] = 0
    mask[-1, 2:5] = 0
    return mask.to(DEVICE)


def _qkv(B=2, H=3, L=37, D=16):
    return [_randn(B, H, L, D, seed=s) for s in (1, 2, 3)]


def _bucketed(causal):
    mask = _mask(2, 37)

    def run(op, q, k, v, table):
        return op(q, k, v, table, bidirectional=not causal, max_distance=20, causal=causal, key_padding_mask=mask)

    return run, [*_qkv(), _randn(16, 3, seed=4)], {0, 1, 2}


def _local(op, q, k, v, table, gk, gv, gtable):
    return op(q, k, v, table, radius=5, max_distance=20, key_padding_mask=_mask(2, 37), global_k=gk, global_v=gv,
              global_bias_table=gtable, global_block_size=4)  # fmt: skip


def _lce(op, h, w, b):
    labels = torch.randint(0, 97, (3 * 11,), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    labels[-2:] = -100
    return op(h.reshape(-1, h.shape[-1]), w, labels, bias=b)


def _head_and_loss(hidden, weight, labels, *, bias):
    """The LM head and the loss as `transformers` computes them: logits, then `cross_entropy`."""
    return F.cross_entropy(F.linear(hidden, weight) + bias, labels, ignore_index=-100)


def _einsum_aggregate(hidden, key_padding_mask, block_size):
    """LongT5's global aggregates as `transformers` computes them: an einsum with the one-hot block ids."""
    block_ids, _ = global_block_ids(key_padding_mask, block_size)  # (B, L), -1 in no block
    G = hidden.shape[1] // block_size
    one_hot = F.one_hot(torch.where(block_ids >= 0, block_ids, G), G + 1)[..., :G]  # (B, L, G)
    return torch.einsum("...nd,...ng->...gd", hidden, one_hot.to(hidden.dtype))


# op -> (public function, its reference, builder: (run, inputs, the inputs autocast casts), output dtype
# under bf16 autocast with fp32 inputs, as torch's own composition gives it)
OPS = {
    "bucketed_attention": (bucketed_attention, bucketed_attention_reference, lambda: _bucketed(False), BF16),
    "bucketed_attention_causal": (bucketed_attention, bucketed_attention_reference, lambda: _bucketed(True), BF16),
    "local_attention": (local_attention, local_attention_reference, lambda: (
        _local, [*_qkv(), _randn(16, 3, seed=4), *_qkv(L=9)[:2], _randn(16, 3, seed=7)], {0, 1, 2, 4, 5}), BF16),
    "gated_ffn": (gated_ffn, gated_ffn_reference, lambda: (
        lambda op, *a: op(*a), [_randn(3, 7, 32, seed=1), *(_randn(48, 32, seed=s, scale=0.2) for s in (2, 3)),
                                _randn(32, 48, seed=4, scale=0.2)], {0, 1, 2, 3}), BF16),
    "relu_ffn": (relu_ffn, relu_ffn_reference, lambda: (
        lambda op, *a: op(*a), [_randn(3, 7, 32, seed=1), _randn(48, 32, seed=2, scale=0.2),
                                _randn(32, 48, seed=4, scale=0.2)], {0, 1, 2}), BF16),
    # autocast's cross_entropy runs in fp32
    "linear_cross_entropy": (linear_cross_entropy, _head_and_loss, lambda: (
        _lce, [_randn(3, 11, 32, seed=1), _randn(97, 32, seed=2, scale=0.3), _randn(97, seed=3)], {0, 1, 2}),
        torch.float32),
    # T5LayerNorm: fp32 variance, and fp32 * fp32 stays fp32; autocast casts nothing
    "rms_norm": (rms_norm, rms_norm_reference, lambda: (
        lambda op, x, w: op(x, w, 1e-6), [_randn(3, 7, 32, seed=1), _randn(32, seed=2)], set()), torch.float32),
    # transformers sums the blocks with an einsum, which autocast runs in bf16
    "global_aggregate": (global_aggregate, _einsum_aggregate, lambda: (
        lambda op, h: op(h, _mask(2, 37), 4), [_randn(2, 37, 32, seed=1)], {0}), BF16),
    # elementwise: autocast casts nothing
    "gated_gelu": (gated_gelu, gated_gelu_reference, lambda: (
        lambda op, g, u: op(g, u), [_randn(5, 48, seed=1), _randn(5, 48, seed=2)], set()), torch.float32),
}  # fmt: skip


def _run(run, op, inputs, *, autocast: bool, backend: str, monkeypatch):
    """The output and the gradient of every input for a fixed random upstream gradient."""
    monkeypatch.setenv("FASTSEQ_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast(DEVICE, dtype=BF16, enabled=autocast):
        out = run(op, *leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(DEVICE)
    (out.to(torch.float64) * weights).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return (got.double() - truth).abs().max().item() / truth.abs().max().clamp(min=1e-30).item()


@pytest.mark.cuda
@pytest.mark.parametrize("op", list(OPS))
def test_autocast_casts_as_torch_and_the_kernels_follow(op, monkeypatch):
    public, reference, build, out_dtype = OPS[op]
    run, inputs, cast = build()
    out, grads = _run(run, public, inputs, autocast=True, backend="reference", monkeypatch=monkeypatch)
    assert out.dtype == out_dtype
    for t, g in zip(inputs, grads, strict=True):
        assert g.dtype == t.dtype  # fp32 parameters get fp32 gradients

    # The reference backend under autocast: the reference on the cast inputs, autocast off.
    casted = [t.to(BF16) if i in cast else t for i, t in enumerate(inputs)]
    plain, plain_grads = _run(run, public, casted, autocast=False, backend="reference", monkeypatch=monkeypatch)
    assert torch.equal(out, plain)
    for i, (g, pg) in enumerate(zip(grads, plain_grads, strict=True)):
        assert torch.equal(g, pg.to(g.dtype)), i

    # Accuracy against float64 on the values autocast computes with.
    truth, truth_grads = _run(run, reference, [t.double() for t in casted], autocast=False, backend="reference",
                              monkeypatch=monkeypatch)  # fmt: skip
    torch_out, torch_grads = _run(run, reference, inputs, autocast=True, backend="reference", monkeypatch=monkeypatch)
    got, got_grads = _run(run, public, inputs, autocast=True, backend="triton", monkeypatch=monkeypatch)
    assert got.dtype == out_dtype
    triples = zip(got_grads, torch_grads, truth_grads, strict=True)
    pairs = [("output", got, torch_out, truth)] + [(f"gradient of input {i}", *t) for i, t in enumerate(triples)]
    for what, ours, theirs, exact in pairs:
        # 2^-24: for a computation that PyTorch does exactly in fp32 (nothing cast), fp32 rounding
        ours_err, torch_err = _error(ours, exact), _error(theirs, exact)
        assert ours_err <= FACTOR * max(torch_err, 2.0**-24), f"{op} {what}: {ours_err:.2e}, PyTorch's {torch_err:.2e}"


def test_the_position_bias_stays_fp32_under_autocast():
    """transformers adds T5's bias in fp32; rounded to bf16 it would move scores by up to 0.08."""
    table = torch.randn(32, 4, generator=torch.Generator().manual_seed(0)) * 3
    expected = distance_table(table, bidirectional=True, max_distance=128)
    with torch.autocast("cpu", dtype=BF16):
        got = distance_table(table, bidirectional=True, max_distance=128)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_the_table_gradient_is_declared_fp32_for_a_half_table():
    """The fake kernel (torch.compile's view of the op) gives the table's gradient the dtype the real op
    returns: fp32, whatever the table's dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 5, 16, dtype=BF16)
        table = torch.empty(2, 41, dtype=BF16)
        out, lse = torch.ops.fastseq.bucketed_attention_fwd(q, q, q, table, None, None, False, 0, 1.0, 0.0, -1)
        grads = torch.ops.fastseq.bucketed_attention_bwd(
            out, q, q, q, out, lse, None, table, None, None, False, 0, 1.0, 0.0, -1
        )
    assert grads[3].dtype == torch.float32 and tuple(grads[3].shape) == (2, 41)
