"""local_attention and global_aggregate against transformers' LongT5 and a dense float64 definition."""

from __future__ import annotations

import pytest
import torch

from fastseq.kernels import bucketed_attention, global_aggregate, global_block_ids, local_attention
from fastseq.kernels.bucketed_attention import relative_position_bucket
from tests.conftest import DEVICE, assert_close


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


# ---------------------------------------------------------------------------------------------
# The Triton path: the attention kernel with a key window, merged with the global tokens
# ---------------------------------------------------------------------------------------------

RADIUS, GLOBAL_BLOCK = 3, 2


def _triton_case(L, with_globals, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, D = 3, 2, 8
    leaves = [torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3)]
    leaves += [torch.randn(8, H, generator=g, dtype=torch.float64) for _ in range(2)]  # local, global tables
    if with_globals:
        leaves += [torch.randn(B, H, L // GLOBAL_BLOCK, D, generator=g, dtype=torch.float64) for _ in range(2)]
    mask = _masks(B, L, seed)
    return [t.to(DEVICE, dtype if t.dim() == 4 else torch.float32).requires_grad_() for t in leaves], mask.to(DEVICE)


def _call(fn, leaves, mask, **extra):
    with_globals = len(leaves) == 7
    if with_globals:
        extra.update(global_k=leaves[5], global_v=leaves[6], global_bias_table=leaves[4])
    return fn(*leaves[:4], radius=RADIUS, max_distance=12, key_padding_mask=mask, global_block_size=GLOBAL_BLOCK,
              **extra)  # fmt: skip


@pytest.mark.parametrize("L", [1, 5, RADIUS + 1, 2 * (RADIUS + 1) + 3, 37])
@pytest.mark.parametrize("with_globals", [False, True], ids=["local", "tglobal"])
def test_triton_against_float64(L, with_globals, triton_backend):
    from fastseq.kernels.local_attention import local_attention_reference

    leaves, mask = _triton_case(L, with_globals)
    out = _call(local_attention, leaves, mask)
    # Outputs at padded query positions are not part of the contract: weight them out.
    keep = mask.bool()[:, None, :, None].to(out.dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) * keep
    used = leaves if with_globals else leaves[:4]
    grads = torch.autograd.grad(out, used, grad_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    expected = _call(local_attention_reference, ref_leaves, mask.cpu())
    ref_used = ref_leaves if with_globals else ref_leaves[:4]
    ref_grads = torch.autograd.grad(expected, ref_used, grad_out.cpu().double())
    assert_close((out * keep).detach().cpu(), expected * keep.cpu(), rel=1e-5, what="out")
    names = ["q", "k", "v", "bias_table", "global_bias_table", "global_k", "global_v"][: len(grads)]
    for name, got, ref in zip(names, grads, ref_grads, strict=True):
        if ref.numel():  # L = 1 has no global token
            assert_close(got.cpu(), ref, rel=2e-5, floor=1.0, what=f"grad of {name}")


def test_triton_global_tokens_without_their_table_against_float64(triton_backend):
    """Global tokens with no global bias table (`global_bias_table=None`, no bias to them): the output and
    the gradients of q, k, v, the local table and the global keys and values against float64."""
    from fastseq.kernels.local_attention import local_attention_reference

    leaves, mask = _triton_case(37, True)
    leaves = leaves[:4] + leaves[5:]  # q, k, v, the local table, the global keys and values

    def call(fn, ts, m):
        return fn(*ts[:4], radius=RADIUS, max_distance=12, key_padding_mask=m, global_block_size=GLOBAL_BLOCK,
                  global_k=ts[4], global_v=ts[5])  # fmt: skip

    out = call(local_attention, leaves, mask)
    keep = mask.bool()[:, None, :, None].to(out.dtype)  # padded queries are unspecified
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) * keep
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    expected = call(local_attention_reference, ref_leaves, mask.cpu())
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out.cpu().double())
    assert_close((out * keep).detach().cpu(), expected * keep.cpu(), rel=1e-5, what="out")
    for name, got, ref in zip(["q", "k", "v", "bias_table", "global_k", "global_v"], grads, ref_grads, strict=True):
        assert_close(got.cpu(), ref, rel=2e-5, floor=1.0, what=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision_close_to_float64(dtype, triton_backend):
    from fastseq.kernels.local_attention import local_attention_reference

    leaves, mask = _triton_case(2 * (RADIUS + 1) + 3, True, dtype=dtype)
    out = _call(local_attention, leaves, mask)
    assert out.dtype == dtype
    keep = mask.bool()[:, None, :, None]
    expected = _call(local_attention_reference, [t.detach().cpu().double() for t in leaves], mask.cpu())
    theirs = _call(local_attention_reference, [t.detach() for t in leaves], mask)  # fp32 math, rounded once
    err = ((out.double().cpu() - expected) * keep.cpu()).abs().max().item()
    torch_err = ((theirs.double().cpu() - expected) * keep.cpu()).abs().max().item()
    assert err <= 2 * torch_err + torch.finfo(dtype).eps * expected.abs().max().item(), (err, torch_err)


@pytest.mark.slow
def test_triton_dropout_is_seeded_and_unbiased(triton_backend):
    leaves, mask = _triton_case(21, True, seed=2)
    args = [t.detach() for t in leaves]
    torch.manual_seed(3)
    first = _call(local_attention, args, mask, dropout_p=0.2)
    torch.manual_seed(3)
    assert torch.equal(first, _call(local_attention, args, mask, dropout_p=0.2))
    plain = _call(local_attention, args, mask)
    mean = sum(_call(local_attention, args, mask, dropout_p=0.2) for _ in range(24)) / 24
    keep = mask.bool()[:, None, :, None]
    spread = ((mean - plain) * keep).abs().mean() / (plain * keep).abs().mean()
    assert spread < 0.1, spread.item()


# ---------------------------------------------------------------------------------------------
# Global tokens inside the kernel: block positions, caps, dropout and determinism
# ---------------------------------------------------------------------------------------------


def _global_masks(L, gbs):
    """Rows: all real; a hole across block ends in the middle; fewer real tokens than one block
    (no global token at all); left padding."""
    mask = torch.ones(4, L, dtype=torch.long)
    mask[1, L // 3 : L // 3 + 2 * gbs + 1] = 0
    mask[2, max(gbs - 1, 0) :] = 0
    mask[3, : L // 2] = 0
    return mask


def _global_case(L, gbs, dtype=torch.float32, seed=0, D=8):
    g = torch.Generator().manual_seed(seed)
    B, H, G = 4, 2, L // gbs
    shapes = [(B, H, L, D)] * 3 + [(8, H), (8, H)] + [(B, H, G, D)] * 2
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    return [t.to(DEVICE, dtype if t.dim() == 4 else torch.float32).requires_grad_() for t in leaves]


def _call_globals(fn, leaves, mask, gbs, radius=RADIUS, **extra):
    q, k, v, table, gtable, gk, gv = leaves
    return fn(q, k, v, table, radius=radius, max_distance=12, key_padding_mask=mask, global_k=gk, global_v=gv,
              global_bias_table=gtable, global_block_size=gbs, **extra)  # fmt: skip


@pytest.mark.parametrize(
    "L,gbs", [(33, 1), (40, 3), (37, 5), *(pytest.param(*c, marks=pytest.mark.slow) for c in ((64, 4), (70, 2)))]
)
def test_triton_global_tokens_against_float64(L, gbs, triton_backend):
    """gbs = 1 puts every row of a query tile at its own position (the widest shift a tile can
    have); max_distance 12 with up to 70 globals reaches both clamped ends of the global table."""
    _check_global_tokens(L, gbs)


def test_triton_global_tokens_on_head_chunks_and_key_major_tiles(triton_backend, chunked_tiles):
    """The backward on sm_90's tiles at D = 256, scaled down (`chunked_tiles`): both dQ launches (the
    ordinary keys' fp32 dQ handed to the global tokens' in halves of the head dim) and dK/dV of the
    ordinary and global keys computed key-major give the float64 gradients (D = 24: the second half
    lies partly past D)."""
    _check_global_tokens(40, 3, D=24)


def _check_global_tokens(L, gbs, D=8):
    from fastseq.kernels.local_attention import local_attention_reference

    leaves = _global_case(L, gbs, D=D)
    mask = _global_masks(L, gbs).to(DEVICE)
    out = _call_globals(local_attention, leaves, mask, gbs)
    keep = mask.bool()[:, None, :, None].to(out.dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) * keep
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    expected = _call_globals(local_attention_reference, ref_leaves, mask.cpu(), gbs)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out.cpu().double())
    assert_close((out * keep).detach().cpu(), expected * keep.cpu(), rel=1e-5, what="out")
    names = ["q", "k", "v", "bias_table", "global_bias_table", "global_k", "global_v"]
    for name, got, ref in zip(names, grads, ref_grads, strict=True):
        assert_close(got.cpu(), ref, rel=2e-5, floor=1.0, what=f"grad of {name}")
    # The row without a full block has no global token: no gradient reaches the globals from it.
    assert grads[5][2].abs().max() == 0 and grads[6][2].abs().max() == 0


def test_triton_eager_path_is_the_custom_ops(triton_backend):
    """Eager mode runs the ops' forward and backward without the dispatcher (`_EagerLocalAttention`); the
    ops, what torch.compile traces, give bitwise the same output and gradients, with global tokens, both
    tables (also as `PositionBias`es, and the mask as bool), padding and dropout."""
    from fastseq.kernels import PositionBias
    from fastseq.kernels.local_attention import distance_table, global_caps

    L, gbs = 37, 5
    leaves = _global_case(L, gbs)
    q, k, v, table, gtable, gk, gv = leaves
    mask = _global_masks(L, gbs).to(DEVICE)
    w_out = torch.randn(4, 2, L, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def ops():
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=DEVICE)
        tables = [distance_table(t, bidirectional=True, max_distance=12) for t in (table, gtable)]
        caps = global_caps(mask, 4, L, gbs, q.device)
        out, _ = torch.ops.fastseq.local_attention_fwd(q, k, v, tables[0], mask, gk, gv, tables[1], caps, seed,
                                                       RADIUS, gbs, 0.25)  # fmt: skip
        return out.transpose(1, 2)

    def eager():
        return _call_globals(local_attention, leaves, mask, gbs, dropout_p=0.25)

    def prepared():
        biases = [PositionBias(t, bidirectional=True, max_distance=12) for t in (table, gtable)]
        return local_attention(q, k, v, biases[0], radius=RADIUS, max_distance=12, key_padding_mask=mask != 0,
                               global_k=gk, global_v=gv, global_bias_table=biases[1], global_block_size=gbs,
                               dropout_p=0.25)  # fmt: skip

    results = []
    for attend in (ops, eager, prepared):
        torch.manual_seed(5)  # the same dropout seed
        out = attend()
        results.append((out, *torch.autograd.grad((out * w_out).sum(), leaves)))
    names = "out q k v bias_table global_bias_table global_k global_v".split()
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other, strict=True):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="local_attention: the PositionBias was made with bidirectional=False"):
        local_attention(q, k, v, PositionBias(table, bidirectional=False, max_distance=12), radius=RADIUS,
                        max_distance=12)  # fmt: skip


def test_triton_padded_queries_follow_the_reference(triton_backend):
    """Padded query rows (outside the contract) still get the reference's numbers, not garbage."""
    from fastseq.kernels.local_attention import local_attention_reference

    leaves = _global_case(29, 3, seed=4)
    mask = _global_masks(29, 3).to(DEVICE)
    out = _call_globals(local_attention, [t.detach() for t in leaves], mask, 3)
    expected = _call_globals(local_attention_reference, [t.detach().cpu().double() for t in leaves], mask.cpu(), 3)
    assert_close(out.cpu(), expected, rel=1e-5, what="out, padded rows included")


def _dense_with_keep(leaves, mask, gbs, keep, dropout_p):
    """float64 local + global attention with an explicit dropout keep mask over (L + G) keys."""
    from fastseq.kernels.global_aggregate import global_positions

    q, k, v, table, gtable, gk, gv = leaves
    B, H, L, D = q.shape
    G = gk.shape[2]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k)
    s = s + table[relative_position_bucket(j - i, bidirectional=True, num_buckets=8, max_distance=12)].permute(2, 0, 1)
    ok = ((i - j).abs() <= RADIUS)[None, None] & mask.bool()[:, None, None, :]
    _, valid = global_block_ids(mask, gbs)
    rel = torch.arange(G)[None, None, :] - global_positions(mask, gbs)[:, :, None]
    side = torch.einsum("bhqd,bhgd->bhqg", q, gk)
    side = side + gtable[relative_position_bucket(rel, bidirectional=True, num_buckets=8, max_distance=12)].permute(
        0, 3, 1, 2
    )
    s = torch.cat([s, side], -1).masked_fill(
        ~torch.cat([ok.expand(B, 1, L, L), valid[:, None, None, :].expand(B, 1, L, G)], -1), float("-inf")
    )
    p = torch.softmax(s, -1).nan_to_num(0.0) * keep / (1 - dropout_p)
    return torch.einsum("bhqk,bhkd->bhqd", p, torch.cat([v, gv], 2))


def test_triton_dropout_over_global_tokens_is_exact(triton_backend):
    """Read the kernel's keep mask back with one-hot values (local and global), then check that the
    same seed regenerates it in backward: gradients equal float64 autograd through that mask."""
    L, gbs, p = 21, 3, 80 / 256  # a rate the kernels apply as given (`quantized_dropout`)
    G = L // gbs
    leaves = _global_case(L, gbs, seed=5, D=L + G)
    mask = _global_masks(L, gbs).to(DEVICE)
    eye = torch.eye(L + G, dtype=torch.float32, device=DEVICE)
    probe = [t.detach() for t in leaves]
    probe[2] = eye[:L].expand(4, 2, L, L + G).contiguous()
    probe[6] = eye[L:].expand(4, 2, G, L + G).contiguous()
    torch.manual_seed(11)
    dropped = _call_globals(local_attention, probe, mask, gbs, dropout_p=p)
    torch.manual_seed(11)
    plain = _call_globals(local_attention, probe, mask, gbs)
    keep = (dropped != 0).double().cpu()
    assert (plain > 0).logical_and(dropped == 0).any(), "nothing was dropped"
    assert_close(dropped[dropped != 0].cpu(), (plain[dropped != 0] / (1 - p)).cpu(), rel=1e-5, what="kept entries")

    torch.manual_seed(11)
    out = _call_globals(local_attention, leaves, mask, gbs, dropout_p=p)
    rows = mask.bool()[:, None, :, None].to(out.dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE) * rows
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    expected = _dense_with_keep(ref_leaves, mask.cpu(), gbs, keep, p)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out.cpu().double())
    assert_close((out * rows).detach().cpu(), expected * rows.cpu(), rel=1e-5, what="out")
    names = ["q", "k", "v", "bias_table", "global_bias_table", "global_k", "global_v"]
    for name, got, ref in zip(names, grads, ref_grads, strict=True):
        assert_close(got.cpu(), ref, rel=2e-5, floor=1.0, what=f"grad of {name}")


@pytest.mark.slow
def test_triton_global_backward_is_deterministic(triton_backend):
    leaves = _global_case(40, 3, seed=6)
    mask = _global_masks(40, 3).to(DEVICE)
    runs = []
    for _ in range(2):
        out = _call_globals(local_attention, leaves, mask, 3)
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_triton_global_dq_scratch_is_bounded(triton_backend, monkeypatch):
    """With global tokens each dQ program also keeps a row of the global table's gradient and its fp32
    dQ between the two launches: squeezed to two programs' worth, the launches go in chunks of query
    tiles (both launches of a chunk share its slots), and the gradients are those of one launch."""
    from fastseq.kernels.bucketed_attention import launch
    from tests.kernels.test_bucketed_attention import dq_slot_bytes, record_dq_launches

    leaves = _global_case(40, 3, seed=3)
    mask = _global_masks(40, 3).to(DEVICE)
    grad_out = torch.randn(4, 2, 40, 8, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    one = record_dq_launches(monkeypatch)
    expected = torch.autograd.grad(_call_globals(local_attention, leaves, mask, 3), leaves, grad_out)
    assert len(one) == 2  # the ordinary keys, then the global tokens

    cut = launch._clamped_buckets(8, 12, True)[0]
    budget = 2 * dq_slot_bytes(8, torch.float32, cut, global_cut=cut)
    chunked = record_dq_launches(monkeypatch, budget)
    got = torch.autograd.grad(_call_globals(local_attention, leaves, mask, 3), leaves, grad_out)
    over = [(grid, size) for grid, size in chunked if size > budget]
    assert not over, f"dQ buffers over the {budget} bytes allowed: {over}"
    assert len(chunked) > 2
    names = ["q", "k", "v", "bias_table", "global_bias_table", "global_k", "global_v"]
    for name, a, b in zip(names, got, expected, strict=True):
        if "table" in name:  # the same partials, added in another order
            assert_close(a, b, rel=1e-6, what=f"grad of {name}")
        else:
            assert torch.equal(a, b), name


@pytest.mark.slow
def test_triton_local_attention_op_passes_opcheck(triton_backend):
    from fastseq.kernels.bucketed_attention import distance_table
    from fastseq.kernels.global_aggregate import global_caps

    q, k, v, table, gtable, gk, gv = _global_case(13, 3, seed=7)
    mask = _global_masks(13, 3).to(DEVICE)
    dt = distance_table(table.detach(), bidirectional=True, max_distance=12).requires_grad_()
    gdt = distance_table(gtable.detach(), bidirectional=True, max_distance=12).requires_grad_()
    caps = global_caps(mask, 4, 13, 3, DEVICE)
    args = (q, k, v, dt, mask, gk, gv, gdt, caps, None, RADIUS, 3, 0.0)
    torch.library.opcheck(torch.ops.fastseq.local_attention_fwd.default, args)


# ---------------------------------------------------------------------------------------------
# global_aggregate's kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,gbs", [(2, 4), (17, 1), (40, 3), (37, 5), (64, 4), (130, 16)])
def test_triton_aggregate_matches_reference(L, gbs, triton_backend):
    from fastseq.kernels.global_aggregate import global_aggregate_reference

    g = torch.Generator().manual_seed(L)
    hidden = torch.randn(4, L, 40, generator=g).to(DEVICE).requires_grad_()
    mask = _global_masks(L, gbs).to(DEVICE)
    for m in (mask, None):
        got = global_aggregate(hidden, m, gbs)
        ref_hidden = hidden.detach().double().requires_grad_()
        expected = global_aggregate_reference(ref_hidden, m, gbs)
        assert_close(got.detach().cpu(), expected.cpu(), rel=1e-6, floor=1.0, what="aggregate")
        grad = torch.randn(got.shape, generator=g).to(DEVICE)
        (dx,) = torch.autograd.grad(got, hidden, grad)
        (ref_dx,) = torch.autograd.grad(expected, ref_hidden, grad.double())
        assert torch.equal(dx.double(), ref_dx)  # each token takes its global's gradient: exact


def test_triton_aggregate_half_precision_and_opcheck(triton_backend):
    from fastseq.kernels.global_aggregate import global_aggregate_reference, global_caps

    hidden = torch.randn(4, 50, 24).to(DEVICE)
    mask = _global_masks(50, 4).to(DEVICE)
    expected = global_aggregate_reference(hidden.double(), mask, 4)
    for dtype in (torch.bfloat16, torch.float16):
        got = global_aggregate(hidden.to(dtype), mask, 4)
        assert got.dtype == dtype
        # fp32 accumulation, one rounding at the end.
        assert_close(got.double().cpu(), expected.cpu(), rel=torch.finfo(dtype).eps, what=str(dtype))
    caps = global_caps(mask, 4, 50, 4, DEVICE)
    torch.library.opcheck(torch.ops.fastseq.global_aggregate_fwd.default, (hidden.requires_grad_(), mask, caps, 4))


@pytest.mark.slow
def test_triton_transient_global_layer_traces_under_torch_compile(triton_backend):
    """Aggregation, norm-free projections and the attention op in one graph, no breaks."""
    leaves = _global_case(19, 3, seed=8)
    mask = _global_masks(19, 3).to(DEVICE)
    hidden = torch.randn(4, 19, 8, device=DEVICE, requires_grad=True)
    leaves = [*leaves[:5], hidden]

    def layer(q, k, v, table, gtable, hidden):
        globals_ = global_aggregate(hidden, mask, 3)  # (B, G, 8)
        gk = globals_[:, None].expand(-1, 2, -1, -1)
        return local_attention(q, k, v, table, radius=RADIUS, max_distance=12, key_padding_mask=mask, global_k=gk,
                               global_v=gk * 0.5, global_bias_table=gtable, global_block_size=3)  # fmt: skip

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    eager = layer(*leaves)
    assert torch.equal(out, eager)
    for a, b in zip(grads, torch.autograd.grad(eager.sum(), leaves), strict=True):
        assert torch.equal(a, b)
