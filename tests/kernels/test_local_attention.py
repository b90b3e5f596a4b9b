"""local_attention and global_aggregate against transformers' LongT5 and a dense float64 definition."""

from __future__ import annotations

import pytest
import torch
from fastseq.kernels import bucketed_attention, global_aggregate, global_block_ids, local_attention
from fastseq.kernels.bucketed_attention import relative_position_bucket


def _masks(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    if L > 3:
        mask[0, L - 3 :] = 0
    if B > 1 and L > 6:
        mask[1, 2:5] = 0
    if B > 2:
        mask[2] = (torch.rand(L, generator=g) > 0.3).long()
    return mask


@pytest.mark.parametrize("L,block_size", [(1, 4), (3, 4), (4, 4), (23, 4), (37, 5), (64, 16), (50, 3)])
def test_block_ids_and_aggregates_match_transformers(L, block_size):
    from transformers.models.longt5.modeling_longt5 import _create_global_aggregates, _make_global_fixed_block_ids

    mask = _masks(3, L)
    ids, segments = _make_global_fixed_block_ids(mask, block_size)
    got_ids, valid = global_block_ids(mask, block_size)
    assert torch.equal(got_ids, ids.long())
    assert torch.equal(valid, segments.bool())
    hidden = torch.randn(3, L, 8, dtype=torch.float64)
    expected = _create_global_aggregates(hidden, ids, L // block_size)
    assert torch.allclose(global_aggregate(hidden, mask, block_size), expected)


def test_aggregate_gradient():
    hidden = torch.randn(2, 23, 4, dtype=torch.float64, requires_grad=True)
    mask = _masks(2, 23)
    assert torch.autograd.gradcheck(lambda h: global_aggregate(h, mask, 4), (hidden,))


def _dense(q, k, v, table, radius, mask, gk=None, gv=None, gtable=None, gbs=None):
    """Local attention is dense attention with a band mask |i - j| <= radius; globals are extra keys."""
    B, H, L, D = q.shape
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    band = (i - j).abs() <= radius
    s = torch.einsum("bhqd,bhkd->bhqk", q, k)
    buckets = relative_position_bucket(j - i, bidirectional=True, num_buckets=table.shape[0], max_distance=20)
    s = s + table[buckets].permute(2, 0, 1)[None]
    ok = band[None, None] & mask.bool()[:, None, None, :]
    if gk is not None:
        ids, valid = global_block_ids(mask, gbs)
        G = gk.shape[2]
        side = torch.einsum("bhqd,bhgd->bhqg", q, gk)
        rel = torch.arange(G)[None, None, :] - ids[:, :, None]
        b = relative_position_bucket(rel, bidirectional=True, num_buckets=gtable.shape[0], max_distance=20)
        side = side + gtable[b].permute(0, 3, 1, 2)
        s = torch.cat([s, side], -1)
        ok = torch.cat([ok.expand(B, 1, L, L), valid[:, None, None, :].expand(B, 1, L, G)], -1)
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bhkd->bhqd", p[..., :L], v)
    if gk is not None:
        out = out + torch.einsum("bhqg,bhgd->bhqd", p[..., L:], gv)
    return out


@pytest.mark.parametrize("L,radius", [(1, 3), (5, 3), (4, 3), (11, 3), (23, 3), (40, 7)])
@pytest.mark.parametrize("with_globals", [False, True])
def test_reference_against_dense_definition(L, radius, with_globals):
    g = torch.Generator().manual_seed(L)
    B, H, D, gbs = 3, 2, 8, 4
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = torch.randn(16, H, generator=g, dtype=torch.float64, requires_grad=True)
    mask = _masks(B, L)
    leaves = [q, k, v, table]
    extra = {}
    if with_globals:
        G = L // gbs
        gk, gv = (torch.randn(B, H, G, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        gtable = torch.randn(16, H, generator=g, dtype=torch.float64, requires_grad=True)
        leaves += [gk, gv, gtable]
        extra = dict(global_k=gk, global_v=gv, global_bias_table=gtable, global_block_size=gbs)
    expected = _dense(
        q, k, v, table, radius, mask, extra.get("global_k"), extra.get("global_v"), extra.get("global_bias_table"), gbs
    )
    got = local_attention(q, k, v, table, radius=radius, max_distance=20, key_padding_mask=mask, **extra)
    keep = mask.bool()[:, None, :, None].expand_as(got)  # padded queries are unspecified
    assert torch.allclose(got[keep], expected[keep], atol=1e-10)
    grad_out = torch.randn_like(got) * keep
    grads = torch.autograd.grad(got, leaves, grad_out)
    for a, b in zip(grads, torch.autograd.grad(expected, leaves, grad_out), strict=True):
        assert torch.allclose(a, b, atol=1e-9)


def test_matches_dense_bucketed_attention_without_mask():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    table = torch.randn(16, 2, dtype=torch.float64)
    # A radius covering the whole sequence is plain bidirectional attention.
    assert torch.allclose(
        local_attention(q, k, v, table, radius=20, max_distance=20), bucketed_attention(q, k, v, table, max_distance=20)
    )


def test_shapes_are_checked():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="global_k and global_v must be"):
        local_attention(
            q, q, q, None, global_k=torch.randn(1, 2, 3, 4), global_v=torch.randn(1, 2, 3, 4), global_block_size=4
        )
    with pytest.raises(ValueError, match="pass both global_k and global_v"):
        local_attention(q, q, q, None, global_k=torch.randn(1, 2, 2, 4))
