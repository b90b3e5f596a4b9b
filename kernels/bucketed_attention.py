"""Attention with T5's bucketed relative-position bias, fused in Triton, forward and backward.

The bias of query i and key j is `bias_table[bucket(j - (q_offset + i)), h]`, where `bucket` is
T5's relative-position bucket function. It depends only on the distance `d = j - (q_offset + i)`,
and every distance at or beyond a cut-off `C` (just past `max_distance`) falls in the last bucket
of its sign. So the launcher turns the `(num_buckets, H)` table into a per-head table over the
clamped distances `-C..C` (`2C + 1` entries, exact buckets computed once on the host), and the
kernels read `dist_table[h, clamp(d, -C, C) + C]`. No `(B, H, Lq, Lk)` tensor exists, forward or
backward: a key tile lying wholly beyond the cut-off reads one number per head, a tile on the
band `|d| < C` loads its `BLOCK_M + BLOCK_N - 1` distances and spreads them over the tile.

The gradient of the table is the sum of dS along diagonals. The dQ kernel owns one query tile
and walks the key tiles, so it reduces each band tile along its diagonals (a skew by
`tl.gather`, then a column sum) into an fp32 register vector over the `2C + 1` distances, and
tiles beyond the cut-off into two scalars; each program writes its own row of partials, summed
on the host. No atomics anywhere: forward and backward are bitwise deterministic.

The same kernels serve LongT5's encoder (`fastseq.kernels.local_attention`): with a key window a
query tile visits only the key tiles within `window` of it, and with global tokens
(`GlobalTokens`) it then goes on over every global token in the same online softmax. The global
bias depends on `g - position(i)` with `position(i) = min(i // block_size, cap)`, which rises by at
most one per row, so a tile of global scores is a band too: element (m, n) lies at distance
`(g0 - highest position) + n + shift[m]`, the same spread (forward) and skew (bias gradient) with a
per-row shift instead of the diagonal one. The global tokens' dK/dV is the dK/dV kernel run over
every query tile. The forward also returns each row's log-sum-exp; a gradient on it enters the
backward as a shift of rowsum(dO * O).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._backend import interpreting, key_mask, last_dim_contiguous, unsupported_dtypes, upcast, use_triton

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
def _spread_bias(s, DT_h, d_min, d_max, shift, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKEW: tl.constexpr):
    """Add to the log2-domain scores `s` the bias of a tile whose element (m, n) lies at distance
    `d_min + n + shift[m]` (clamped to -C..C), read from the per-distance table `DT_h`."""
    if d_min >= C:
        s += tl.load(DT_h + 2 * C) * 1.4426950408889634
    elif d_max <= -C:
        s += tl.load(DT_h) * 1.4426950408889634
    else:
        # A band tile has at most BLOCK_M + BLOCK_N - 1 distinct distances: load those (a short
        # vector) and spread them over the tile in registers. Loading the tile through a 2-D pointer
        # gather instead made the pipeliner stage it in shared memory (+82 KiB at 128 x 64).
        t = tl.arange(0, SKEW)
        dist = tl.minimum(tl.maximum(d_min + t, -C), C)
        per_distance = tl.load(DT_h + dist + C, mask=t < BLOCK_M + BLOCK_N - 1, other=0.0)  # (SKEW,)
        index = tl.arange(0, BLOCK_N)[None, :] + shift[:, None]
        spread = tl.broadcast_to(per_distance[None, :], (BLOCK_M, SKEW))
        s += tl.gather(spread, index, 1) * 1.4426950408889634
    return s


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
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SKEW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scores of one (BLOCK_M, BLOCK_N) tile of ordinary keys in the log2 domain, masked entries at -inf."""
    s = _dot(q, tl.trans(k), PRECISION) * scale_log2
    if HAS_BIAS:
        # Element (m, n) lies at distance n0 + n - (q_offset + m0 + m) = d_min + n + (BLOCK_M - 1 - m).
        d_min = n0 - (q_offset + m0 + BLOCK_M - 1)
        d_max = n0 + BLOCK_N - 1 - (q_offset + m0)
        s = _spread_bias(s, DT_h, d_min, d_max, BLOCK_M - 1 - tl.arange(0, BLOCK_M), C, BLOCK_M, BLOCK_N, SKEW)
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
def _global_rows(offs_m, m0, Lq, cap, gbs, BLOCK_M: tl.constexpr):
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
    SKEW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scores of one tile of global tokens: bias `GDT[h, g - position(i)]`, globals past `cap` masked."""
    s = _dot(q, tl.trans(gk), PRECISION) * scale_log2
    if HAS_GBIAS:
        # Element (m, n) lies at distance g0 + n - position(m) = (g0 - pos_hi) + n + shift[m].
        s = _spread_bias(s, GDT_h, g0 - pos_hi, g0 + BLOCK_N - 1 - pos_lo, shift, CG, BLOCK_M, BLOCK_N, SKEW)
    valid = (offs_g <= cap) & (offs_g < G)
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _key_tiles(m0, Lk, q_offset, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, BLOCK_M, BLOCK_N):
    """The key range [n_start, n_end) a query tile starting at m0 visits (n_start a tile start)."""
    n_start = 0
    n_end = Lk
    if CAUSAL:
        n_end = tl.minimum(Lk, q_offset + m0 + BLOCK_M)
    if WINDOWED:
        # Only the key tiles the window of this query tile touches (LongT5's local attention).
        n_start = (tl.maximum(q_offset + m0 - window, 0) // BLOCK_N) * BLOCK_N
        n_end = tl.minimum(n_end, q_offset + m0 + BLOCK_M + window)
    return n_start, n_end


@triton.jit
def _dropout_keep(seed, bh, offs_m, key_ids, Lq, keys, dropout_p):
    """Counter-based keep mask: Philox keyed by the call's seed, with the element's 64-bit index
    ((b * H + h) * Lq + i) * keys + key_id as counter, so no two elements of any call share a draw.
    `keys` counts every key of a row: the ordinary ones, then the global tokens."""
    row = bh.to(tl.int64) * Lq + offs_m
    r = tl.rand(seed, row[:, None] * keys + key_ids[None, :])
    return r >= dropout_p


@triton.jit
def _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok):
    """One tile of keys and values (rows past Lk and columns past D read as zeros)."""
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = tl.load(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _softmax_step(
    s, v, m_i, l_i, acc, seed, bh, offs_m, key_ids, Lq, keys, dropout_p, DROPOUT: tl.constexpr, PRECISION: tl.constexpr
):
    """One online-softmax step over a tile of scores (log2 domain) and its values."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key so far masked keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m, key_ids, Lq, keys, dropout_p)
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
    gbs,  # global block size: query i sits at global position min(i // gbs, cap)
    scale_log2,
    dropout_p,
    seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_GBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKEW: tl.constexpr,  # next power of two >= BLOCK_M + BLOCK_N - 1: the diagonals of one tile
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=(offs_m < Lq)[:, None] & d_ok[None, :],
        other=0.0,
    )
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    DT_h = DT + h * (2 * C + 1)
    KPM_b = KPM + b * stride_kpmb
    keys = Lk + G

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    n_start, n_end = _key_tiles(m0, Lk, q_offset, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok)
        s = _tile_scores(
            q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2,
            HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N, SKEW, PRECISION,
        )  # fmt: skip
        m_i, l_i, acc = _softmax_step(
            s, v, m_i, l_i, acc, seed, bh, offs_m, offs_n, Lq, keys, dropout_p, DROPOUT, PRECISION
        )
    if HAS_GLOBAL:
        # LongT5's transient-global tokens: the same softmax goes on over every global token.
        cap = tl.load(CAP + b)
        pos_lo, pos_hi, shift = _global_rows(offs_m, m0, Lq, cap, gbs, BLOCK_M)
        GK_bh = GK + b * stride_gkb + h * stride_gkh
        GV_bh = GV + b * stride_gvb + h * stride_gvh
        GDT_h = GDT + h * (2 * CG + 1)
        for g0 in range(0, tl.minimum(G, cap + 1), BLOCK_N):
            offs_g = g0 + tl.arange(0, BLOCK_N)
            gk, gv = _load_kv(GK_bh, GV_bh, offs_g, G, stride_gkn, stride_gvn, offs_d, d_ok)
            s = _global_tile_scores(
                q, gk, GDT_h, offs_g, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2,
                HAS_GBIAS, BLOCK_M, BLOCK_N, SKEW, PRECISION,
            )  # fmt: skip
            m_i, l_i, acc = _softmax_step(
                s, gv, m_i, l_i, acc, seed, bh, offs_m, Lk + offs_g, Lq, keys, dropout_p, DROPOUT, PRECISION
            )
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    row_ok = offs_m < Lq
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh * Lq + offs_m, lse, mask=row_ok)


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
    b = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bucketed_attention_bwd_dkdv_kernel(
    # pointers
    Q,
    K,  # the ordinary keys, or the global tokens (GLOBAL_KEYS)
    V,
    DT,  # the distance table of those keys
    KPM,
    CAP,  # (B,) int32, with GLOBAL_KEYS: last global token of each row
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
    # sizes and scalars
    H,
    Lq,
    Lk,  # keys of this launch (G with GLOBAL_KEYS)
    D,
    q_offset,
    C,
    window,  # keys at distance |j - (q_offset + i)| <= window only (with WINDOWED)
    gbs,
    key_base,  # dropout index of this launch's first key in a row (Lk of the ordinary keys for globals)
    keys,  # dropout keys per row: ordinary plus global
    scale,
    scale_log2,
    dropout_p,
    seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    GLOBAL_KEYS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKEW: tl.constexpr,  # next power of two >= BLOCK_M + BLOCK_N - 1: the diagonals of one tile
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0
    )
    Q_bh = Q + b * stride_qb + h * stride_qh
    DO_bh = DO + b * stride_dob + h * stride_doh
    DT_h = DT + h * (2 * C + 1)
    KPM_b = KPM + b * stride_kpmb

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
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q_bh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO_bh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
        if GLOBAL_KEYS:
            pos_lo, pos_hi, shift = _global_rows(offs_m, m0, Lq, cap, gbs, BLOCK_M)
            s = _global_tile_scores(
                q, k, DT_h, offs_n, n0, Lk, cap, pos_lo, pos_hi, shift, C, scale_log2,
                HAS_BIAS, BLOCK_M, BLOCK_N, SKEW, PRECISION,
            )  # fmt: skip
        else:
            s = _tile_scores(
                q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2,
                HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N, SKEW, PRECISION,
            )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])  # rows without keys have lse = +inf: p = 0
        dp = _dot(do, tl.trans(v), PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, key_base + offs_n, Lq, keys, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            z = tl.where(keep, p * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            z = p
        dv += _dot(tl.trans(z.to(do.dtype)), do, PRECISION)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
    dk = dk * scale
    dkv_off = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    tl.store(DK + dkv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + dkv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bias_grad_tile(
    ds, shift, d_min, d_max, C, ddt, d_neg, d_pos, BLOCK_N: tl.constexpr, SKEW: tl.constexpr, T_PAD: tl.constexpr
):
    """Add a tile's dS, element (m, n) at distance `d_min + n + shift[m]`, to the per-distance
    gradient: interior distances |d| < C into the vector `ddt`, the clamped ends into two scalars."""
    if d_min >= C:
        d_pos += tl.sum(tl.sum(ds, 1), 0)
    elif d_max <= -C:
        d_neg += tl.sum(tl.sum(ds, 1), 0)
    else:
        # Skew: column t of `sheared` holds every element at distance d_min + t.
        skew = tl.arange(0, SKEW)
        col = skew[None, :] - shift[:, None]  # (BLOCK_M, SKEW) key index in the tile
        on_tile = (col >= 0) & (col < BLOCK_N)
        sheared = tl.gather(ds, tl.minimum(tl.maximum(col, 0), BLOCK_N - 1), 1)
        diag = tl.sum(tl.where(on_tile, sheared, 0.0), 0)  # (SKEW,)
        dist = d_min + skew
        d_pos += tl.sum(tl.where(dist >= C, diag, 0.0), 0)
        d_neg += tl.sum(tl.where(dist <= -C, diag, 0.0), 0)
        slots = tl.arange(0, T_PAD)
        interior = (slots > 0) & (slots < 2 * C)
        src = slots - C - d_min  # diagonal feeding each distance slot
        take = interior & (src >= 0) & (src < SKEW)
        ddt += tl.where(take, tl.gather(diag, tl.minimum(tl.maximum(src, 0), SKEW - 1), 0), 0.0)
    return ddt, d_neg, d_pos


@triton.jit
def _store_bias_grad(DDT_row, ddt, d_neg, d_pos, C, T_PAD: tl.constexpr):
    slots = tl.arange(0, T_PAD)
    ddt = tl.where(slots == 0, ddt + d_neg, ddt)
    ddt = tl.where(slots == 2 * C, ddt + d_pos, ddt)
    tl.store(DDT_row + slots, ddt, mask=slots < 2 * C + 1)


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
    DO,
    LSE,
    DELTA,
    DQ,
    DDT,  # (B, H, num_m_tiles, 2C + 1) fp32 partial gradients of DT, one row per program
    DDTG,  # (B, H, num_m_tiles, 2CG + 1) the same for GDT
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
    gbs,
    scale,
    scale_log2,
    dropout_p,
    seed,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    HAS_GLOBAL: tl.constexpr,
    HAS_GBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKEW: tl.constexpr,  # next power of two >= BLOCK_M + BLOCK_N - 1: the diagonals of one tile
    T_PAD: tl.constexpr,  # next power of two >= 2C + 1: the clamped distances
    TG_PAD: tl.constexpr,  # next power of two >= 2CG + 1
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * H + h
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_ok = offs_m < Lq
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0
    )
    lse = tl.load(LSE + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=row_ok, other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    DT_h = DT + h * (2 * C + 1)
    KPM_b = KPM + b * stride_kpmb
    keys = Lk + G
    num_m = tl.num_programs(0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Bias-table gradient of this query tile: interior distances |d| < C in registers, the two
    # clamped ends (d <= -C, d >= C) as scalars.
    ddt = tl.zeros((T_PAD,), tl.float32)
    d_neg = tl.sum(tl.zeros((1,), tl.float32), 0)
    d_pos = tl.sum(tl.zeros((1,), tl.float32), 0)
    diagonal_shift = BLOCK_M - 1 - tl.arange(0, BLOCK_M)
    n_start, n_end = _key_tiles(m0, Lk, q_offset, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok)
        s = _tile_scores(
            q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2,
            HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N, SKEW, PRECISION,
        )  # fmt: skip
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, offs_m, offs_n, Lq, keys, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
        if HAS_BIAS:
            d_min = n0 - (q_offset + m0 + BLOCK_M - 1)
            d_max = n0 + BLOCK_N - 1 - (q_offset + m0)
            ddt, d_neg, d_pos = _bias_grad_tile(
                ds, diagonal_shift, d_min, d_max, C, ddt, d_neg, d_pos, BLOCK_N, SKEW, T_PAD
            )
    if HAS_GLOBAL:
        cap = tl.load(CAP + b)
        pos_lo, pos_hi, shift = _global_rows(offs_m, m0, Lq, cap, gbs, BLOCK_M)
        GK_bh = GK + b * stride_gkb + h * stride_gkh
        GV_bh = GV + b * stride_gvb + h * stride_gvh
        GDT_h = GDT + h * (2 * CG + 1)
        gddt = tl.zeros((TG_PAD,), tl.float32)
        g_neg = tl.sum(tl.zeros((1,), tl.float32), 0)
        g_pos = tl.sum(tl.zeros((1,), tl.float32), 0)
        for g0 in range(0, tl.minimum(G, cap + 1), BLOCK_N):
            offs_g = g0 + tl.arange(0, BLOCK_N)
            gk, gv = _load_kv(GK_bh, GV_bh, offs_g, G, stride_gkn, stride_gvn, offs_d, d_ok)
            s = _global_tile_scores(
                q, gk, GDT_h, offs_g, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2,
                HAS_GBIAS, BLOCK_M, BLOCK_N, SKEW, PRECISION,
            )  # fmt: skip
            p = tl.math.exp2(s - lse[:, None])
            dp = _dot(do, tl.trans(gv), PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m, Lk + offs_g, Lq, keys, dropout_p)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(gk.dtype), gk, PRECISION)
            if HAS_GBIAS:
                gddt, g_neg, g_pos = _bias_grad_tile(
                    ds, shift, g0 - pos_hi, g0 + BLOCK_N - 1 - pos_lo, CG, gddt, g_neg, g_pos, BLOCK_N, SKEW, TG_PAD
                )
        if HAS_GBIAS:
            _store_bias_grad(DDTG + (bh * num_m + pid_m) * (2 * CG + 1), gddt, g_neg, g_pos, CG, TG_PAD)
    dq = dq * scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )
    if HAS_BIAS:
        _store_bias_grad(DDT + (bh * num_m + pid_m) * (2 * C + 1), ddt, d_neg, d_pos, C, T_PAD)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture family (90: Hopper and later,
# 227 KiB of shared memory per block; 80: A100, 163 KiB; 86: every other GPU, sm_86/sm_89 with
# 99 KiB), padded head dim and element size. The compile-only tests build every entry for its
# family and check its shared memory against the chip's limit. Below sm_90 the band-tile bias
# spread and the dropout mask take their layout conversions through shared memory: a 128 x 64
# forward tile with every feature on needs 224-272 KiB there, 64 x 64 needs 120-168 KiB (168 at
# D = 128: over sm_80's limit) and 64 x 32 needs 64-92 KiB; sm_90 needs 32-64 KiB for 128 x 64.
_FWD_CONFIGS = {
    (90, 16, 2): (128, 64, 4, 3),
    (90, 32, 2): (128, 64, 4, 3),
    (90, 64, 2): (128, 64, 4, 3),
    (90, 128, 2): (128, 64, 8, 3),
    (90, 256, 2): (64, 32, 4, 2),
    (80, 16, 2): (64, 64, 4, 3),
    (80, 32, 2): (64, 64, 4, 3),
    (80, 64, 2): (64, 64, 4, 3),
    (80, 128, 2): (64, 32, 4, 3),
    (80, 256, 2): (64, 32, 4, 2),
    (86, 16, 2): (64, 32, 4, 2),
    (86, 32, 2): (64, 32, 4, 2),
    (86, 64, 2): (64, 32, 4, 2),
    (86, 128, 2): (64, 32, 4, 2),
    (86, 256, 2): (32, 32, 4, 1),
}
_BWD_CONFIGS = {
    (90, 16, 2): (64, 64, 4, 2),
    (90, 32, 2): (64, 64, 4, 2),
    (90, 64, 2): (64, 64, 4, 2),
    (90, 128, 2): (64, 64, 8, 2),
    (90, 256, 2): (32, 32, 4, 1),
    (80, 16, 2): (64, 64, 4, 2),
    (80, 32, 2): (64, 64, 4, 2),
    (80, 64, 2): (64, 64, 4, 2),
    (80, 128, 2): (64, 64, 8, 2),
    (80, 256, 2): (32, 32, 4, 1),
    (86, 16, 2): (64, 64, 4, 2),
    (86, 32, 2): (64, 64, 4, 2),
    (86, 64, 2): (64, 64, 4, 2),
    (86, 128, 2): (64, 64, 8, 2),
    (86, 256, 2): (32, 32, 4, 1),
}
for _arch in (80, 86, 90):  # fp32: half the tile of the 16-bit configs' smem budget, both architectures
    _FWD_CONFIGS.update({(_arch, 16, 4): (64, 64, 4, 2), (_arch, 32, 4): (64, 64, 4, 2),
                         (_arch, 64, 4): (64, 32, 4, 2), (_arch, 128, 4): (64, 32, 4, 2),
                         (_arch, 256, 4): (32, 32, 4, 1)})  # fmt: skip
    _BWD_CONFIGS.update({(_arch, 16, 4): (32, 32, 4, 1), (_arch, 32, 4): (32, 32, 4, 1),
                         (_arch, 64, 4): (32, 32, 4, 1), (_arch, 128, 4): (32, 32, 4, 1),
                         (_arch, 256, 4): (16, 16, 4, 1)})  # fmt: skip
# With LongT5's global tokens the forward runs a second key loop whose bias spread and dropout
# mask take their own shared-memory buffers below sm_90: the 16-bit tiles that no longer fit
# there (compile-only tests: 64 x 64 grows to 252-264 KiB on sm_80, 64 x 32 to 127-148 KiB on
# sm_86) are narrowed for that case; sm_90 and every fp32 tile keep their configs.
_FWD_GLOBAL_CONFIGS = {
    (80, 16, 2): (64, 32, 4, 3),
    (80, 32, 2): (64, 32, 4, 3),
    (80, 64, 2): (64, 32, 4, 3),
    (80, 256, 2): (32, 32, 4, 2),
    (86, 16, 2): (32, 32, 4, 2),
    (86, 32, 2): (32, 32, 4, 2),
    (86, 64, 2): (32, 32, 4, 2),
    (86, 128, 2): (32, 32, 4, 2),
}
# Under the interpreter, small tiles so that short test sequences still span many tiles,
# band tiles and tiles beyond the cut-off.
_INTERPRET_CONFIG = (16, 16, 4, 1)
_MAX_HEAD_DIM = 256
_MAX_DISTANCES = 4096  # 2C + 1 per-distance gradients held in the registers of one dQ program


def _skew(block_m: int, block_n: int) -> int:
    return triton.next_power_of_2(block_m + block_n - 1)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _arch(device: torch.device) -> int:
    """The config family of a CUDA device: 90 from Hopper on, 80 for A100 (sm_80), 86 otherwise."""
    capability = torch.cuda.get_device_capability(device)
    return 90 if capability[0] >= 9 else 80 if capability == (8, 0) else 86


def _fwd_config(
    D: int, dtype: torch.dtype, Lq: int, device: torch.device, has_global: bool = False
) -> tuple[int, int, int, int]:
    if interpreting():
        return _INTERPRET_CONFIG
    key = (_arch(device), _block_d(D), dtype.itemsize)
    configs = _FWD_GLOBAL_CONFIGS if has_global and key in _FWD_GLOBAL_CONFIGS else _FWD_CONFIGS
    block_m, block_n, warps, stages = configs[key]
    # Incremental decoding (Lq = 1 against a cache) needs no 128-row query tile.
    block_m = min(block_m, max(16, triton.next_power_of_2(Lq)))
    return block_m, block_n, warps, stages


def _bwd_config(D: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    if interpreting():
        return _INTERPRET_CONFIG
    return _BWD_CONFIGS[(_arch(device), _block_d(D), dtype.itemsize)]


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
    deterministic matmul too.
    """
    one_hot = _bucket_one_hot(bias_table.shape[0], max_distance, bidirectional, bias_table.device)
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


def _cut(dist_table: torch.Tensor | None) -> int:
    return 0 if dist_table is None else (dist_table.shape[1] - 1) // 2


def _dummy(dist_table: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    return dist_table if dist_table is not None else torch.empty(1, dtype=torch.float32, device=q.device)


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
        return empty, empty, _dummy(None, q), torch.empty(1, dtype=torch.int32, device=q.device), 0, 0, 1
    gk, gv = last_dim_contiguous(globals_.k), last_dim_contiguous(globals_.v)
    table = globals_.dist_table
    return gk, gv, _dummy(table, q), globals_.caps, gk.shape[2], _cut(table), globals_.block_size


def _forward(q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window=-1, globals_=None):
    """Launch the forward. Returns out `(B, H, Lq, D)` (laid out `(B, Lq, H, D)`) and lse `(B, H, Lq)`
    fp32 (log2 domain). With `globals_` every row also attends to the global tokens."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out = _like_heads(B, H, Lq, D, q)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    gk, gv, gtable, caps, G, cut_g, gbs = _global_args(globals_, q)
    block_m, block_n, warps, stages = _fwd_config(D, q.dtype, Lq, q.device, has_global=G > 0)
    kpm = key_mask(key_padding_mask, q.device)
    grid = (triton.cdiv(Lq, block_m), H, B)
    _bucketed_attention_fwd_kernel[grid](
        q, k, v, _dummy(dist_table, q), kpm, gk, gv, gtable, caps, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        gk.stride(0), gk.stride(1), gk.stride(2),
        gv.stride(0), gv.stride(1), gv.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kpm.stride(0),
        H, Lq, Lk, G, D, q_offset, _cut(dist_table), cut_g, window, gbs, scale * _LOG2E, dropout_p, seed,
        HAS_BIAS=dist_table is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=causal, WINDOWED=window >= 0,
        HAS_GLOBAL=G > 0, HAS_GBIAS=globals_ is not None and globals_.dist_table is not None,
        DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        SKEW=_skew(block_m, block_n), PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
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
):
    """Launch the backward. Returns dq, dk, dv (in the layout of `_like_heads`), the `(H, 2C + 1)`
    fp32 gradient of the distance table (empty without a bias) and, with `globals_`, the gradients
    of the global keys, values and distance table (None without)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v, do = (last_dim_contiguous(t) for t in (q, k, v, do))
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
    block_m, block_n, warps, stages = _bwd_config(D, q.dtype, q.device)
    num_m = triton.cdiv(Lq, block_m)
    ddt = torch.zeros(B, H, num_m, 2 * cut + 1 if has_bias else 0, dtype=torch.float32, device=q.device)
    ddtg = torch.zeros(B, H, num_m, 2 * cut_g + 1 if has_gbias else 0, dtype=torch.float32, device=q.device)

    def results():
        return dq, dk, dv, ddt.sum((0, 2)), dgk, dgv, ddtg.sum((0, 2)) if has_gbias else None

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
    kpm = key_mask(key_padding_mask, q.device)
    table = _dummy(dist_table, q)
    common = dict(
        HAS_KPM=key_padding_mask is not None, CAUSAL=causal, WINDOWED=window >= 0, DROPOUT=dropout_p > 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SKEW=_skew(block_m, block_n),
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if grad_lse is not None:
        # d lse_i / d s_ij = p_ij: a gradient on the log-sum-exp enters dS = P * (dP - delta) as -grad_lse.
        delta -= grad_lse
    keys = Lk + G
    tail = (scale, scale * _LOG2E, dropout_p, seed)

    def dkdv(keys_k, keys_v, keys_table, n_keys, keys_cut, key_base, grad_k, grad_v, **flags):
        _bucketed_attention_bwd_dkdv_kernel[(triton.cdiv(n_keys, block_n), H, B)](
            q, keys_k, keys_v, keys_table, kpm, caps, do, lse, delta, grad_k, grad_v,
            q.stride(0), q.stride(1), q.stride(2),
            keys_k.stride(0), keys_k.stride(1), keys_k.stride(2),
            keys_v.stride(0), keys_v.stride(1), keys_v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            grad_k.stride(0), grad_k.stride(1), grad_k.stride(2),
            kpm.stride(0), H, Lq, n_keys, D, q_offset, keys_cut, window, gbs, key_base, keys, *tail,
            **dict(common, **flags),
        )  # fmt: skip

    dkdv(k, v, table, Lk, cut, 0, dk, dv, HAS_BIAS=has_bias, GLOBAL_KEYS=False)
    if G > 0:
        dkdv(gk, gv, gtable, G, cut_g, Lk, dgk, dgv, HAS_BIAS=has_gbias, GLOBAL_KEYS=True,
             HAS_KPM=False, CAUSAL=False, WINDOWED=False)  # fmt: skip
    elif dgk is not None:
        dgk.zero_(), dgv.zero_()
    _bucketed_attention_bwd_dq_kernel[(num_m, H, B)](
        q, k, v, table, kpm, gk, gv, gtable, caps, do, lse, delta, dq, ddt, ddtg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        gk.stride(0), gk.stride(1), gk.stride(2),
        gv.stride(0), gv.stride(1), gv.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        kpm.stride(0), H, Lq, Lk, G, D, q_offset, cut, cut_g, window, gbs, *tail,
        HAS_BIAS=has_bias, HAS_GLOBAL=G > 0, HAS_GBIAS=has_gbias,
        T_PAD=triton.next_power_of_2(2 * cut + 1), TG_PAD=triton.next_power_of_2(2 * cut_g + 1), **common,
    )  # fmt: skip
    return results()


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, bias_table, key_padding_mask) -> None:
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """out `(B, Lq, H, D)` (heads not yet moved to dim 1) and the log-sum-exp of each row's scores
    `(B, H, Lq)` fp32 (-inf for a row with no key), differentiable: LongT5 merges partial softmaxes
    through it. `window` < 0: no window."""
    out, lse2 = _forward(
        q, k, v, dist_table, key_padding_mask, seed_value(seed), causal, q_offset, scale, dropout_p, window
    )
    return out.transpose(1, 2), natural_lse(lse2)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq `(B, Lq, H, D)`, dk and dv `(B, Lk, H, D)`, and the `(H, 2C + 1)` gradient of dist_table
    (`(0, 0)` without one)."""
    lse2, grad_lse = kernel_lse(lse, grad_lse)
    dq, dk, dv, ddt, *_ = _backward(
        do, q, k, v, out, lse2, dist_table, key_padding_mask, seed_value(seed), causal, q_offset, scale, dropout_p,
        window, grad_lse,
    )  # fmt: skip
    if dist_table is None:
        ddt = ddt.new_zeros(0, 0)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), ddt


@_bwd_op.register_fake
def _bwd_fake(
    do, q, k, v, out, lse, grad_lse, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window
):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    ddt = torch.empty_like(dist_table) if dist_table is not None else q.new_empty(0, 0, dtype=torch.float32)
    return q.new_empty(B, Lq, H, D), k.new_empty(B, Lk, H, D), v.new_empty(B, Lk, H, D), ddt


def _setup_context(ctx, inputs, output):
    q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, dist_table, key_padding_mask, seed)
    ctx.args = (causal, q_offset, scale, dropout_p, window)


def _backward_op(ctx, grad_out, grad_lse):
    q, k, v, out, lse, dist_table, key_padding_mask, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, ddt = torch.ops.fastseq.bucketed_attention_bwd(
        grad_out.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, grad_lse, dist_table, key_padding_mask, seed,
        *ctx.args,
    )  # fmt: skip
    return (
        dq.transpose(1, 2),
        dk.transpose(1, 2),
        dv.transpose(1, 2),
        ddt if dist_table is not None else None,
        *([None] * 7),
    )


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def attention_with_lse(
    q, k, v, dist_table, *, key_padding_mask=None, causal=False, q_offset=0, scale=1.0, dropout_p=0.0, window=-1
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton attention on a prepared `(H, 2C + 1)` distance table (or None), returning the
    output `(B, H, Lq, D)` and each row's log-sum-exp `(B, H, Lq)` fp32 (-inf where no key is
    allowed), both differentiable. `window` >= 0 limits keys to |j - (q_offset + i)| <= window."""
    seed = None
    if dropout_p > 0.0:
        # Drawn from PyTorch's CPU generator, so torch.manual_seed fixes the dropout mask.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    out, lse = torch.ops.fastseq.bucketed_attention_fwd(
        q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, float(scale), float(dropout_p), int(window)
    )
    return out.transpose(1, 2), lse  # (B, H, Lq, D), (B, H, Lq)


def _bucketed_attention_triton(
    q, k, v, bias_table, *, bidirectional, max_distance, causal, key_padding_mask, q_offset, scale, dropout_p
) -> torch.Tensor:
    dist_table = None
    if bias_table is not None:
        dist_table = distance_table(bias_table, bidirectional=bidirectional, max_distance=max_distance)
    out, _ = attention_with_lse(
        q, k, v, dist_table, key_padding_mask=key_padding_mask, causal=causal, q_offset=q_offset, scale=scale,
        dropout_p=dropout_p,
    )  # fmt: skip
    return out


def _unsupported(q: torch.Tensor, bias_table, max_distance: int, bidirectional: bool) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None."""
    if reason := unsupported_dtypes(q):
        return reason
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (the kernel takes up to {_MAX_HEAD_DIM})"
    if bias_table is not None:
        cut, _ = _constant_buckets(bias_table.shape[0], max_distance, bidirectional)
        if 2 * cut + 1 > _MAX_DISTANCES:
            return (
                f"max_distance={max_distance}: the backward keeps one gradient per clamped distance in "
                f"registers, at most {_MAX_DISTANCES} (max_distance up to about {_MAX_DISTANCES // 2 - 2})"
            )
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
) -> torch.Tensor:
    """T5 attention. q `(B, H, Lq, D)`, k/v `(B, H, Lk, D)`, bias_table `(num_buckets, H)` or None,
    key_padding_mask `(B, Lk)` (nonzero = attend) -> `(B, H, Lq, D)` in q's dtype.

    The Triton path is deterministic: the same inputs (and seed, with dropout) give bitwise the
    same outputs and gradients, with no atomics in forward or backward.
    """
    _check_inputs(q, k, v, bias_table, key_padding_mask)
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
    )
    unsupported = functools.partial(_unsupported, q, bias_table, max_distance, bidirectional)
    if use_triton("bucketed_attention", HAS_TRITON_KERNEL, q, k, v, unsupported=unsupported):
        return _bucketed_attention_triton(q, k, v, bias_table, **kwargs)
    return bucketed_attention_reference(q, k, v, bias_table, **kwargs)


def compile_specs() -> list:
    """Every configuration the launchers can pick on a GPU, for the compile-only tests (`_compile`):
    each tile config with every feature on (the forward with its global-token config where that
    differs, and then also without global tokens on its own config), the decoding tile (Lq = 1)
    with T5's features, the main head dims (64, 128) with every feature off (the path of
    cross-attention), and fp16 once per architecture (its buffers are bf16's)."""
    from ._compile import CompileSpec, signature

    cut, _ = _clamped_buckets(32, 128, True)  # every published T5 model: 32 buckets, max_distance 128
    t_pad = triton.next_power_of_2(2 * cut + 1)
    all_on = dict(HAS_BIAS=True, HAS_KPM=True, CAUSAL=True, WINDOWED=True, HAS_GLOBAL=True, HAS_GBIAS=True,
                  DROPOUT=True)  # fmt: skip
    t5 = dict(all_on, WINDOWED=False, HAS_GLOBAL=False, HAS_GBIAS=False)
    all_off = {name: False for name in all_on}
    floats = ("scale", "scale_log2", "dropout_p")
    variants = []
    for arch, block_d, itemsize in _FWD_CONFIGS:
        variants.append((arch, block_d, itemsize, "fp32" if itemsize == 4 else "bf16", all_on))
        if itemsize == 2 and block_d in (64, 128):
            variants.append((arch, block_d, itemsize, "bf16", all_off))
        if itemsize == 2 and block_d == 64:
            variants.append((arch, block_d, itemsize, "fp16", all_on))
    specs = []
    for arch, block_d, itemsize, dtype, flags in variants:
        key = (arch, block_d, itemsize)
        fwd, bwd = _FWD_CONFIGS[key], _BWD_CONFIGS[key]
        tag = f"sm{arch}-D{block_d}-{dtype}-{'all' if flags['HAS_BIAS'] else 'none'}"
        pointers = {n: f"*{dtype}" for n in ("Q", "K", "V", "GK", "GV", "Out", "DO", "DQ", "DK", "DV")}
        pointers.update(DT="*fp32", GDT="*fp32", LSE="*fp32", DELTA="*fp32", DDT="*fp32", DDTG="*fp32", KPM="*i8",
                        CAP="*i32")  # fmt: skip

        def add(name, kernel, constexprs, config, tag=tag, pointers=pointers, arch=arch):
            constexprs = {n: v for n, v in constexprs.items() if n in kernel.arg_names}
            options = dict(num_warps=config[2], num_stages=config[3])
            sig = signature(kernel, pointers, floats, constexprs)
            specs.append(CompileSpec(f"{name}-{tag}", kernel.__name__, sig, constexprs, options, arch))

        def add_fwd(config, fwd_flags, suffix="", block_d=block_d):
            block_m, block_n = config[:2]
            ce = dict(fwd_flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SKEW=_skew(block_m, block_n))
            add(f"fwd-M{block_m}N{block_n}{suffix}", _bucketed_attention_fwd_kernel, dict(ce, PRECISION="ieee"), config)

        if flags is all_on and key in _FWD_GLOBAL_CONFIGS:
            add_fwd(_FWD_GLOBAL_CONFIGS[key], flags)
            add_fwd(fwd, t5, "-t5")
        else:
            add_fwd(fwd, flags)
        add_fwd((16,) + fwd[1:], t5 if flags is all_on else flags, "-decode")
        ce = dict(flags, BLOCK_M=bwd[0], BLOCK_N=bwd[1], BLOCK_D=block_d, SKEW=_skew(bwd[0], bwd[1]), PRECISION="ieee")
        add("dkdv", _bucketed_attention_bwd_dkdv_kernel, dict(ce, GLOBAL_KEYS=False), bwd)
        add("dq", _bucketed_attention_bwd_dq_kernel, dict(ce, T_PAD=t_pad, TG_PAD=t_pad if flags["HAS_GLOBAL"] else 1),
            bwd)  # fmt: skip
        if flags is all_on:
            # The global tokens' dK/dV: every query tile against one tile of global tokens.
            local_off = dict(HAS_KPM=False, CAUSAL=False, WINDOWED=False, GLOBAL_KEYS=True)
            add("dkdv-global", _bucketed_attention_bwd_dkdv_kernel, dict(ce, **local_off), bwd)
            if dtype != "fp16":
                add("pre", _bucketed_attention_bwd_preprocess_kernel, dict(BLOCK_M=bwd[0], BLOCK_D=block_d), bwd)
    return specs
