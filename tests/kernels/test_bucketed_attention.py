"""bucketed_attention: T5's buckets, the bias, masks and gradients of the reference."""

from __future__ import annotations

import pytest
import torch
from fastseq.kernels import bucketed_attention, relative_position_bucket
from fastseq.kernels.bucketed_attention import relative_bias


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

    config = T5Config(num_heads=3, relative_attention_num_buckets=16, relative_attention_max_distance=20,
                      is_decoder=is_decoder)
    attn = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    Lq, Lk = (1, past + 1) if past else (29, 31)
    expected = attn.compute_bias(Lq, Lk, past_seen_tokens=past)[0]
    got = relative_bias(attn.relative_attention_bias.weight, Lq, Lk, bidirectional=not is_decoder,
                        max_distance=20, q_offset=past)
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
            buckets = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=table.shape[0],
                                               max_distance=max_distance)
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
    kw = dict(bidirectional=case["bidirectional"], max_distance=20, causal=case["causal"], q_offset=case["q_offset"],
              scale=case["scale"])
    inputs = [q, k, v] + ([table] if with_bias else [])
    expected = _dense_reference(q, k, v, table, mask=mask, **kw)
    got = bucketed_attention(*(t.float().detach().requires_grad_() for t in (q, k, v)),
                             table.float().detach().requires_grad_() if with_bias else None,
                             key_padding_mask=mask, **kw)
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
