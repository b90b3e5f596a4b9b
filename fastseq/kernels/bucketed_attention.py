"""Attention with T5's bucketed relative-position bias, fused in Triton, forward and backward.

The bias of query i and key j is `bias_table[bucket(j - (q_offset + i)), h]`, where `bucket` is
T5's relative-position bucket function. It depends only on the distance `d = j - (q_offset + i)`,
and every distance at or beyond a cut-off `C` (just past `max_distance`) falls in the last bucket
of its sign. So the launcher turns the `(num_buckets, H)` table into a per-head table over the
clamped distances `-C..C` (`2C + 1` entries, exact buckets computed once on the host), scales it
by log2(e) and pads it with a tile's extent of its end values on either side; a kernel then reads
each score's bias with one load, `table[h, base + rel]`, where only the tile's base distance (a
scalar) is clamped (`_bias`). No `(B, H, Lq, Lk)` tensor exists, forward or backward, and the bias
costs no branch, no layout conversion and no shuffle.

The gradient of the table is the sum of dS along diagonals. The dQ kernel owns one query tile and
walks the key tiles; a tile beyond the cut-off adds its row sums to a clamped end, and a band tile
goes through the program's own scratch tile in global memory (it stays in L2): written as the MMA
left it, re-read skewed one row at a time so that each thread sums the distances it owns, then
added to the program's row of per-distance partials (`_bias_grad_tile`). The rows are summed on
the host. Tiles and rows are slots of buffers that a launch's programs own while it runs: the
backward launches dQ in chunks whose slots fit in `_DQ_SCRATCH_BYTES`, so these buffers do not grow
with B * H * L (one slot per program of the whole backward took 4 GiB at t5-11b, B = 32, L = 4096),
and adds each launch's rows to the gradient in a fixed order. No atomics anywhere: forward and
backward are bitwise deterministic.

The same kernels serve LongT5's encoder (`fastseq.kernels.local_attention`): with a key window a
query tile visits only the key tiles within `window` of it, and with global tokens
(`GlobalTokens`) it then goes on over every global token in the same online softmax. The global
bias depends on `g - position(i)` with `position(i) = min(i // block_size, cap)`, which rises by at
most one per row, so a tile of global scores is a band too: element (m, n) lies at distance
`(g0 - highest position) + n + shift[m]`, the same padded-table load (forward) and skewed re-read
(bias gradient) with a per-row shift instead of the diagonal one. The backward's dQ runs as two
launches then, the ordinary keys and the global tokens, and the global tokens' dK/dV is the dK/dV
kernel run over every query tile. The forward also returns each row's log-sum-exp; a gradient on
it enters the backward as a shift of rowsum(dO * O).

Every tile is chosen from the compiled code (`python -m fastseq.kernels._compile --report`): the
compile-only tests hold each 16-bit build a launcher can pick on sm_80 and sm_90 to no register
spill, tensor-core instructions for every dot, and the instruction prices of `PRICES`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._backend import (
    autocast_cast,
    autocast_dtype,
    autocast_off,
    interpreting,
    key_mask,
    last_dim_contiguous,
    unsupported_dtypes,
    upcast,
    use_triton,
)

HAS_TRITON_KERNEL = True

_LOG2E = 1.4426950408889634


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position (`key - query`), int64, same shape as the input.

    Half of the buckets (per sign when bidirectional) are exact small distances,
    the other half are logarithmically wider bins up to `max_distance`; every
    distance beyond it shares the last bucket. Computed in float32 exactly as
    Mesh TensorFlow and Hugging Face do, so the buckets agree bit for bit.
    """
    relative_position = relative_position.long()
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) = -inf only where is_small picks the exact branch; the clamp keeps the cast defined.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).clamp(min=-1.0).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def relative_bias(
    bias_table: torch.Tensor,
    query_length: int,
    key_length: int,
    *,
    bidirectional: bool,
    max_distance: int,
    q_offset: int = 0,
) -> torch.Tensor:
    """The `(H, Lq, Lk)` bias of a bias table, built once per call.

    The buckets depend only on `j - i`, so they are computed over the
    `Lq + Lk - 1` distinct distances and gathered into the `(Lq, Lk)` grid.
    """
    device = bias_table.device
    distances = torch.arange(-(query_length - 1), key_length, device=device) - q_offset  # (Lq + Lk - 1,)
    buckets = relative_position_bucket(
        distances, bidirectional=bidirectional, num_buckets=bias_table.shape[0], max_distance=max_distance
    )
    per_distance = upcast(bias_table)[buckets].t()  # (H, Lq + Lk - 1)
    i = torch.arange(query_length, device=device)[:, None]
    j = torch.arange(key_length, device=device)[None, :]
    return per_distance[:, j - i + (query_length - 1)]  # (H, Lq, Lk)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. PRECISION "upcast" widens the operands to fp32 first: the
    interpreter's bf16 dot is wrong, and a bf16 product is exact in fp32, so the result is what
    the tensor cores compute."""
    if PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _bias(DT2_h, base, rel, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The log2-domain bias of a tile whose element (m, n) lies at distance `base + rel[m, n]`, with
    `rel` in [0, BLOCK_M + BLOCK_N - 2], from the per-distance table `DT2_h`.

    The table (scaled by log2(e)) holds distances -C - PAD .. C + PAD, PAD = BLOCK_M + BLOCK_N, the
    entries beyond +-C repeating the end values. A tile wholly at or beyond a cut-off (most tiles of
    a long sequence) takes that end's value with one load; a band tile loads each element's entry,
    an index that stays in the table without a clamp. The table is a few KiB per head: every load
    after the first hits L1. The branch also keeps the band's gather out of Triton's software
    pipeliner, which copied it through shared memory one 4-byte `cp.async` per element (twice the
    forward's shared memory on sm_90, and the bias cost 1.59x the forward's instructions at D = 64).
    No layout conversion, no shuffle: spreading the tile's distinct distances over it with
    `tl.gather` instead cost 1,988 SHFL and 6,448 spill bytes at 128 x 64 on sm_90 (the static
    report)."""
    PAD: tl.constexpr = BLOCK_M + BLOCK_N
    if base >= C:
        bias = tl.zeros(rel.shape, tl.float32) + tl.load(DT2_h + 2 * C + PAD)
    elif base <= -C - (BLOCK_M + BLOCK_N - 2):
        bias = tl.zeros(rel.shape, tl.float32) + tl.load(DT2_h + PAD)
    else:
        bias = tl.load(DT2_h + (base + C + PAD) + rel)
    return bias


@triton.jit
def _tile_scores(
    q,
    k,
    DT_h,
    KPM_b,
    offs_m,
    offs_n,
    m0,
    n0,
    Lk,
    q_offset,
    C,
    window,
    scale_log2,
    qseg,
    kseg,
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_SEG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scores of one (BLOCK_M, BLOCK_N) tile of ordinary keys in the log2 domain, masked entries at -inf.
    With HAS_SEG, `qseg` (BLOCK_M,) and `kseg` (BLOCK_N,) are the rows' and keys' segment ids."""
    s = _dot(q, tl.trans(k), PRECISION) * scale_log2
    if HAS_BIAS:
        # Element (m, n) lies at distance n0 + n - (q_offset + m0 + m) = base + n + (BLOCK_M - 1 - m).
        base = n0 - (q_offset + m0 + BLOCK_M - 1)
        rel = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None] + (BLOCK_M - 1)  # the same in every tile
        s += _bias(DT_h, base, rel, C, BLOCK_M, BLOCK_N)
    if HAS_SEG:
        # Padding, keys past Lk included, has ids that no query has (`_segments`, `_segment_ids`).
        valid = qseg[:, None] == kseg[None, :]
    else:
        valid = offs_n[None, :] < Lk
    if HAS_KPM:
        keep = tl.load(KPM_b + offs_n, mask=offs_n < Lk, other=0)
        valid = valid & (keep != 0)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + q_offset)
    if WINDOWED:
        dist = offs_n[None, :] - (offs_m[:, None] + q_offset)
        valid = valid & (dist <= window) & (dist >= -window)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _segment_ids(SEG_b, offs, L, PAD: tl.constexpr, tile=0, end=1):
    """The segment ids of rows `offs` of one batch element (PAD, padding, past L). In a loop over
    tiles, `tile < end` (which holds there) puts the load under a branch, and Triton 3.6's software
    pipeliner leaves it out of its stages: it copied the ids one 4-byte `cp.async` per element, and
    the segments cost 1.47x the forward's instructions at sm_90, D = 64 (1.04x so; the static report)."""
    ids = tl.full(offs.shape, PAD, tl.int32)
    if tile < end:
        ids = tl.load(SEG_b + offs, mask=offs < L, other=PAD)
    return ids


@triton.jit
def _span(SPAN_b, tile, num_tiles):
    """[lo, hi): the rows of the other side that tile `tile` of this side meets through its segments
    (`_segment_spans`, lo > hi for none)."""
    return tl.load(SPAN_b + tile), tl.load(SPAN_b + num_tiles + tile)


@triton.jit
def _global_rows(offs_m, m0, Lq, cap, gbs: tl.constexpr, BLOCK_M: tl.constexpr):
    """LongT5's block position of each query row, `min(i // gbs, cap)` (cap: the row's last global
    token), as the tile's lowest and highest position and each row's shift `highest - position`,
    which lies in [0, BLOCK_M - 1]: positions never fall and rise by at most one per row."""
    pos = tl.minimum(offs_m // gbs, cap)
    pos_lo = tl.minimum(m0 // gbs, cap)
    pos_hi = tl.minimum((tl.minimum(m0 + BLOCK_M, Lq) - 1) // gbs, cap)
    shift = tl.minimum(tl.maximum(pos_hi - pos, 0), BLOCK_M - 1)  # rows past Lq clamp; they carry no weight
    return pos_lo, pos_hi, shift


@triton.jit
def _global_tile_scores(
    q,
    gk,
    GDT_h,
    offs_g,
    g0,
    G,
    cap,
    pos_lo,
    pos_hi,
    shift,
    CG,
    scale_log2,
    HAS_GBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scores of one tile of global tokens: bias `GDT[h, g - position(i)]`, globals past `cap` masked."""
    s = _dot(q, tl.trans(gk), PRECISION) * scale_log2
    if HAS_GBIAS:
        # Element (m, n) lies at distance g0 + n - position(m) = (g0 - pos_hi) + n + shift[m].
        base = g0 - pos_hi
        s += _bias(GDT_h, base, tl.arange(0, BLOCK_N)[None, :] + shift[:, None], CG, BLOCK_M, BLOCK_N)
    valid = (offs_g <= cap) & (offs_g < G)
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _key_tiles(m0, Lk, q_offset, window, SPAN_b, num_tiles, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
               HAS_SEG: tl.constexpr, BLOCK_M, BLOCK_N):  # fmt: skip
    """The key range [n_start, n_end) a query tile starting at m0 visits (n_start a tile start). Packed
    rows (HAS_SEG): only the keys of the tile's segments, so a key tile that no segment of the query
    tile meets is never loaded."""
    n_start = 0
    n_end = Lk
    if CAUSAL:
        n_end = tl.minimum(Lk, q_offset + m0 + BLOCK_M)
    if WINDOWED:
        # Only the key tiles the window of this query tile touches (LongT5's local attention).
        n_start = (tl.maximum(q_offset + m0 - window, 0) // BLOCK_N) * BLOCK_N
        n_end = tl.minimum(n_end, q_offset + m0 + BLOCK_M + window)
    if HAS_SEG:
        lo, hi = _span(SPAN_b, m0 // BLOCK_M, num_tiles)
        n_start = tl.maximum(n_start, (lo // BLOCK_N) * BLOCK_N)
        n_end = tl.minimum(n_end, hi)
    return n_start, n_end


@triton.jit
def _dropout_keep(seed, bh, offs_m, key_ids, Lq, dropout_p):
    """Counter-based keep mask: Philox4x32 keyed by the call's seed, with the element's (key id,
    row (b * H + h) * Lq + i) as two 32-bit counter words, so no two elements of any call share a
    draw (key ids run over the ordinary keys, then the global tokens). Seven rounds, the fewest of
    the Philox family that pass BigCrush: the mask is regenerated in every backward tile, and the
    ten-round 64-bit-counter form held the backward tiles' registers past the limit (the static
    report)."""
    row = bh * Lq + offs_m
    c0 = tl.broadcast_to(key_ids[None, :], (offs_m.shape[0], key_ids.shape[0])).to(tl.uint32, bitcast=True)
    c1 = tl.broadcast_to(row[:, None], (offs_m.shape[0], key_ids.shape[0])).to(tl.uint32, bitcast=True)
    zero = tl.zeros_like(c0)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero, 7)
    return tl.random.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok):
    """One tile of keys and values (rows past Lk and columns past D read as zeros)."""
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = tl.load(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _softmax_step(
    s, v, m_i, l_i, acc, seed, bh, offs_m, key_ids, Lq, dropout_p, DROPOUT: tl.constexpr, PRECISION: tl.constexpr
):
    """One online-softmax step over a tile of scores (log2 domain) and its values."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key so far masked keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, key_ids, Lq, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _bucketed_attention_fwd_kernel(
    # pointers
    Q,
    K,
    V,
    DT,  # (H, 2C + 1) fp32 bias per clamped distance
    KPM,  # (B, Lk) int8, nonzero = attend
    GK,  # (B, H, G, D) global keys (with HAS_GLOBAL)
    GV,
    GDT,  # (H, 2CG + 1) fp32 bias of the global tokens per clamped distance
    CAP,  # (B,) int32: last global token of each row (-1: none)
    QSEG,  # (B, Lq) int32 segment ids of the queries (with HAS_SEG; 0 = padding)
    KSEG,  # (B, Lk) int32 segment ids of the keys
    SPAN,  # (B, 2, query tiles) int32: the keys [lo, hi) each query tile's segments meet
    Out,
    LSE,  # (B, H, Lq) fp32, log2 domain; +inf for rows with no key
    # strides (the last dim of q, k, v, out is contiguous)
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gkb,
    stride_gkh,
    stride_gkn,
    stride_gvb,
    stride_gvh,
    stride_gvn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_kpmb,
    stride_qsegb,
    stride_ksegb,
    # sizes and scalars
    H,
    Lq,
    Lk,
    G,  # global tokens (0 without)
    D,
    q_offset,
    C,
    CG,
    window,  # keys at distance |j - (q_offset + i)| <= window only (with WINDOWED)
    scale_log2,
    dropout_p,
    seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_SEG: tl.constexpr,  # packed rows: queries see only the keys of their own segment
    HAS_GLOBAL: tl.constexpr,
    HAS_GBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    GBS: tl.constexpr,  # global block size: query i sits at global position min(i // GBS, cap)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    b64 = b.to(tl.int64)  # batch offsets in 64 bits: (B - 1) * stride_qb passes 2**31 at t5-11b sizes
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(
        Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=(offs_m < Lq)[:, None] & d_ok[None, :],
        other=0.0,
    )
    K_bh = K + b64 * stride_kb + h * stride_kh
    V_bh = V + b64 * stride_vb + h * stride_vh
    DT_h = DT + h * (2 * C + 1 + 2 * (BLOCK_M + BLOCK_N))
    KPM_b = KPM + b64 * stride_kpmb
    KSEG_b = KSEG + b64 * stride_ksegb
    num_m = tl.cdiv(Lq, BLOCK_M)
    qseg = offs_m
    if HAS_SEG:
        qseg = _segment_ids(QSEG + b64 * stride_qsegb, offs_m, Lq, -1)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_start, n_end = _key_tiles(m0, Lk, q_offset, window, SPAN + b64 * 2 * num_m, num_m, CAUSAL, WINDOWED, HAS_SEG,
                                BLOCK_M, BLOCK_N)  # fmt: skip
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok)
        kseg = offs_n
        if HAS_SEG:
            kseg = _segment_ids(KSEG_b, offs_n, Lk, -2, n0, n_end)
        s = _tile_scores(
            q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2, qseg, kseg,
            HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N, PRECISION,
        )  # fmt: skip
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, seed, bh, offs_m, offs_n, Lq, dropout_p, DROPOUT, PRECISION)
    if HAS_GLOBAL:
        # LongT5's transient-global tokens: the same softmax goes on over every global token.
        cap = tl.load(CAP + b)
        pos_lo, pos_hi, shift = _global_rows(offs_m, m0, Lq, cap, GBS, BLOCK_M)
        GK_bh = GK + b64 * stride_gkb + h * stride_gkh
        GV_bh = GV + b64 * stride_gvb + h * stride_gvh
        GDT_h = GDT + h * (2 * CG + 1 + 2 * (BLOCK_M + BLOCK_N))
        for g0 in range(0, tl.minimum(G, cap + 1), BLOCK_N):
            offs_g = g0 + tl.arange(0, BLOCK_N)
            gk, gv = _load_kv(GK_bh, GV_bh, offs_g, G, stride_gkn, stride_gvn, offs_d, d_ok)
            s = _global_tile_scores(
                q, gk, GDT_h, offs_g, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2,
                HAS_GBIAS, BLOCK_M, BLOCK_N, PRECISION,
            )  # fmt: skip
            m_i, l_i, acc = _softmax_step(
                s, gv, m_i, l_i, acc, seed, bh, offs_m, Lk + offs_g, Lq, dropout_p, DROPOUT, PRECISION
            )
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    row_ok = offs_m < Lq
    tl.store(
        Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _bucketed_attention_bwd_preprocess_kernel(
    Out,
    DO,
    DELTA,  # (B, H, Lq) fp32: rowsum(dO * O)
    stride_ob,
    stride_oh,
    stride_om,
    stride_dob,
    stride_doh,
    stride_dom,
    H,
    Lq,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)  # batch offsets in 64 bits
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(
        Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b64 * H + h) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bucketed_attention_bwd_dkdv_kernel(
    # pointers
    Q,
    K,  # the ordinary keys, or the global tokens (GLOBAL_KEYS)
    V,
    DT,  # the distance table of those keys
    KPM,
    CAP,  # (B,) int32, with GLOBAL_KEYS: last global token of each row
    QSEG,  # (B, Lq) int32 segment ids of the queries (with HAS_SEG; 0 = padding)
    KSEG,  # (B, Lk) int32 segment ids of the keys
    SPAN,  # (B, 2, key tiles) int32: the queries [lo, hi) each key tile's segments meet
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    # strides (the last dim of every tensor is contiguous); dK and dV share one layout
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_kpmb,
    stride_qsegb,
    stride_ksegb,
    # sizes and scalars
    H,
    Lq,
    Lk,  # keys of this launch (G with GLOBAL_KEYS)
    D,
    q_offset,
    C,
    window,  # keys at distance |j - (q_offset + i)| <= window only (with WINDOWED)
    key_base,  # dropout index of this launch's first key in a row (Lk of the ordinary keys for globals)
    scale,
    scale_log2,
    dropout_p,
    seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_SEG: tl.constexpr,
    GLOBAL_KEYS: tl.constexpr,
    DROPOUT: tl.constexpr,
    GBS: tl.constexpr,  # global block size: query i sits at global position min(i // GBS, cap)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    b64 = b.to(tl.int64)  # batch offsets in 64 bits: (B - 1) * stride_kb passes 2**31 at t5-11b sizes
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = tl.load(
        K + b64 * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + b64 * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0
    )
    Q_bh = Q + b64 * stride_qb + h * stride_qh
    DO_bh = DO + b64 * stride_dob + h * stride_doh
    DT_h = DT + h * (2 * C + 1 + 2 * (BLOCK_M + BLOCK_N))
    KPM_b = KPM + b64 * stride_kpmb
    LSE_bh = LSE + bh.to(tl.int64) * Lq
    DELTA_bh = DELTA + bh.to(tl.int64) * Lq

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    m_start = 0
    m_end = Lq
    if CAUSAL:
        # The first query tile with a row that may see key n0: q_offset + i >= n0.
        m_start = (tl.maximum(n0 - q_offset, 0) // BLOCK_M) * BLOCK_M
    if WINDOWED:
        # Rows with q_offset + i in [n0 - window, n0 + BLOCK_N - 1 + window] see this key tile.
        m_start = tl.maximum(m_start, (tl.maximum(n0 - window - q_offset, 0) // BLOCK_M) * BLOCK_M)
        m_end = tl.minimum(Lq, n0 + BLOCK_N + window - q_offset)
    if GLOBAL_KEYS:
        # Every query sees every global token up to its row's last one.
        cap = tl.load(CAP + b)
        if n0 > cap:
            m_end = 0
    QSEG_b = QSEG + b64 * stride_qsegb
    kseg = offs_n
    if HAS_SEG:
        # Only the query tiles of this key tile's segments.
        num_n = tl.cdiv(Lk, BLOCK_N)
        lo, hi = _span(SPAN + b64 * 2 * num_n, pid_n, num_n)
        m_start = tl.maximum(m_start, (lo // BLOCK_M) * BLOCK_M)
        m_end = tl.minimum(m_end, hi)
        kseg = _segment_ids(KSEG + b64 * stride_ksegb, offs_n, Lk, -2)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO_bh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE_bh + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_bh + offs_m, mask=row_ok, other=0.0)
        if GLOBAL_KEYS:
            pos_lo, pos_hi, shift = _global_rows(offs_m, m0, Lq, cap, GBS, BLOCK_M)
            s = _global_tile_scores(
                q, k, DT_h, offs_n, n0, Lk, cap, pos_lo, pos_hi, shift, C, scale_log2,
                HAS_BIAS, BLOCK_M, BLOCK_N, PRECISION,
            )  # fmt: skip
        else:
            qseg = offs_m
            if HAS_SEG:
                qseg = _segment_ids(QSEG_b, offs_m, Lq, -1, m0, m_end)
            s = _tile_scores(
                q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2, qseg, kseg,
                HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N, PRECISION,
            )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])  # rows without keys have lse = +inf: p = 0
        dp = _dot(do, tl.trans(v), PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, key_base + offs_n, Lq, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            z = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            z = p
        dv += _dot(tl.trans(z.to(do.dtype)), do, PRECISION)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    dk = dk * scale
    dkv_bh = b64 * stride_dkb + h * stride_dkh
    dkv_off = offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + dkv_bh + dkv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dkv_bh + dkv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


if interpreting():

    @triton.jit
    def _block_barrier():
        tl.debug_barrier()  # the interpreter runs one program at a time; it has no inline assembly

else:

    @triton.jit
    def _block_barrier():
        """`bar.sync 0` (what `tl.debug_barrier` emits), as inline assembly with side effects, so that no
        pass moves a memory access across it. Triton's software pipeliner leaves a loop with a
        `tl.debug_barrier` in it unpipelined: the dQ key loop with a bias had no `cp.async` (the
        static report). The barriers here order only this program's scratch tile and per-distance
        row; the loads the pipeliner moves ahead (keys, values, the bias table) are read-only."""
        tl.inline_asm_elementwise("bar.sync 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _diagonal_sums(ds, SCR_p, m0, pos_hi, cap, gbs: tl.constexpr, GLOBAL_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, SKEW: tl.constexpr):  # fmt: skip
    """Sums of a dS tile along its distances: element t sums every (m, n) with n + shift(m) = t,
    where shift(m) = BLOCK_M - 1 - m (ordinary keys) or the row's global-position shift (global
    tokens). The tile goes through this program's own scratch tile in global memory (it stays in
    L2): written as the MMA left it, re-read skewed one row at a time, so that each thread sums the
    distances it owns. No shuffle, no atomics, no register-resident skew (a `tl.gather` skew of the
    tile cost 548 SHFL and 1,256 spill bytes in the dQ kernel on sm_90, the static report)."""
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    _block_barrier()  # every thread is done reading the previous tile
    tl.store(SCR_p + tile, ds)
    _block_barrier()  # the tile is written before any thread reads it skewed
    t = tl.arange(0, SKEW)
    diag = tl.zeros((SKEW,), tl.float32)
    for m in range(BLOCK_M):
        if GLOBAL_ROWS:
            shift = tl.minimum(tl.maximum(pos_hi - tl.minimum((m0 + m) // gbs, cap), 0), BLOCK_M - 1)
        else:
            shift = BLOCK_M - 1 - m
        col = t - shift
        diag += tl.load(SCR_p + m * BLOCK_N + col, mask=(col >= 0) & (col < BLOCK_N), other=0.0)
    return diag


@triton.jit
def _bias_grad_tile(ds, SCR_p, DDT_row, d_min, d_max, C, far_neg, far_pos, band_neg, band_pos, m0, pos_hi, cap,
                    gbs: tl.constexpr, GLOBAL_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SKEW: tl.constexpr):  # fmt: skip
    """Add a tile's dS, element (m, n) at distance `d_min + n + shift(m)`, to the per-distance
    gradient. Interior distances |d| < C go to this program's own row `DDT_row` (read, add, write:
    each thread owns its distances, and the barriers of `_diagonal_sums` order the tiles); the
    clamped ends d <= -C and d >= C stay in registers, per row for a tile wholly beyond the cut-off
    and per diagonal for a band tile, and are summed once at the end."""
    if (d_min >= C) | (d_max <= -C):
        rows = tl.sum(ds, 1)
        beyond = d_min >= C
        far_pos += tl.where(beyond, rows, 0.0)
        far_neg += tl.where(beyond, 0.0, rows)
    else:
        diag = _diagonal_sums(ds, SCR_p, m0, pos_hi, cap, gbs, GLOBAL_ROWS, BLOCK_M, BLOCK_N, SKEW)
        d = d_min + tl.arange(0, SKEW)
        interior = (d > -C) & (d < C)
        slot = DDT_row + d + C
        tl.store(slot, tl.load(slot, mask=interior, other=0.0) + diag, mask=interior)
        band_neg += tl.where(d <= -C, diag, 0.0)
        band_pos += tl.where(d >= C, diag, 0.0)
    return far_neg, far_pos, band_neg, band_pos


@triton.jit
def _store_bias_grad_ends(DDT_row, C, far_neg, far_pos, band_neg, band_pos):
    """The clamped ends of the per-distance gradient (slots 0 and 2C, which no tile wrote)."""
    tl.store(DDT_row, tl.sum(far_neg, 0) + tl.sum(band_neg, 0))
    tl.store(DDT_row + 2 * C, tl.sum(far_pos, 0) + tl.sum(band_pos, 0))


@triton.jit
def _bucketed_attention_bwd_dq_kernel(
    # pointers
    Q,
    K,
    V,
    DT,
    KPM,
    GK,
    GV,
    GDT,
    CAP,
    QSEG,  # (B, Lq) int32 segment ids of the queries (with HAS_SEG; 0 = padding)
    KSEG,  # (B, Lk) int32 segment ids of the keys
    SPAN,  # (B, 2, query tiles) int32: the keys [lo, hi) each query tile's segments meet
    DO,
    LSE,
    DELTA,
    DQ,
    # Per-program buffers, one slot per program of the launch (`_dq_chunks` bounds the launch):
    DQP,  # (slots, BLOCK_M, BLOCK_D) fp32: dQ of the ordinary keys, handed from the first launch to the second
    DDT,  # (slots, 2C + 1) fp32 zeros: partial gradients of DT, one row per program
    DDTG,  # (slots, 2CG + 1) the same for GDT
    SCR,  # (slots, BLOCK_M * BLOCK_N) fp32 scratch: one dS tile per program (with a bias)
    # strides (the last dim of every tensor is contiguous)
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gkb,
    stride_gkh,
    stride_gkn,
    stride_gvb,
    stride_gvh,
    stride_gvn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_kpmb,
    stride_qsegb,
    stride_ksegb,
    # sizes and scalars
    H,
    Lq,
    Lk,
    G,
    D,
    q_offset,
    C,
    CG,
    window,  # keys at distance |j - (q_offset + i)| <= window only (with WINDOWED)
    m_base,  # this launch's first query tile, head and batch element: program (i, j, k) takes
    h_base,  # query tile m_base + i of head h_base + j in batch element b_base + k
    b_base,
    scale,
    scale_log2,
    dropout_p,
    seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_SEG: tl.constexpr,
    ORDINARY: tl.constexpr,  # this launch covers the ordinary keys
    HAS_GLOBAL: tl.constexpr,  # this launch covers the global tokens
    HAS_GBIAS: tl.constexpr,
    PARTIAL_IN: tl.constexpr,  # start from DQP (the second launch of a LongT5 backward)
    PARTIAL_OUT: tl.constexpr,  # write DQP in fp32, not DQ (the first one)
    DROPOUT: tl.constexpr,
    GBS: tl.constexpr,  # global block size: query i sits at global position min(i // GBS, cap)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKEW: tl.constexpr,  # next power of two >= BLOCK_M + BLOCK_N - 1: the diagonals of one tile
    PRECISION: tl.constexpr,
):
    """dQ and the bias-table gradients of one query tile. With LongT5's global tokens it runs twice,
    the ordinary keys then the global tokens, each launch one key loop: both loops in one program
    held a 64 x 64 tile's registers past the limit (the static report)."""
    pid_m = m_base + tl.program_id(0)
    h = h_base + tl.program_id(1)
    b = b_base + tl.program_id(2)
    bh = b * H + h
    b64 = b.to(tl.int64)  # batch offsets in 64 bits: (B - 1) * stride_qb passes 2**31 at t5-11b sizes
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < Lq
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0
    )
    do = tl.load(
        DO + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0
    )
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    K_bh = K + b64 * stride_kb + h * stride_kh
    V_bh = V + b64 * stride_vb + h * stride_vh
    DT_h = DT + h * (2 * C + 1 + 2 * (BLOCK_M + BLOCK_N))
    KPM_b = KPM + b64 * stride_kpmb

    # This program's slot in the launch's buffers: the launches of one backward share them in turn.
    slot = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    DQP_tile = DQP + slot * (BLOCK_M * BLOCK_D) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + offs_d[None, :]
    if PARTIAL_IN:
        dq = tl.load(DQP_tile, mask=row_ok[:, None], other=0.0)
    else:
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    SCR_p = SCR + slot * (BLOCK_M * BLOCK_N)
    if ORDINARY:
        # Bias-table gradient of this query tile: interior distances |d| < C in this program's row of
        # DDT, the clamped ends (d <= -C, d >= C) in registers until the end.
        DDT_row = DDT + slot * (2 * C + 1)
        far_neg = tl.zeros((BLOCK_M,), tl.float32)
        far_pos = tl.zeros((BLOCK_M,), tl.float32)
        band_neg = tl.zeros((SKEW,), tl.float32)
        band_pos = tl.zeros((SKEW,), tl.float32)
        KSEG_b = KSEG + b64 * stride_ksegb
        num_m = tl.cdiv(Lq, BLOCK_M)
        qseg = offs_m
        if HAS_SEG:
            qseg = _segment_ids(QSEG + b64 * stride_qsegb, offs_m, Lq, -1)
        n_start, n_end = _key_tiles(m0, Lk, q_offset, window, SPAN + b64 * 2 * num_m, num_m, CAUSAL, WINDOWED,
                                    HAS_SEG, BLOCK_M, BLOCK_N)  # fmt: skip
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k, v = _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok)
            kseg = offs_n
            if HAS_SEG:
                kseg = _segment_ids(KSEG_b, offs_n, Lk, -2, n0, n_end)
            s = _tile_scores(
                q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2, qseg, kseg,
                HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N, PRECISION,
            )  # fmt: skip
            p = tl.math.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(v), PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, offs_n, Lq, dropout_p)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION)
            if HAS_BIAS:
                d_min = n0 - (q_offset + m0 + BLOCK_M - 1)
                d_max = n0 + BLOCK_N - 1 - (q_offset + m0)
                far_neg, far_pos, band_neg, band_pos = _bias_grad_tile(
                    ds, SCR_p, DDT_row, d_min, d_max, C, far_neg, far_pos, band_neg, band_pos, m0, 0, 0, 1,
                    False, BLOCK_M, BLOCK_N, SKEW,
                )  # fmt: skip
        if HAS_BIAS:
            _store_bias_grad_ends(DDT_row, C, far_neg, far_pos, band_neg, band_pos)
    if HAS_GLOBAL:
        cap = tl.load(CAP + b)
        pos_lo, pos_hi, shift = _global_rows(offs_m, m0, Lq, cap, GBS, BLOCK_M)
        GK_bh = GK + b64 * stride_gkb + h * stride_gkh
        GV_bh = GV + b64 * stride_gvb + h * stride_gvh
        GDT_h = GDT + h * (2 * CG + 1 + 2 * (BLOCK_M + BLOCK_N))
        GDDT_row = DDTG + slot * (2 * CG + 1)
        gfar_neg = tl.zeros((BLOCK_M,), tl.float32)
        gfar_pos = tl.zeros((BLOCK_M,), tl.float32)
        gband_neg = tl.zeros((SKEW,), tl.float32)
        gband_pos = tl.zeros((SKEW,), tl.float32)
        for g0 in range(0, tl.minimum(G, cap + 1), BLOCK_N):
            offs_g = g0 + tl.arange(0, BLOCK_N)
            gk, gv = _load_kv(GK_bh, GV_bh, offs_g, G, stride_gkn, stride_gvn, offs_d, d_ok)
            s = _global_tile_scores(
                q, gk, GDT_h, offs_g, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2,
                HAS_GBIAS, BLOCK_M, BLOCK_N, PRECISION,
            )  # fmt: skip
            p = tl.math.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(gv), PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, Lk + offs_g, Lq, dropout_p)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(gk.dtype), gk, PRECISION)
            if HAS_GBIAS:
                gfar_neg, gfar_pos, gband_neg, gband_pos = _bias_grad_tile(
                    ds, SCR_p, GDDT_row, g0 - pos_hi, g0 + BLOCK_N - 1 - pos_lo, CG, gfar_neg, gfar_pos, gband_neg,
                    gband_pos, m0, pos_hi, cap, GBS, True, BLOCK_M, BLOCK_N, SKEW,
                )  # fmt: skip
        if HAS_GBIAS:
            _store_bias_grad_ends(GDDT_row, CG, gfar_neg, gfar_pos, gband_neg, gband_pos)
    if PARTIAL_OUT:
        tl.store(DQP_tile, dq, mask=row_ok[:, None])
    else:
        tl.store(
            DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
            (dq * scale).to(DQ.dtype.element_ty),
            mask=q_mask,
        )


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class Tiles(NamedTuple):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel for one (architecture family, padded
    head dim, element size). BLOCK_M counts query rows and BLOCK_N keys in every kernel."""

    fwd: tuple[int, int, int, int]  # the forward without global tokens (T5, BlenderbotSmall, LongT5 local)
    fwd_global: tuple[int, int, int, int]  # the forward with LongT5's transient-global tokens
    dq: tuple[int, int, int, int]
    dkdv: tuple[int, int, int, int]
    dq_global: tuple[int, int, int, int]  # both dQ launches of a backward with global tokens
    dkdv_global: tuple[int, int, int, int]  # its dK/dV of the ordinary keys and of the global tokens


def _parse_tiles(text: str) -> Tiles:
    """`Tiles` from "BLOCK_M.BLOCK_N.num_warps.num_stages" per kernel, in the fields' order."""
    return Tiles(*(tuple(int(v) for v in tile.split(".")) for tile in text.split()))


# Per architecture family (90: Hopper and later, 227 KiB of shared memory per block; 80: A100,
# 163 KiB; 86: every other GPU, sm_86/sm_89 with 99 KiB), padded head dim and element size: the
# largest tile whose heaviest 16-bit builds compile without a register spill and within the
# chip's shared memory, read from the static report (`python -m fastseq.kernels._compile
# --report`), under Triton 3.6 (what the GPU machines have) and 3.9 alike. The heaviest builds are
# T5's self-attention in training (bias, padding, causal, dropout) and LongT5's transient-global
# attention in training (local window, global tokens, both biases, padding, dropout); the
# compile-only tests hold every shipped tile to that, and the backward's tiles on sm_90 at D = 64
# to the bias gradient's price in `PRICES` (at 128 x 32 its dQ took 2.3x the instructions of the
# same tile without a bias). A 128-row tile takes 8 warps on sm_80 and sm_90: with 4 those builds
# spilled; so did the dQ tile at D = 128 (sm_80 and sm_86), where packed rows' segment ids took the
# 4-warp builds past 255 registers (8 to 104 spill bytes under Triton 3.6 and 3.9), and sm_86's forward
# at D = 256 with 8 warps (8 bytes, packed; 4 warps spill none).
# fmt: off
_TILES: dict[tuple[int, int, int], Tiles] = {key: _parse_tiles(text) for key, text in {
    #              fwd        fwd_global dq         dkdv       dq_global  dkdv_global
    (90, 16, 2):   "128.32.8.3 128.64.8.3 128.64.8.2 64.64.8.2  128.64.8.2 128.32.8.2",
    (90, 32, 2):   "128.32.8.3 128.64.8.3 128.64.8.2 64.32.4.2  128.32.8.2 128.32.8.2",
    (90, 64, 2):   "128.64.8.3 128.64.8.3 64.32.4.2  64.32.8.2  128.32.8.2 64.32.4.2",
    (90, 128, 2):  "128.32.8.3 128.32.8.3 64.32.8.2  32.32.8.2  64.32.4.2  32.32.8.2",
    (90, 256, 2):  "64.32.8.2  16.16.4.1  16.32.4.1  16.16.4.1  16.32.4.1  16.16.4.1",
    (90, 16, 4):   "64.64.4.2  64.64.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (90, 32, 4):   "64.64.4.2  64.64.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (90, 64, 4):   "64.32.4.2  64.32.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (90, 128, 4):  "64.32.4.2  64.32.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (90, 256, 4):  "32.32.4.1  32.32.4.1  16.16.4.1  16.16.4.1  16.16.4.1  16.16.4.1",
    (80, 16, 2):   "128.64.8.3 128.64.8.3 128.64.8.2 128.32.8.2 128.64.8.2 128.32.8.2",
    (80, 32, 2):   "128.64.8.3 128.64.8.3 128.32.8.2 128.32.8.2 128.64.8.2 128.32.8.2",
    (80, 64, 2):   "128.32.8.3 128.32.8.3 32.64.4.2  64.32.8.2  128.32.8.2 64.32.4.2",
    (80, 128, 2):  "64.32.8.2  128.32.8.3 32.64.8.2  32.32.4.1  32.64.8.2  32.32.4.2",
    (80, 256, 2):  "32.32.8.2  64.32.8.2  16.16.4.1  16.16.4.1  16.16.4.1  16.16.4.1",
    (80, 16, 4):   "64.64.4.2  64.64.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (80, 32, 4):   "64.64.4.2  64.64.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (80, 64, 4):   "64.32.4.2  64.32.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (80, 128, 4):  "64.32.4.2  64.32.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (80, 256, 4):  "32.32.4.1  32.32.4.1  16.16.4.1  16.16.4.1  16.16.4.1  16.16.4.1",
    (86, 16, 2):   "128.64.8.3 128.64.8.3 128.32.8.2 128.64.8.2 128.64.8.2 128.32.8.2",
    (86, 32, 2):   "128.64.8.3 128.64.8.3 128.32.8.2 128.32.8.2 128.64.8.2 128.32.8.2",
    (86, 64, 2):   "128.32.8.3 128.32.8.3 64.32.4.2  64.32.8.2  128.32.8.2 64.32.4.2",
    (86, 128, 2):  "64.32.8.2  64.32.4.3  32.64.8.2  32.32.8.2  32.64.8.2  32.32.8.2",
    (86, 256, 2):  "32.32.4.2  64.32.8.2  16.32.4.1  16.16.4.1  16.32.4.1  16.16.4.1",
    (86, 16, 4):   "64.64.4.2  64.64.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (86, 32, 4):   "64.64.4.2  64.64.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (86, 64, 4):   "64.32.4.2  64.32.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (86, 128, 4):  "64.32.4.2  64.32.4.2  32.32.4.1  32.32.4.1  32.32.4.1  32.32.4.1",
    (86, 256, 4):  "32.32.4.1  32.32.4.1  16.16.4.1  16.16.4.1  16.16.4.1  16.16.4.1",
}.items()}
# fmt: on
# Under the interpreter, small tiles so that short test sequences still span many tiles,
# band tiles and tiles beyond the cut-off.
_INTERPRET_TILE = (16, 16, 4, 1)
_MAX_HEAD_DIM = 256


def _skew(block_m: int, block_n: int) -> int:
    return triton.next_power_of_2(block_m + block_n - 1)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _arch(device: torch.device) -> int:
    """The config family of a CUDA device: 90 from Hopper on, 80 for A100 (sm_80), 86 otherwise."""
    capability = torch.cuda.get_device_capability(device)
    return 90 if capability[0] >= 9 else 80 if capability == (8, 0) else 86


def _tiles(D: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    if interpreting():
        return Tiles(*[_INTERPRET_TILE] * len(Tiles._fields))
    return _TILES[(_arch(device), _block_d(D), dtype.itemsize)]


def _fwd_config(
    D: int, dtype: torch.dtype, Lq: int, device: torch.device, has_global: bool = False
) -> tuple[int, int, int, int]:
    tiles = _tiles(D, dtype, device)
    block_m, block_n, warps, stages = tiles.fwd_global if has_global else tiles.fwd
    # Incremental decoding (Lq = 1 against a cache) needs no 128-row query tile.
    block_m = min(block_m, max(16, triton.next_power_of_2(Lq)))
    return block_m, block_n, warps, stages


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products unless PyTorch itself is allowed TF32 for matmuls."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=64)
def _clamped_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple[int, tuple[int, ...]]:
    """The cut-off C and T5's bucket of each clamped distance -C..C.

    C is the smallest distance from which every farther distance of either sign falls in the
    same bucket as infinitely far ones, found from the bucket function itself (float32 math
    included), so clamping at C never changes a bucket.
    """
    span = 2 * max_distance + 2
    far = torch.tensor([-(1 << 30), 1 << 30])
    far_buckets = relative_position_bucket(
        far, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    cut = 1
    for sign, far_bucket in zip((-1, 1), far_buckets.tolist(), strict=True):
        d = torch.arange(span + 1) * sign
        buckets = relative_position_bucket(
            d, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
        )
        differs = torch.nonzero(buckets != far_bucket).flatten()
        if len(differs) and differs[-1].item() == span:
            raise ValueError(
                f"bucketed_attention: max_distance={max_distance} with num_buckets={num_buckets} does not "
                "saturate its buckets; use a max_distance of at least num_buckets"
            )
        cut = max(cut, differs[-1].item() + 1 if len(differs) else 1)
    distances = torch.arange(-cut, cut + 1)
    buckets = relative_position_bucket(
        distances, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return cut, tuple(buckets.tolist())


@torch.compiler.assume_constant_result
def _constant_buckets(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple[int, tuple[int, ...]]:
    """`_clamped_buckets`, which torch.compile runs once at trace time and keeps as a constant."""
    return _clamped_buckets(num_buckets, max_distance, bidirectional)


_ONE_HOT: dict[tuple, torch.Tensor] = {}


def _bucket_one_hot(num_buckets: int, max_distance: int, bidirectional: bool, device: torch.device) -> torch.Tensor:
    """`(2C + 1, num_buckets)` fp32 one-hot of each clamped distance's bucket, kept per device so
    that eager calls copy nothing from the host (torch.compile bakes it in as a constant)."""
    key = (num_buckets, max_distance, bidirectional, device)
    cached = None if torch.compiler.is_compiling() else _ONE_HOT.get(key)
    if cached is None:
        _, buckets = _constant_buckets(num_buckets, max_distance, bidirectional)
        index = torch.tensor(buckets, device=device)
        cached = torch.nn.functional.one_hot(index, num_buckets).to(torch.float32)
        if not torch.compiler.is_compiling():
            _ONE_HOT[key] = cached
    return cached


def distance_table(bias_table: torch.Tensor, *, bidirectional: bool, max_distance: int) -> torch.Tensor:
    """The `(H, 2C + 1)` fp32 bias per clamped distance `-C..C` of a `(num_buckets, H)` table.

    A one-hot matmul rather than an index so that its gradient (back to the table) is a
    deterministic matmul too; fp32 under autocast as well (`transformers` adds the bias in fp32: a
    bf16 table would move T5's scores by up to 0.08).
    """
    one_hot = _bucket_one_hot(bias_table.shape[0], max_distance, bidirectional, bias_table.device)
    with autocast_off(bias_table):
        return (one_hot @ bias_table.float()).t().contiguous()  # (H, 2C + 1)


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' log2-domain log-sum-exp (+inf: no key) as a natural one (-inf: no key)."""
    return torch.where(torch.isinf(lse2), float("-inf"), lse2 / _LOG2E)


def kernel_lse(lse: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`natural_lse` undone for the backward (rows with no key get p = 0), and the gradient on the
    log-sum-exp with those rows zeroed."""
    lse2 = torch.where(torch.isinf(lse), float("inf"), lse * _LOG2E)
    if grad_lse is not None:
        grad_lse = torch.where(torch.isinf(lse), 0.0, grad_lse)
    return lse2, grad_lse


def seed_value(seed: torch.Tensor | None) -> int:
    return int(seed.item()) if seed is not None else 0


def _like_heads(B: int, H: int, L: int, D: int, ref: torch.Tensor) -> torch.Tensor:
    """An empty `(B, H, L, D)` tensor laid out as `(B, L, H, D)`, so that merging the heads after
    attention (`transpose(1, 2).reshape(B, L, H * D)`) is free."""
    return torch.empty(B, L, H, D, dtype=ref.dtype, device=ref.device).transpose(1, 2)


# The dQ programs' slots (`_backward`) take at most this many bytes per launch: a backward runs as
# many launches as it needs, so that they do not grow with B * H * L (one slot per program of a
# whole backward took 4 GiB at t5-11b, B = 32, L = 4096).
_DQ_SCRATCH_BYTES = 64 * 2**20


def _even_chunk(total: int, most: int) -> int:
    """The size of the fewest equal chunks (the last one shorter) that cover `total` with at most `most` each."""
    return triton.cdiv(total, triton.cdiv(total, max(1, most)))


def _dq_chunks(num_m: int, H: int, B: int, slot_bytes: int) -> tuple[int, int, int]:
    """Query tiles, heads and batch elements of one dQ launch (its grid), so that its programs' slots
    of `slot_bytes` each fit in _DQ_SCRATCH_BYTES: whole columns of query tiles first, then whole
    heads. The grid's y and z stay within CUDA's 65,535."""
    programs = _DQ_SCRATCH_BYTES // slot_bytes if slot_bytes else num_m * H * B
    m_chunk = _even_chunk(num_m, programs)
    h_chunk = _even_chunk(H, programs // m_chunk) if m_chunk == num_m else 1
    b_chunk = _even_chunk(B, min(programs // (m_chunk * h_chunk), 65535)) if h_chunk == H else 1
    return m_chunk, h_chunk, b_chunk


def _check_batch_span(*tensors: torch.Tensor | None) -> None:
    """The kernels offset into a batch element in 32 bits (only the batch offsets are 64-bit): refuse a
    `(B, H, L, D)` tensor whose one batch element spans 2**31 elements or more."""
    for t in tensors:
        if t is None:
            continue
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if span >= 2**31:
            raise ValueError(
                f"bucketed_attention: one batch element of a {tuple(t.shape)} tensor with strides {t.stride()} spans "
                f"{span + 1} elements; the kernels take up to 2**31 per batch element (split the heads or the sequence)"
            )


def _cut(dist_table: torch.Tensor | None) -> int:
    return 0 if dist_table is None else (dist_table.shape[1] - 1) // 2


def _kernel_table(dist_table: torch.Tensor | None, q: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """The `(H, 2C + 1)` distance table as a kernel with (block_m, block_n) tiles reads it (`_bias`):
    scaled by log2(e) (the scores are in the log2 domain) and padded with block_m + block_n copies of
    its end values on either side. A placeholder without a bias."""
    if dist_table is None:
        return torch.empty(1, dtype=torch.float32, device=q.device)
    scaled = dist_table * _LOG2E  # (H, 2C + 1)
    pad = block_m + block_n
    H = scaled.shape[0]
    return torch.cat([scaled[:, :1].expand(H, pad), scaled, scaled[:, -1:].expand(H, pad)], dim=1).contiguous()


class GlobalTokens(NamedTuple):
    """LongT5's transient-global tokens as extra keys of every query row: keys and values
    `(B, H, G, D)`, their `(H, 2CG + 1)` distance table (or None), `caps` `(B,)` int32 (each row's
    last global token, -1 for none) and the block size. Query i sits at global position
    `min(i // block_size, caps[b])`; its bias to global g is that of distance `g - position`."""

    k: torch.Tensor
    v: torch.Tensor
    dist_table: torch.Tensor | None
    caps: torch.Tensor
    block_size: int


def _global_args(globals_: GlobalTokens | None, q: torch.Tensor):
    """Kernel arguments for the global tokens (placeholders without them)."""
    if globals_ is None:
        empty = torch.empty(0, 1, 1, 1, dtype=q.dtype, device=q.device)
        return empty, empty, None, torch.empty(1, dtype=torch.int32, device=q.device), 0, 0, 1
    gk, gv = last_dim_contiguous(globals_.k), last_dim_contiguous(globals_.v)
    table = globals_.dist_table
    return gk, gv, table, globals_.caps, gk.shape[2], _cut(table), globals_.block_size


class Segments(NamedTuple):
    """Packed rows as the kernels read them: the `(B, Lq)` and `(B, Lk)` segment ids, int32, rows
    contiguous, padding (ids below 1) as -1 among the queries and -2 among the keys, so that one
    comparison of ids is the whole mask (`_segments`)."""

    q: torch.Tensor
    k: torch.Tensor


def _segments(q_segment_ids: torch.Tensor | None, k_segment_ids: torch.Tensor | None,
              key_padding_mask: torch.Tensor | None = None) -> Segments | None:  # fmt: skip
    """The kernels' ids; a padding mask given too makes its masked keys padding (the launch then
    takes no mask: one comparison stays the whole mask)."""
    if q_segment_ids is None:
        return None
    real_keys = k_segment_ids > 0
    if key_padding_mask is not None:
        real_keys = real_keys & (key_padding_mask != 0)
    q = torch.where(q_segment_ids > 0, q_segment_ids, -1).to(torch.int32).contiguous()
    k = torch.where(real_keys, k_segment_ids, -2).to(torch.int32).contiguous()
    return Segments(q, k)


def _segment_spans(rows: torch.Tensor, cols: torch.Tensor, block: int) -> torch.Tensor:
    """`(B, 2, tiles)` int32: for each tile of `block` rows, the columns [lo, hi) that its rows' segments
    meet (lo > hi where none do: a tile of padding). Each segment id's columns are spanned by their
    first and last; ids past the column count share one span, wider but still containing theirs, so
    a tile is never cut short. Contiguous segments give exact bounds."""
    B, n_rows = rows.shape
    n_cols = cols.shape[1]
    slots = n_cols + 1  # padding (ids below 1) in slot 0, ids 1 .. n_cols - 1 in their own, the rest in the last

    def slot(ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids < 1, 0, torch.clamp(ids, max=n_cols)).long()

    index = torch.arange(n_cols, device=cols.device, dtype=torch.int32).expand(B, n_cols)
    first = torch.full((B, slots), n_cols, dtype=torch.int32, device=cols.device)
    last = torch.zeros(B, slots, dtype=torch.int32, device=cols.device)
    first = first.scatter_reduce(1, slot(cols), index, "amin")
    last = last.scatter_reduce(1, slot(cols), index + 1, "amax")
    first[:, 0], last[:, 0] = n_cols, 0  # padding columns are never met
    tiles = triton.cdiv(n_rows, block)
    lo = torch.full((B, tiles * block), n_cols, dtype=torch.int32, device=rows.device)
    hi = torch.zeros(B, tiles * block, dtype=torch.int32, device=rows.device)
    lo[:, :n_rows] = first.gather(1, slot(rows))
    hi[:, :n_rows] = last.gather(1, slot(rows))
    return torch.stack([lo.view(B, tiles, block).amin(2), hi.view(B, tiles, block).amax(2)], 1).contiguous()


def _segment_args(segs: Segments | None, q: torch.Tensor, rows: str, block: int) -> tuple:
    """Kernel arguments for packed rows: query ids, key ids and the spans of the launch's tiles of
    `rows` ("q": query tiles over keys, "k": key tiles over queries); placeholders without."""
    if segs is None:
        empty = torch.empty(1, 1, dtype=torch.int32, device=q.device)
        return empty, empty, empty
    spans = _segment_spans(segs.q, segs.k, block) if rows == "q" else _segment_spans(segs.k, segs.q, block)
    return segs.q, segs.k, spans


def _forward(q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window=-1, globals_=None,
             segs=None):  # fmt: skip
    """Launch the forward. Returns out `(B, H, Lq, D)` (laid out `(B, Lq, H, D)`) and lse `(B, H, Lq)`
    fp32 (log2 domain). With `globals_` every row also attends to the global tokens; with `segs`
    (packed rows) only the keys of its own segment."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    _check_batch_span(q, k, v, *((globals_.k, globals_.v) if globals_ is not None else ()))
    out = _like_heads(B, H, Lq, D, q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    gk, gv, gtable, caps, G, cut_g, gbs = _global_args(globals_, q)
    block_m, block_n, warps, stages = _fwd_config(D, q.dtype, Lq, q.device, has_global=G > 0)
    kpm = key_mask(key_padding_mask, q.device)
    qseg, kseg, spans = _segment_args(segs, q, "q", block_m)
    grid = (triton.cdiv(Lq, block_m), H, B)
    _bucketed_attention_fwd_kernel[grid](
        q, k, v, _kernel_table(dist_table, q, block_m, block_n), kpm, gk, gv,
        _kernel_table(gtable, q, block_m, block_n), caps, qseg, kseg, spans, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        gk.stride(0), gk.stride(1), gk.stride(2),
        gv.stride(0), gv.stride(1), gv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kpm.stride(0), qseg.stride(0), kseg.stride(0),
        H, Lq, Lk, G, D, q_offset, _cut(dist_table), cut_g, window, scale * _LOG2E, dropout_p, seed,
        HAS_BIAS=dist_table is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=causal, WINDOWED=window >= 0,
        HAS_SEG=segs is not None, HAS_GLOBAL=G > 0, HAS_GBIAS=globals_ is not None and globals_.dist_table is not None,
        DROPOUT=dropout_p > 0.0, GBS=gbs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, lse


def _backward(
    do,
    q,
    k,
    v,
    out,
    lse,
    dist_table,
    key_padding_mask,
    seed,
    causal,
    q_offset,
    scale,
    dropout_p,
    window=-1,
    grad_lse=None,
    globals_=None,
    segs=None,
):
    """Launch the backward. Returns dq, dk, dv (in the layout of `_like_heads`), the `(H, 2C + 1)`
    fp32 gradient of the distance table (empty without a bias) and, with `globals_`, the gradients
    of the global keys, values and distance table (None without)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v, do = (last_dim_contiguous(t) for t in (q, k, v, do))
    _check_batch_span(q, k, v, do, out, *((globals_.k, globals_.v) if globals_ is not None else ()))
    dq = _like_heads(B, H, Lq, D, q)
    dk = _like_heads(B, H, Lk, D, k)
    dv = _like_heads(B, H, Lk, D, v)
    gk, gv, gtable, caps, G, cut_g, gbs = _global_args(globals_, q)
    has_gbias = globals_ is not None and globals_.dist_table is not None
    dgk = dgv = None
    if globals_ is not None:
        dgk, dgv = _like_heads(B, H, G, D, gk), _like_heads(B, H, G, D, gv)
    cut = _cut(dist_table)
    has_bias = dist_table is not None
    tiles = _tiles(D, q.dtype, q.device)
    dq_tile, dkdv_tile = (tiles.dq_global, tiles.dkdv_global) if G > 0 else (tiles.dq, tiles.dkdv)
    block_m, block_n = dq_tile[:2]
    num_m = triton.cdiv(Lq, block_m)
    ddt = torch.zeros(H, 2 * cut + 1 if has_bias else 0, dtype=torch.float32, device=q.device)
    ddtg = torch.zeros(H, 2 * cut_g + 1 if has_gbias else 0, dtype=torch.float32, device=q.device)

    def results():
        return dq, dk, dv, ddt, dgk, dgv, ddtg if has_gbias else None

    if Lq == 0 or Lk == 0:
        for t in (dq, dk, dv, dgk, dgv):
            if t is not None:
                t.zero_()
        return results()
    block_d = _block_d(D)
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    _bucketed_attention_bwd_preprocess_kernel[(num_m, H, B)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        H, Lq, D, BLOCK_M=block_m, BLOCK_D=block_d,
    )  # fmt: skip
    if grad_lse is not None:
        # d lse_i / d s_ij = p_ij: a gradient on the log-sum-exp enters dS = P * (dP - delta) as -grad_lse.
        delta -= grad_lse
    kpm = key_mask(key_padding_mask, q.device)
    common = dict(
        HAS_KPM=key_padding_mask is not None, CAUSAL=causal, WINDOWED=window >= 0, DROPOUT=dropout_p > 0.0, GBS=gbs,
        BLOCK_D=block_d, PRECISION=_precision(q.dtype), HAS_SEG=segs is not None,
    )  # fmt: skip
    tail = (scale, scale * _LOG2E, dropout_p, seed)

    def launch_options(tile):
        bm, bn, warps, stages = tile
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    def dkdv(keys_k, keys_v, keys_table, n_keys, keys_cut, key_base, grad_k, grad_v, **flags):
        bm, bn = dkdv_tile[:2]
        qseg, kseg, spans = _segment_args(segs, q, "k", bn)
        _bucketed_attention_bwd_dkdv_kernel[(triton.cdiv(n_keys, bn), H, B)](
            q, keys_k, keys_v, _kernel_table(keys_table, q, bm, bn), kpm, caps, qseg, kseg, spans, do, lse, delta,
            grad_k, grad_v,
            q.stride(0), q.stride(1), q.stride(2),
            keys_k.stride(0), keys_k.stride(1), keys_k.stride(2),
            keys_v.stride(0), keys_v.stride(1), keys_v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            grad_k.stride(0), grad_k.stride(1), grad_k.stride(2),
            kpm.stride(0), qseg.stride(0), kseg.stride(0),
            H, Lq, n_keys, D, q_offset, keys_cut, window, key_base, *tail,
            **dict(common, **flags), **launch_options(dkdv_tile),
        )  # fmt: skip

    dkdv(k, v, dist_table, Lk, cut, 0, dk, dv, HAS_BIAS=has_bias, GLOBAL_KEYS=False)
    if G > 0:
        dkdv(gk, gv, gtable, G, cut_g, Lk, dgk, dgv, HAS_BIAS=has_gbias, GLOBAL_KEYS=True,
             HAS_KPM=False, CAUSAL=False, WINDOWED=False, HAS_SEG=False)  # fmt: skip
    elif dgk is not None:
        dgk.zero_(), dgv.zero_()

    # Each dQ program has a slot: a dS tile for the bias gradient's diagonal sums (it stays in L2), a
    # row of per-distance partials per table and, with global tokens (two launches: the ordinary keys
    # into an fp32 dQ, then the globals on top), its fp32 dQ tile. The launches go in chunks whose
    # slots fit in _DQ_SCRATCH_BYTES, each reusing the same buffers.
    tile = block_m * block_n if has_bias or has_gbias else 0
    row, grow = (2 * cut + 1 if has_bias else 0), (2 * cut_g + 1 if has_gbias else 0)
    partial_tile = block_m * block_d if G > 0 else 0
    chunk = _dq_chunks(num_m, H, B, 4 * (tile + row + grow + partial_tile))
    slots = math.prod(chunk)
    scratch = torch.empty(slots * tile or 1, dtype=torch.float32, device=q.device)
    rows = torch.empty(slots, row, dtype=torch.float32, device=q.device)
    grows = torch.empty(slots, grow, dtype=torch.float32, device=q.device)
    partial = torch.empty(slots * partial_tile or 1, dtype=torch.float32, device=q.device)
    table, gtable = _kernel_table(dist_table, q, block_m, block_n), _kernel_table(gtable, q, block_m, block_n)
    qseg, kseg, spans = _segment_args(segs, q, "q", block_m)

    def dq_launch(grid, bases, ordinary: bool, with_globals: bool):
        _bucketed_attention_bwd_dq_kernel[grid](
            q, k, v, table, kpm, gk, gv, gtable, caps, qseg, kseg, spans, do, lse, delta, dq, partial, rows, grows,
            scratch,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            gk.stride(0), gk.stride(1), gk.stride(2),
            gv.stride(0), gv.stride(1), gv.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            kpm.stride(0), qseg.stride(0), kseg.stride(0), H, Lq, Lk, G, D, q_offset, cut, cut_g, window, *bases, *tail,
            HAS_BIAS=has_bias, ORDINARY=ordinary, HAS_GLOBAL=with_globals, HAS_GBIAS=has_gbias,
            PARTIAL_IN=with_globals, PARTIAL_OUT=ordinary and G > 0, SKEW=_skew(block_m, block_n), **common,
            **launch_options(dq_tile),
        )  # fmt: skip

    for b0 in range(0, B, chunk[2]):
        for h0 in range(0, H, chunk[1]):
            for m0 in range(0, num_m, chunk[0]):
                grid = (min(chunk[0], num_m - m0), min(chunk[1], H - h0), min(chunk[2], B - b0))
                rows.zero_(), grows.zero_()
                dq_launch(grid, (m0, h0, b0), True, False)
                if G > 0:
                    dq_launch(grid, (m0, h0, b0), False, True)
                # The slots' rows, (batch, head, query tile) in the launch, summed per head in a fixed order.
                for grad, partials in ((ddt, rows), (ddtg, grows)):
                    if partials.shape[1]:
                        per_head = partials[: math.prod(grid)].view(*grid[::-1], -1).sum((0, 2))
                        grad[h0 : h0 + grid[1]] += per_head
    return results()


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, bias_table, key_padding_mask, q_segment_ids=None, k_segment_ids=None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"bucketed_attention expects q, k, v of shape (B, H, L, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"bucketed_attention: k and v must be (B={B}, H={H}, Lk, D={D}); got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if bias_table is not None and (bias_table.dim() != 2 or bias_table.shape[1] != H):
        raise ValueError(f"bucketed_attention: bias_table must be (num_buckets, H={H}); got {tuple(bias_table.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        raise ValueError(
            f"bucketed_attention: key_padding_mask must be (B={B}, Lk={k.shape[2]}); "
            f"got {tuple(key_padding_mask.shape)}"
        )
    if (q_segment_ids is None) != (k_segment_ids is None):
        raise ValueError("bucketed_attention: pass both q_segment_ids and k_segment_ids, or neither")
    if q_segment_ids is not None:
        for name, ids, L in (("q", q_segment_ids, q.shape[2]), ("k", k_segment_ids, k.shape[2])):
            if tuple(ids.shape) != (B, L) or ids.is_floating_point() or ids.is_complex():
                raise ValueError(
                    f"bucketed_attention: {name}_segment_ids must be integer (B={B}, L{name}={L}); "
                    f"got {ids.dtype} {tuple(ids.shape)}"
                )


def bucketed_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None = None,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch attention with fp32 math. q `(B, H, Lq, D)`, k/v `(B, H, Lk, D)` -> `(B, H, Lq, D)`.

    A query row with no key to attend (all masked) returns zeros, not NaN.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    scores = torch.matmul(upcast(q), upcast(k).transpose(-1, -2))  # (B, H, Lq, Lk)
    if scale != 1.0:
        scores = scores * scale
    if bias_table is not None:
        bias = relative_bias(
            bias_table, Lq, Lk, bidirectional=bidirectional, max_distance=max_distance, q_offset=q_offset
        )
        scores = scores + bias.to(scores.dtype).unsqueeze(0)  # (B, H, Lq, Lk)
    allowed = None
    if key_padding_mask is not None:
        allowed = (key_padding_mask != 0)[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        i = torch.arange(Lq, device=q.device)[:, None] + q_offset
        j = torch.arange(Lk, device=q.device)[None, :]
        future_ok = (j <= i)[None, None]  # (1, 1, Lq, Lk)
        allowed = future_ok if allowed is None else allowed & future_ok
    if q_segment_ids is not None:
        q_seg, k_seg = q_segment_ids[:, None, :, None], k_segment_ids[:, None, None, :]  # (B, 1, Lq, 1), (B, 1, 1, Lk)
        same = (q_seg == k_seg) & (k_seg > 0)
        allowed = same if allowed is None else allowed & same  # (B, 1, Lq, Lk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    v_acc = upcast(v)
    out = torch.matmul(probs.to(v_acc.dtype), v_acc)  # (B, H, Lq, D)
    if allowed is not None:
        # Masked keys already get exactly zero probability; a row with every key masked would be
        # uniform instead, so zero those rows on the (Lq, D) output rather than the (Lq, Lk) probabilities.
        out = out * allowed.any(-1, keepdim=True)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------
# Autograd and torch.library registration
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("fastseq::bucketed_attention_fwd", mutates_args=(), device_types=None)
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dist_table: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: bool,
    q_offset: int,
    scale: float,
    dropout_p: float,
    window: int,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out `(B, Lq, H, D)` (heads not yet moved to dim 1) and the log-sum-exp of each row's scores
    `(B, H, Lq)` fp32 (-inf for a row with no key), differentiable: LongT5 merges partial softmaxes
    through it. `window` < 0: no window."""
    segs = _segments(q_segment_ids, k_segment_ids, key_padding_mask)
    out, lse2 = _forward(
        q, k, v, dist_table, None if segs else key_padding_mask, seed_value(seed), causal, q_offset, scale, dropout_p,
        window, segs=segs,
    )  # fmt: skip
    return out.transpose(1, 2), natural_lse(lse2)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window,
              q_segment_ids=None, k_segment_ids=None):  # fmt: skip
    B, H, Lq, D = q.shape
    return q.new_empty(B, Lq, H, D), q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op("fastseq::bucketed_attention_bwd", mutates_args=(), device_types=None)
def _bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor | None,
    dist_table: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    causal: bool,
    q_offset: int,
    scale: float,
    dropout_p: float,
    window: int,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq `(B, Lq, H, D)`, dk and dv `(B, Lk, H, D)`, and the `(H, 2C + 1)` gradient of dist_table
    (`(0, 0)` without one)."""
    lse2, grad_lse = kernel_lse(lse, grad_lse)
    segs = _segments(q_segment_ids, k_segment_ids, key_padding_mask)
    dq, dk, dv, ddt, *_ = _backward(
        do, q, k, v, out, lse2, dist_table, None if segs else key_padding_mask, seed_value(seed), causal, q_offset,
        scale, dropout_p, window, grad_lse, segs=segs,
    )  # fmt: skip
    if dist_table is None:
        ddt = ddt.new_zeros(0, 0)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), ddt


@_bwd_op.register_fake
def _bwd_fake(
    do,
    q,
    k,
    v,
    out,
    lse,
    grad_lse,
    dist_table,
    key_padding_mask,
    seed,
    causal,
    q_offset,
    scale,
    dropout_p,
    window,
    q_segment_ids=None,
    k_segment_ids=None,
):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    # The table's gradient is fp32 whatever the table's dtype, as `_backward` returns it.
    ddt = q.new_empty(dist_table.shape if dist_table is not None else (0, 0), dtype=torch.float32)
    return q.new_empty(B, Lq, H, D), k.new_empty(B, Lk, H, D), v.new_empty(B, Lk, H, D), ddt


def _setup_context(ctx, inputs, output):
    q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window, q_seg, k_seg = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, dist_table, key_padding_mask, seed, q_seg, k_seg)
    ctx.args = (causal, q_offset, scale, dropout_p, window)


def _backward_op(ctx, grad_out, grad_lse):
    q, k, v, out, lse, dist_table, key_padding_mask, seed, q_seg, k_seg = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, ddt = torch.ops.fastseq.bucketed_attention_bwd(
        grad_out.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, grad_lse, dist_table, key_padding_mask, seed,
        *ctx.args, q_seg, k_seg,
    )  # fmt: skip
    return (
        dq.transpose(1, 2),
        dk.transpose(1, 2),
        dv.transpose(1, 2),
        ddt if dist_table is not None else None,
        *([None] * 9),
    )


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def attention_with_lse(
    q,
    k,
    v,
    dist_table,
    *,
    key_padding_mask=None,
    causal=False,
    q_offset=0,
    scale=1.0,
    dropout_p=0.0,
    window=-1,
    q_segment_ids=None,
    k_segment_ids=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton attention on a prepared `(H, 2C + 1)` distance table (or None), returning the
    output `(B, H, Lq, D)` and each row's log-sum-exp `(B, H, Lq)` fp32 (-inf where no key is
    allowed), both differentiable. `window` >= 0 limits keys to |j - (q_offset + i)| <= window;
    segment ids (packed rows) to the keys of the query's segment."""
    seed = None
    if dropout_p > 0.0:
        # Drawn from PyTorch's CPU generator, so torch.manual_seed fixes the dropout mask.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    out, lse = torch.ops.fastseq.bucketed_attention_fwd(
        q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, float(scale), float(dropout_p), int(window),
        q_segment_ids, k_segment_ids,
    )  # fmt: skip
    return out.transpose(1, 2), lse  # (B, H, Lq, D), (B, H, Lq)


def _bucketed_attention_triton(
    q,
    k,
    v,
    bias_table,
    *,
    bidirectional,
    max_distance,
    causal,
    key_padding_mask,
    q_offset,
    scale,
    dropout_p,
    q_segment_ids,
    k_segment_ids,
) -> torch.Tensor:
    dist_table = None
    if bias_table is not None:
        dist_table = distance_table(bias_table, bidirectional=bidirectional, max_distance=max_distance)
    out, _ = attention_with_lse(
        q, k, v, dist_table, key_padding_mask=key_padding_mask, causal=causal, q_offset=q_offset, scale=scale,
        dropout_p=dropout_p, q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
    )  # fmt: skip
    return out


def _unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None."""
    if reason := unsupported_dtypes(q):
        return reason
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (the kernel takes up to {_MAX_HEAD_DIM})"
    return None


def bucketed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None = None,
    *,
    bidirectional: bool = True,
    max_distance: int = 128,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    q_segment_ids: torch.Tensor | None = None,
    k_segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """T5 attention. q `(B, H, Lq, D)`, k/v `(B, H, Lk, D)`, bias_table `(num_buckets, H)` or None,
    key_padding_mask `(B, Lk)` (nonzero = attend) -> `(B, H, Lq, D)` in q's dtype. Packed rows give
    q_segment_ids `(B, Lq)` and k_segment_ids `(B, Lk)` (integer, 1, 2, ... per example, 0 = padding):
    query i sees key j only where both ids are equal and positive; the bias stays over row positions,
    exact since no allowed pair crosses a segment. Under autocast
    q, k and v are cast to autocast's dtype (as for `F.scaled_dot_product_attention`); the bias stays
    fp32 and the softmax runs in fp32, as in `transformers`.

    The Triton path is deterministic: the same inputs (and seed, with dropout) give bitwise the
    same outputs and gradients, with no atomics in forward or backward.
    """
    _check_inputs(q, k, v, bias_table, key_padding_mask, q_segment_ids, k_segment_ids)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"bucketed_attention: dropout_p must be in [0, 1); got {dropout_p}")
    if q_offset < 0:
        raise ValueError(f"bucketed_attention: q_offset must be >= 0; got {q_offset}")
    kwargs = dict(
        bidirectional=bidirectional,
        max_distance=max_distance,
        causal=causal,
        key_padding_mask=key_padding_mask,
        q_offset=q_offset,
        scale=scale,
        dropout_p=dropout_p,
        q_segment_ids=q_segment_ids,
        k_segment_ids=k_segment_ids,
    )
    if dtype := autocast_dtype(q, k, v):
        with autocast_off(q):
            return bucketed_attention(*autocast_cast(dtype, q, k, v), bias_table, **kwargs)
    unsupported = functools.partial(_unsupported, q)
    if use_triton("bucketed_attention", HAS_TRITON_KERNEL, q, k, v, unsupported=unsupported):
        return _bucketed_attention_triton(q, k, v, bias_table, **kwargs)
    return bucketed_attention_reference(q, k, v, bias_table, **kwargs)


# Feature sets of the compile-only builds. The heaviest that a launcher can pick: T5's decoder
# self-attention in training, padded or packed (a padding mask given with segment ids is folded into
# the keys' ids, `_segments`: no launch has both), and LongT5's transient-global attention in
# training; then the sets whose instruction counts price a feature on the same tile (`PRICES`).
_OFF = dict(HAS_BIAS=False, HAS_KPM=False, CAUSAL=False, WINDOWED=False, HAS_SEG=False, HAS_GLOBAL=False,
            HAS_GBIAS=False, DROPOUT=False)  # fmt: skip
FEATURES = {
    "t5": dict(_OFF, HAS_BIAS=True, HAS_KPM=True, CAUSAL=True, DROPOUT=True),
    "t5-pack": dict(_OFF, HAS_BIAS=True, HAS_SEG=True, CAUSAL=True, DROPOUT=True),
    "longt5": dict(_OFF, HAS_BIAS=True, HAS_KPM=True, WINDOWED=True, HAS_GLOBAL=True, HAS_GBIAS=True, DROPOUT=True),
    "none": dict(_OFF),
    "pad": dict(_OFF, HAS_KPM=True),
    "bias-pad": dict(_OFF, HAS_BIAS=True, HAS_KPM=True),
    "pack": dict(_OFF, HAS_SEG=True),
    "bias-pack": dict(_OFF, HAS_BIAS=True, HAS_SEG=True),
    "local-global": dict(_OFF, HAS_BIAS=True, HAS_KPM=True, WINDOWED=True, HAS_GLOBAL=True, HAS_GBIAS=True),
}
# (priced build, baseline build, at most this many times the baseline's SASS instructions), for
# bf16 at D = 64 and 128 on sm_80 and sm_90 (build names without the "-sm{arch}-D{d}-bf16" tail).
PRICES = [
    ("fwd-bias-pad", "fwd-none", 1.5),  # T5's bias (padding on) against the same tile without either
    ("dq-bias-pad+dkdv-bias-pad", "dq-none+dkdv-none", 2.0),  # the backward with the table's gradient
    ("fwd_global-local-global", "fwd_global-none", 2.5),  # LongT5 local + transient-global
    # Packed rows (segment ids and the tile bounds of their spans) against a padding mask, T5's
    # self-attention (bias) and cross-attention (none).
    ("fwd-bias-pack", "fwd-bias-pad", 1.15),
    ("fwd-pack", "fwd-pad", 1.15),
    ("dq-bias-pack+dkdv-bias-pack", "dq-bias-pad+dkdv-bias-pad", 1.15),
    ("dq-pack+dkdv-pack", "dq-pad+dkdv-pad", 1.15),
]
# (build, baseline): no more warp shuffles than the baseline (the bias spread and the segment masks
# cost none).
SHUFFLE_BOUNDS = [
    ("fwd-bias-pad", "fwd-pad"),
    *((f"{kernel}-{bias}pack", f"{kernel}-{bias}pad") for kernel in ("fwd", "dq", "dkdv") for bias in ("", "bias-")),
]
# Builds compiled only as a price's baseline, never launched: no launcher runs the global-token tile
# without global tokens.
BASELINES_ONLY = ("fwd_global-none",)


# Batch strides of the padding mask and the segment ids: their rows are as long as the sequence, any length.
_ANY_LENGTH = ("stride_kpmb", "stride_qsegb", "stride_ksegb")


def compile_specs() -> list:
    """Every configuration the launchers can pick on a GPU, for the compile-only tests and the
    static report (`_compile`): for every tile of `_TILES`, the forward with T5's heaviest features,
    the decoding tile (Lq = 1) with them, the forward with LongT5's global tokens, the backward's
    dQ and dK/dV kernels with each, LongT5's second dQ launch and global dK/dV, the backward's
    preprocessing; fp16 once per architecture (its buffers are bf16's); for bf16 at D = 64 and 128
    on sm_80 and sm_90 also the builds that `PRICES` and `SHUFFLE_BOUNDS` compare. Each is built as
    Triton specializes it for the usual inputs (aligned buffers, strides and D multiples of 16), and
    its batch strides are held to 64-bit products. Names read `<kernel>-<features>-sm<arch>-D<d>-<dtype>`."""
    from ._compile import CompileSpec, signature

    floats = ("scale", "scale_log2", "dropout_p")
    specs = []
    for (arch, block_d, itemsize), tiles in _TILES.items():
        dtypes = ["bf16", "fp16"] if itemsize == 2 and block_d == 64 else ["bf16" if itemsize == 2 else "fp32"]
        for dtype in dtypes:
            pointers = {n: f"*{dtype}" for n in ("Q", "K", "V", "GK", "GV", "Out", "DO", "DQ", "DK", "DV")}
            pointers.update(DT="*fp32", GDT="*fp32", LSE="*fp32", DELTA="*fp32", DDT="*fp32", DDTG="*fp32",
                                        SCR="*fp32", DQP="*fp32", KPM="*i8", CAP="*i32", QSEG="*i32", KSEG="*i32",
                            SPAN="*i32")  # fmt: skip

            def add(role, features, kernel, tile, extra=(), arch=arch, block_d=block_d, dtype=dtype, pointers=pointers):
                bm, bn, warps, stages = tile
                ce = dict(
                    FEATURES[features],
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    BLOCK_D=block_d,
                    SKEW=_skew(bm, bn),
                    GBS=16,
                    PRECISION="ieee",
                    ORDINARY=True,
                    PARTIAL_IN=False,
                    PARTIAL_OUT=False,
                    GLOBAL_KEYS=False,
                )
                ce.update(extra)
                ce = {n: v for n, v in ce.items() if n in kernel.arg_names}
                name = f"{role}-{features}-sm{arch}-D{block_d}-{dtype}"
                options = dict(num_warps=warps, num_stages=stages)
                sig = signature(kernel, pointers, floats, ce)
                batch_strides = tuple(n for n in kernel.arg_names if n.startswith("stride_") and n.endswith("b"))
                # What Triton specializes at launch for inputs with D = BLOCK_D: fresh (16-byte aligned)
                # buffers, and the strides of (B, H, L, D) tensors, multiples of D.
                aligned = tuple(
                    n
                    for n in kernel.arg_names
                    if sig[n].startswith("*") or n == "D" or (n.startswith("stride_") and n not in _ANY_LENGTH)
                )
                specs.append(CompileSpec(name, kernel.__name__, sig, ce, options, arch, wide=batch_strides,
                                         aligned=aligned))  # fmt: skip

            fwd, bwd_dq, bwd_dkdv = _bucketed_attention_fwd_kernel, _bucketed_attention_bwd_dq_kernel, \
                _bucketed_attention_bwd_dkdv_kernel  # fmt: skip
            add("fwd", "t5", fwd, tiles.fwd)
            add("fwd", "t5-pack", fwd, tiles.fwd)
            add("decode", "t5", fwd, (16,) + tiles.fwd[1:])
            add("fwd_global", "longt5", fwd, tiles.fwd_global)
            add("dq", "t5", bwd_dq, tiles.dq)
            add("dkdv", "t5", bwd_dkdv, tiles.dkdv)
            add("dq", "t5-pack", bwd_dq, tiles.dq)
            add("dkdv", "t5-pack", bwd_dkdv, tiles.dkdv)
            no_globals = dict(HAS_GLOBAL=False, HAS_GBIAS=False)
            add("dq_local", "longt5", bwd_dq, tiles.dq_global, dict(no_globals, PARTIAL_OUT=True))
            add("dq_global", "longt5", bwd_dq, tiles.dq_global, dict(ORDINARY=False, PARTIAL_IN=True))
            add("dkdv_local", "longt5", bwd_dkdv, tiles.dkdv_global, no_globals)
            add("dkdv_global", "longt5", bwd_dkdv, tiles.dkdv_global,
                dict(GLOBAL_KEYS=True, HAS_KPM=False, CAUSAL=False, WINDOWED=False))  # fmt: skip
            if dtype != "fp16":
                add("pre", "none", _bucketed_attention_bwd_preprocess_kernel, tiles.dq)
            if dtype == "bf16" and block_d in (64, 128) and arch in (80, 90):
                for features in ("none", "pad", "bias-pad", "pack", "bias-pack"):
                    add("fwd", features, fwd, tiles.fwd)
                for features in ("none", "pad", "bias-pad", "pack", "bias-pack"):
                    add("dq", features, bwd_dq, tiles.dq)
                    add("dkdv", features, bwd_dkdv, tiles.dkdv)
                for features in ("none", "local-global"):
                    add("fwd_global", features, fwd, tiles.fwd_global)
    return specs
