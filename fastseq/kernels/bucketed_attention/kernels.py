"""The `@triton.jit` kernels of the attention: the forward, the backward's preprocessing (rowsum(dO * O)),
dK/dV (one program per key tile) and dQ with the bias tables' gradients (one program per query tile).
They share their loop heads, tiles, masks and bias through the helpers of `jit`."""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import (
    _accumulate,
    _bias_grad_tile,
    _bias_grad_zeros,
    _dot,
    _dropout_base,
    _global_keys,
    _global_rows,
    _global_tile,
    _global_tile_scores,
    _grad_scores,
    _head_chunk,
    _key_tile,
    _load_kv,
    _load_rows,
    _load_seed,
    _program,
    _query_tile_keys,
    _segment_ids,
    _softmax_step,
    _span,
    _store_bias_grad_ends,
    _tile_scores,
    _zero_scratch,
)

# Each signature groups its arguments: pointers, strides (batch, head, row of each (B, H, L, D) tensor,
# whose last dim is contiguous; the batch stride of each (B, L) mask), sizes and scalars, meta-parameters.
#
# Triton specializes an integer argument at launch on its value: 1 becomes a constant, a multiple of 16
# gets a divisibility hint, and each case compiles a kernel of its own. The sizes and scalars below change
# between the calls of one configuration (the lengths, the decoding position, a chunked launch's first
# tile, head and batch element) or are the model's (heads, cut-offs, window): none is specialized, so
# that a configuration compiles once, whatever the batch, and runs the build that the static report holds
# (`tiles.compile_specs` builds them plain; with the lengths taken as multiples of 16, the t5 forwards at
# D = 64 on sm_80 and sm_90 compiled to the same code, the dK/dV key loops lost 2 instructions of 454
# (sm_80) and 662 (sm_90), and sm_90's dQ 8 of 1,368 outside its key loop). The head dim and the strides
# of (B, H, L, D) tensors stay specialized. The dropout seed is a tensor the kernels read (`SEED`).
# fmt: off
_PLAIN = ("H", "Lq", "Lk", "G", "q_offset", "C", "CG", "window", "key_base", "m_base", "h_base", "b_base",
          "stride_qsegb", "stride_ksegb")


@triton.jit(do_not_specialize=_PLAIN)
def _bucketed_attention_fwd_kernel(
    Q, K, V,
    DT,  # (H, 2C + 1) fp32 bias per clamped distance
    KPM,  # (B, Lk rounded up to 64) fp32 added to the scores: 0 attend, -inf padding and past Lk (`key_bias`)
    GK, GV,  # (B, H, G, D) global keys and values (with HAS_GLOBAL)
    GDT,  # (H, 2CG + 1) fp32 bias of the global tokens per clamped distance
    CAP,  # (B,) int32: last global token of each row (-1: none)
    QSEG, KSEG,  # (B, Lq) and (B, Lk) int32 segment ids (with HAS_SEG; padding: -1 and -2)
    SPAN,  # (B, 2, query tiles) int32: the keys [lo, hi) each query tile's segments meet
    Out,
    LSE,  # (B, H, Lq) fp32, log2 domain; +inf for rows with no key
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gkb, stride_gkh, stride_gkn, stride_gvb, stride_gvh, stride_gvn, stride_ob, stride_oh, stride_om,
    stride_kpmb, stride_qsegb, stride_ksegb,
    H, Lq, Lk,
    G,  # global tokens (0 without)
    D, q_offset, C, CG,
    window,  # keys at distance |j - (q_offset + i)| <= window only (with WINDOWED)
    scale_log2, dropout_p,
    SEED,  # (1,) int32: the call's dropout seed, read on the device (with DROPOUT; `_backend.draw_seed`)
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SEG: tl.constexpr,  # packed rows: queries see only the keys of their own segment
    HAS_GLOBAL: tl.constexpr, HAS_GBIAS: tl.constexpr, DROPOUT: tl.constexpr,
    GBS: tl.constexpr,  # global block size: query i sits at global position min(i // GBS, cap)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, b, b64, h, bh, m0, offs_m, offs_d, d_ok = _program(0, 0, 0, H, D, BLOCK_M, BLOCK_D)
    seed = _load_seed(SEED, DROPOUT)
    q = _load_rows(Q, b64, h, offs_m, stride_qb, stride_qh, stride_qm, offs_d, (offs_m < Lq)[:, None] & d_ok[None, :])
    K_bh = K + b64 * stride_kb + h * stride_kh
    V_bh = V + b64 * stride_vb + h * stride_vh
    DT_h = DT + h * (2 * C + 1 + 2 * (BLOCK_M + BLOCK_N))
    KPM_b = KPM + b64 * stride_kpmb
    KSEG_b = KSEG + b64 * stride_ksegb
    qseg, n_start, n_end = _query_tile_keys(QSEG + b64 * stride_qsegb, SPAN, b64, offs_m, m0, Lq, Lk, q_offset, window,
                                            CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v = _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok)
        s = _key_tile(q, k, DT_h, KPM_b, KSEG_b, qseg, offs_m, m0, n0, n_end, Lk, q_offset, C, window, scale_log2,
                      HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N, PRECISION)
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, seed, bh, m0, n0, Lq, dropout_p, DROPOUT, PRECISION)
    if HAS_GLOBAL:
        # LongT5's transient-global tokens: the same softmax goes on over every global token.
        cap, pos_lo, pos_hi, shift, GK_bh, GV_bh, GDT_h = _global_keys(
            CAP, GK, GV, GDT, b, b64, h, offs_m, m0, Lq, CG, stride_gkb, stride_gkh, stride_gvb, stride_gvh, GBS,
            BLOCK_M, BLOCK_N)
        for g0 in range(0, tl.minimum(G, cap + 1), BLOCK_N):
            offs_g, gk, gv, s = _global_tile(q, GK_bh, GV_bh, GDT_h, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2,
                                             stride_gkn, stride_gvn, offs_d, d_ok, HAS_GBIAS, BLOCK_M, BLOCK_N,
                                             PRECISION)
            m_i, l_i, acc = _softmax_step(s, gv, m_i, l_i, acc, seed, bh, m0, _dropout_base(Lk) + g0, Lq, dropout_p,
                                          DROPOUT, PRECISION)
    has_key = l_i > 0.0
    norm = tl.where(has_key, l_i, 1.0)
    if DROPOUT:
        norm = norm * (1.0 - dropout_p)  # the kept entries' 1 / (1 - p) (`_softmax_step`)
    out = acc / norm[:, None]
    row_ok = offs_m < Lq
    tl.store(Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=_PLAIN)
def _bucketed_attention_bwd_preprocess_kernel(
    Out, DO,
    DELTA,  # (B, H, Lq) fp32: rowsum(dO * O)
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
    H, Lq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _, _, b64, h, _, _, offs_m, offs_d, d_ok = _program(0, 0, 0, H, D, BLOCK_M, BLOCK_D)
    mask = (offs_m < Lq)[:, None] & d_ok[None, :]
    o = _load_rows(Out, b64, h, offs_m, stride_ob, stride_oh, stride_om, offs_d, mask)
    do = _load_rows(DO, b64, h, offs_m, stride_dob, stride_doh, stride_dom, offs_d, mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b64 * H + h) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit(do_not_specialize=_PLAIN)
def _bucketed_attention_bwd_dkdv_kernel(
    Q,
    K, V,  # the ordinary keys and values, or the global tokens (GLOBAL_KEYS)
    DT,  # the distance table of those keys
    KPM,
    CAP,  # (B,) int32, with GLOBAL_KEYS: last global token of each row
    QSEG, KSEG,  # (B, Lq) and (B, Lk) int32 segment ids (with HAS_SEG; padding: -1 and -2)
    SPAN,  # (B, 2, key tiles) int32: the queries [lo, hi) each key tile's segments meet
    DO, LSE, DELTA,
    DK, DV,  # in one layout
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
    stride_kpmb, stride_qsegb, stride_ksegb,
    H, Lq,
    Lk,  # keys of this launch (G with GLOBAL_KEYS)
    D, q_offset, C,
    window,  # keys at distance |j - (q_offset + i)| <= window only (with WINDOWED)
    key_base,  # with GLOBAL_KEYS the ordinary keys' Lk (globals' dropout ids from `_dropout_base(Lk)`), else 0
    scale, scale_log2, dropout_p,
    SEED,  # (1,) int32: the call's dropout seed, read on the device (with DROPOUT; `_backend.draw_seed`)
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SEG: tl.constexpr, GLOBAL_KEYS: tl.constexpr, DROPOUT: tl.constexpr,
    GBS: tl.constexpr,  # global block size: query i sits at global position min(i // GBS, cap)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_DC: tl.constexpr,  # the head-dim columns of dK and dV a program writes (`_head_chunk`)
    APART: tl.constexpr,  # dK and dV's products in a layout of their own (`_accumulate`)
):
    """dK and dV of one key tile, or of a chunk of its head dim (`_head_chunk`). A tile with fewer query
    rows than keys computes its scores and dP key-major (`_dot_t`)."""
    KEY_MAJOR: tl.constexpr = BLOCK_M < BLOCK_N
    pid_n, b, b64, h, bh, n0, offs_n, offs_d, d_ok = _program(0, 0, 0, H, D, BLOCK_N, BLOCK_D, BLOCK_D // BLOCK_DC)
    seed = _load_seed(SEED, DROPOUT)
    offs_dc, dc_ok = _head_chunk(D, BLOCK_D, BLOCK_DC)
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = _load_rows(K, b64, h, offs_n, stride_kb, stride_kh, stride_kn, offs_d, kv_mask)
    v = _load_rows(V, b64, h, offs_n, stride_vb, stride_vh, stride_vn, offs_d, kv_mask)
    Q_bh = Q + b64 * stride_qb + h * stride_qh
    DO_bh = DO + b64 * stride_dob + h * stride_doh
    DT_h = DT + h * (2 * C + 1 + 2 * (BLOCK_M + BLOCK_N))
    KPM_b = KPM + b64 * stride_kpmb
    LSE_bh = LSE + bh.to(tl.int64) * Lq
    DELTA_bh = DELTA + bh.to(tl.int64) * Lq

    dk = tl.zeros((BLOCK_N, BLOCK_DC), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DC), tl.float32)
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
            s = _global_tile_scores(q, k, DT_h, offs_n, n0, Lk, cap, pos_lo, pos_hi, shift, C, scale_log2, HAS_BIAS,
                                    BLOCK_M, BLOCK_N, PRECISION, KEY_MAJOR)
        else:
            qseg = offs_m
            if HAS_SEG:
                qseg = _segment_ids(QSEG_b, offs_m, Lq, -1, m0, m_end)
            s = _tile_scores(q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2, qseg,
                             kseg, HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N, PRECISION,
                             KEY_MAJOR)
        z, ds = _grad_scores(s, lse, delta, do, v, seed, bh, m0, _dropout_base(key_base) + n0, Lq, dropout_p,
                             DROPOUT, PRECISION, KEY_MAJOR, APART)
        if BLOCK_DC < BLOCK_D:  # this program's columns of Q and dO (the scores took them whole)
            chunk_mask = row_ok[:, None] & dc_ok[None, :]
            q = tl.load(Q_bh + offs_m[:, None] * stride_qm + offs_dc[None, :], mask=chunk_mask, other=0.0)
            do = tl.load(DO_bh + offs_m[:, None] * stride_dom + offs_dc[None, :], mask=chunk_mask, other=0.0)
        dv = _accumulate(dv, tl.trans(z.to(do.dtype)), do, n0 < Lk, APART, PRECISION)
        dk = _accumulate(dk, tl.trans(ds.to(q.dtype)), q, n0 < Lk, APART, PRECISION)
    dk = dk * scale
    if DROPOUT:
        dv = dv * (1.0 / (1.0 - dropout_p))  # the kept entries' 1 / (1 - p) (`_grad_scores`)
    dkv_bh = b64 * stride_dkb + h * stride_dkh
    dkv_off = offs_n[:, None] * stride_dkn + offs_dc[None, :]
    dkv_mask = (offs_n < Lk)[:, None] & dc_ok[None, :]
    tl.store(DK + dkv_bh + dkv_off, dk.to(DK.dtype.element_ty), mask=dkv_mask)
    tl.store(DV + dkv_bh + dkv_off, dv.to(DV.dtype.element_ty), mask=dkv_mask)


@triton.jit(do_not_specialize=_PLAIN)
def _bucketed_attention_bwd_dq_kernel(
    Q, K, V, DT, KPM, GK, GV, GDT, CAP,
    QSEG, KSEG,  # (B, Lq) and (B, Lk) int32 segment ids (with HAS_SEG; padding: -1 and -2)
    SPAN,  # (B, 2, query tiles) int32: the keys [lo, hi) each query tile's segments meet
    DO, LSE, DELTA, DQ,
    # Per-program buffers, one slot per program of the launch (`_dq_chunks` bounds the launch):
    DQP,  # (slots, BLOCK_M, BLOCK_D) fp32: dQ of the ordinary keys, handed from the first launch to the second
    DDT,  # (slots, 2C + 1) fp32 zeros: partial gradients of DT, one row per program
    DDTG,  # (slots, 2CG + 1) the same for GDT
    SCR,  # (slots, BLOCK_M * SKEW) fp32 scratch: one dS tile per program (with a bias, `_diagonal_sums`)
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gkb, stride_gkh, stride_gkn, stride_gvb, stride_gvh, stride_gvn,
    stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm,
    stride_kpmb, stride_qsegb, stride_ksegb,
    H, Lq, Lk, G, D, q_offset, C, CG,
    window,  # keys at distance |j - (q_offset + i)| <= window only (with WINDOWED)
    # This launch's first query tile, head and batch element: program (i, j, k) takes query tile
    # m_base + i of head h_base + j in batch element b_base + k.
    m_base, h_base, b_base,
    scale, scale_log2, dropout_p,
    SEED,  # (1,) int32: the call's dropout seed, read on the device (with DROPOUT; `_backend.draw_seed`)
    HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
    HAS_SEG: tl.constexpr,
    ORDINARY: tl.constexpr,  # this launch covers the ordinary keys
    HAS_GLOBAL: tl.constexpr,  # this launch covers the global tokens
    HAS_GBIAS: tl.constexpr,
    PARTIAL_IN: tl.constexpr,  # start from DQP (the second launch of a LongT5 backward)
    PARTIAL_OUT: tl.constexpr,  # write DQP in fp32, not DQ (the first one)
    DROPOUT: tl.constexpr,
    GBS: tl.constexpr,  # global block size: query i sits at global position min(i // GBS, cap)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SKEW: tl.constexpr,  # next power of two >= BLOCK_M + BLOCK_N - 1: the diagonals of one tile
    PRECISION: tl.constexpr,
    BLOCK_DC: tl.constexpr,  # the head-dim columns of dQ a program writes (`_head_chunk`)
):
    """dQ and the bias-table gradients of one query tile. With LongT5's global tokens it runs twice,
    the ordinary keys then the global tokens, each launch one key loop: both loops in one program
    held a 64 x 64 tile's registers past the limit (the static report). With chunks of the head dim
    (`_head_chunk`), each chunk's program writes its columns of dQ and the first chunk's the tables'
    gradients; the chunks of a tile share its slot."""
    CHUNKS: tl.constexpr = BLOCK_D // BLOCK_DC  # programs per query tile
    pid_m, b, b64, h, bh, m0, offs_m, offs_d, d_ok = _program(m_base, h_base, b_base, H, D, BLOCK_M, BLOCK_D, CHUNKS)
    seed = _load_seed(SEED, DROPOUT)
    offs_dc, dc_ok = _head_chunk(D, BLOCK_D, BLOCK_DC)
    # The first chunk's program alone touches the slot's scratch and partial rows (`diagonals`): a GPU runs
    # a tile's chunks at once, and another chunk zeroing the scratch while the first sums its diagonals
    # would corrupt the table's gradient (the interpreter, which runs programs in turn, cannot show it).
    if CHUNKS > 1:
        diagonals = tl.program_id(0) % CHUNKS == 0
    else:
        diagonals = True
    row_ok = offs_m < Lq
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load_rows(Q, b64, h, offs_m, stride_qb, stride_qh, stride_qm, offs_d, q_mask)
    do = _load_rows(DO, b64, h, offs_m, stride_dob, stride_doh, stride_dom, offs_d, q_mask)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    K_bh = K + b64 * stride_kb + h * stride_kh
    V_bh = V + b64 * stride_vb + h * stride_vh
    DT_h = DT + h * (2 * C + 1 + 2 * (BLOCK_M + BLOCK_N))
    KPM_b = KPM + b64 * stride_kpmb

    # This program's slot in the launch's buffers: the launches of one backward share them in turn. Head
    # major (head, batch element, query tile), so that one reduction over the middle sums a head's rows.
    slot = (tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)) * (tl.num_programs(0) // CHUNKS) + pid_m - m_base
    DQP_tile = DQP + slot * (BLOCK_M * BLOCK_D) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_D + offs_dc[None, :]
    if PARTIAL_IN:
        dq = tl.load(DQP_tile, mask=row_ok[:, None], other=0.0)
    else:
        dq = tl.zeros((BLOCK_M, BLOCK_DC), tl.float32)
    SCR_p = SCR + slot * (BLOCK_M * SKEW)
    if ORDINARY:
        # Bias-table gradient of this query tile: interior distances |d| < C in this program's row of
        # DDT, the clamped ends (d <= -C, d >= C) in registers until the end.
        DDT_row = DDT + slot * (2 * C + 1)
        far_neg, far_pos, band_neg, band_pos = _bias_grad_zeros(BLOCK_M, SKEW)
        if HAS_BIAS:
            if diagonals:
                _zero_scratch(SCR_p, BLOCK_M, SKEW)
        KSEG_b = KSEG + b64 * stride_ksegb
        qseg, n_start, n_end = _query_tile_keys(QSEG + b64 * stride_qsegb, SPAN, b64, offs_m, m0, Lq, Lk, q_offset,
                                                window, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k, v = _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok)
            s = _key_tile(q, k, DT_h, KPM_b, KSEG_b, qseg, offs_m, m0, n0, n_end, Lk, q_offset, C, window, scale_log2,
                          HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N, PRECISION)
            _, ds = _grad_scores(s, lse, delta, do, v, seed, bh, m0, n0, Lq, dropout_p, DROPOUT, PRECISION)
            if BLOCK_DC < BLOCK_D:  # this program's columns of K (the scores took them whole)
                k = tl.load(K_bh + offs_n[:, None] * stride_kn + offs_dc[None, :],
                            mask=(offs_n < Lk)[:, None] & dc_ok[None, :], other=0.0)
            dq += _dot(ds.to(k.dtype), k, PRECISION)
            if HAS_BIAS:
                if diagonals:
                    d_min = n0 - (q_offset + m0 + BLOCK_M - 1)
                    d_max = n0 + BLOCK_N - 1 - (q_offset + m0)
                    far_neg, far_pos, band_neg, band_pos = _bias_grad_tile(
                        ds, SCR_p, DDT_row, d_min, d_max, C, far_neg, far_pos, band_neg, band_pos, m0, 0, 0, 1, False,
                        BLOCK_M, BLOCK_N, SKEW)
        if HAS_BIAS:
            if diagonals:
                _store_bias_grad_ends(DDT_row, C, far_neg, far_pos, band_neg, band_pos)
    if HAS_GLOBAL:
        cap, pos_lo, pos_hi, shift, GK_bh, GV_bh, GDT_h = _global_keys(
            CAP, GK, GV, GDT, b, b64, h, offs_m, m0, Lq, CG, stride_gkb, stride_gkh, stride_gvb, stride_gvh, GBS,
            BLOCK_M, BLOCK_N)
        GDDT_row = DDTG + slot * (2 * CG + 1)
        gfar_neg, gfar_pos, gband_neg, gband_pos = _bias_grad_zeros(BLOCK_M, SKEW)
        for g0 in range(0, tl.minimum(G, cap + 1), BLOCK_N):
            offs_g, gk, gv, s = _global_tile(q, GK_bh, GV_bh, GDT_h, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2,
                                             stride_gkn, stride_gvn, offs_d, d_ok, HAS_GBIAS, BLOCK_M, BLOCK_N,
                                             PRECISION)
            _, ds = _grad_scores(s, lse, delta, do, gv, seed, bh, m0, _dropout_base(Lk) + g0, Lq, dropout_p,
                                 DROPOUT, PRECISION)
            if BLOCK_DC < BLOCK_D:
                gk = tl.load(GK_bh + offs_g[:, None] * stride_gkn + offs_dc[None, :],
                             mask=(offs_g < G)[:, None] & dc_ok[None, :], other=0.0)
            dq += _dot(ds.to(gk.dtype), gk, PRECISION)
            if HAS_GBIAS:
                if diagonals:
                    gfar_neg, gfar_pos, gband_neg, gband_pos = _bias_grad_tile(
                        ds, SCR_p, GDDT_row, g0 - pos_hi, g0 + BLOCK_N - 1 - pos_lo, CG, gfar_neg, gfar_pos, gband_neg,
                        gband_pos, m0, pos_hi, cap, GBS, True, BLOCK_M, BLOCK_N, SKEW)
        if HAS_GBIAS:
            if diagonals:
                _store_bias_grad_ends(GDDT_row, CG, gfar_neg, gfar_pos, gband_neg, gband_pos)
    if PARTIAL_OUT:
        tl.store(DQP_tile, dq, mask=row_ok[:, None])
    else:
        tl.store(DQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_dc[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & dc_ok[None, :])


# fmt: on
