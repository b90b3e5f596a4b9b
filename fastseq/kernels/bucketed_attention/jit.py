"""The `@triton.jit` helpers the attention kernels share (`kernels`): the tile of a (B, H, L, D) tensor,
the key loop's head and tiles, the scores with T5's bias and every mask, the online-softmax step,
dropout's keep mask, the backward's P, Z and dP, the bias gradient's diagonal sums. Triton inlines them
(the same TTIR as written out; only line-info labels differ, which ptxas reads: the static report)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._backend import interpreting


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
def _dot_t(a, b, KEY_MAJOR: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b^T: a tile of scores (q k^T) or of dP (dO v^T). KEY_MAJOR computes it as (b @ a^T)^T, so
    that the keys are the product's M: a dK/dV tile with 32 query rows and 64 keys (D = 256 on sm_90,
    `tiles.py`) then runs every product on wgmma, which takes M = 64."""
    if KEY_MAJOR:
        out = tl.trans(_dot(b, tl.trans(a), PRECISION))
    else:
        out = _dot(a, tl.trans(b), PRECISION)
    return out


if interpreting():

    @triton.jit
    def _gather(ptr):
        return tl.load(ptr)  # the interpreter has no inline assembly

else:

    @triton.jit
    def _gather(ptr):
        """`tl.load(ptr)` of fp32 read-only data (through the non-coherent cache), as inline assembly:
        it takes the layout of its use, where a load takes the coalescing pass's, and a bias tile
        loaded so went to the MMA accumulator's layout through shared memory in every key tile (the
        forward's loop had 6 barriers against the plain loop's 3 at sm_90, D = 64; the static report)."""
        return tl.inline_asm_elementwise(
            "ld.global.nc.f32 $0, [$1];",
            "=r,l",
            [ptr],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )


if interpreting():

    @triton.jit
    def _opaque(x, FENCE: tl.constexpr = True):
        return x

else:

    @triton.jit
    def _opaque(x, FENCE: tl.constexpr = True):
        """x through a `mov.b32` that neither LLVM nor Triton's passes see through: with FENCE one with side
        effects, else a pure one. A dropout-masked tile goes through it. Pure, it keeps `where(keep, p, 0)`
        in fp32: LLVM moved it past the bf16 conversion that follows, onto the packed 16-bit halves, a PRMT
        and a SEL per half against one FSEL. With FENCE Triton's choice of a product's operand layout no
        longer crosses it either: it picks kWidth from the ops behind the operand (a pure asm included),
        and the mask's joins (`_dropout_keep`) made it 4 for bf16 where ldmatrix gives pairs, so that on
        mma.sync the registers were reordered before every product. On sm_80 the t5 build's dK/dV key
        loop ran 135 such moves at D = 64 (590 instructions, 462 without them), 982 instructions at
        D = 128 (634 without), and the forward's at D = 64 747 under Triton 3.6 (647): the static report."""
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=not FENCE, pack=1)


@triton.jit
def _add_bias(s, DT2_h, base, row_shift, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """s plus the log2-domain bias of a tile whose element (m, n) lies at distance
    `base + n + row_shift[m]`, `row_shift` in [0, BLOCK_M - 1], from the per-distance table `DT2_h`.

    The table (scaled by log2(e)) holds distances -C - PAD .. C + PAD, PAD = BLOCK_M + BLOCK_N, the
    entries beyond +-C repeating the end values. Every tile reads a window of PAD - 1 entries: its
    start is clamped into the table, so a tile wholly beyond a cut-off reads that end's copies, and no
    index needs a clamp or a branch of its own. The table is a few KiB per head: every load after the
    first hits L1. The gather takes the scores' layout (`_gather`): no tile goes through shared memory.

    Its addresses are a row's pointer plus the key's column: each thread then holds one 64-bit
    pointer per tile and its loads carry the column as an immediate offset (one `LDG` per element at
    sm_90, D = 64, and 128 registers). One index per element (`table + (start + n + shift[m])`) cost
    two `LEA` and an add per element, and 180 registers; a branch between a scalar bias for the tiles
    beyond the cut-off and the gather for the others cost 64 moves more (the static report). No
    shuffle: spreading the tile's distinct distances over it with `tl.gather` instead cost 1,988 SHFL
    and 6,448 spill bytes at 128 x 64 on sm_90."""
    PAD: tl.constexpr = BLOCK_M + BLOCK_N
    start = tl.minimum(tl.maximum(base + C + PAD, 0), 2 * C + PAD)
    rows = (DT2_h + start) + row_shift
    return s + _gather(rows[:, None] + tl.arange(0, BLOCK_N)[None, :])


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
    KEY_MAJOR: tl.constexpr = False,
):
    """Scores of one (BLOCK_M, BLOCK_N) tile of ordinary keys in the log2 domain, masked entries at -inf.
    With HAS_SEG, `qseg` (BLOCK_M,) and `kseg` (BLOCK_N,) are the rows' and keys' segment ids. KEY_MAJOR:
    `_dot_t`."""
    s = _dot_t(q, k, KEY_MAJOR, PRECISION) * scale_log2
    if HAS_BIAS:
        # Element (m, n) lies at distance n0 + n - (q_offset + m0 + m) = base + n + (BLOCK_M - 1 - m).
        base = n0 - (q_offset + m0 + BLOCK_M - 1)
        s = _add_bias(s, DT_h, base, (BLOCK_M - 1) - tl.arange(0, BLOCK_M), C, BLOCK_M, BLOCK_N)
    if HAS_KPM:
        # The keys' additive mask (`key_bias`): -inf for padding and past Lk, so no key needs a compare.
        s = s + tl.load(KPM_b + offs_n)[None, :]
        valid = tl.full(s.shape, True, tl.int1)
    elif HAS_SEG:
        # Padding, keys past Lk included, has ids that no query has (`_segments`, `_segment_ids`).
        valid = qseg[:, None] == kseg[None, :]
    else:
        valid = offs_n[None, :] < Lk
    if CAUSAL and not HAS_BIAS:
        # With a bias, its table holds -inf at every positive distance (`_kernel_table`).
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
    KEY_MAJOR: tl.constexpr = False,
):
    """Scores of one tile of global tokens: bias `GDT[h, g - position(i)]`, globals past `cap` masked.
    KEY_MAJOR: `_dot_t`."""
    s = _dot_t(q, gk, KEY_MAJOR, PRECISION) * scale_log2
    if HAS_GBIAS:
        # Element (m, n) lies at distance g0 + n - position(m) = (g0 - pos_hi) + n + shift[m].
        base = g0 - pos_hi
        s = _add_bias(s, GDT_h, base, shift, CG, BLOCK_M, BLOCK_N)
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
def _load_seed(SEED, DROPOUT: tl.constexpr):
    """The call's dropout seed, read once per program from its `(1,)` int32 tensor (0 without dropout,
    which reads nothing): drawn on the device, so that a captured CUDA graph draws a new one at every
    replay (`_backend.draw_seed`)."""
    if DROPOUT:
        return tl.load(SEED)
    else:
        return 0


@triton.jit
def _philox7(seed, c0, c1):
    """Philox4x32 with seven rounds, of the counter (c0, c1, 0, 0) under the key (the seed's low and high
    words): `tl.philox(seed, c0, c1, 0, 0, 7)` word for word, but each round's two products are 32 x 32
    -> 64-bit multiplies (one IMAD.WIDE.U32 each, where `umulhi` and the low product were two IMADs)."""
    seed = tl.core.to_tensor(seed).to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(7):
        a = c0.to(tl.uint64) * 0xD2511F53
        b = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = (
            (b >> 32).to(tl.uint32) ^ c1 ^ k0,
            b.to(tl.uint32),
            (a >> 32).to(tl.uint32) ^ c3 ^ k1,
            a.to(tl.uint32),
        )
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)  # the key schedule wraps (debug mode checks adds)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(seed, bh, m0, k0, Lq, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask `(BLOCK_M, BLOCK_N)` of rows m0 + i (m0 a multiple of 16) and keys k0 + n (k0 a
    multiple of min(BLOCK_N, 32)). One Philox4x32 call (seven rounds, the fewest of the family that
    pass BigCrush) per 16 elements, as flash-attention draws, keyed by the call's seed.

    Row i = 16 mb + 8 r + l and key j = 32 nb + 16 x + 8 d + 2 q + c of head row bh = b * H + h share
    a call when they share (bh, mb, l, nb, q); its counter words are (32 nb + 2 q, bh * Lq16 + 16 mb
    + l), Lq16 = Lq rounded up to 16. The element takes byte c + 2 d of word x + 2 r and is kept when
    that byte is below 256 (1 - p), `dropout_p` a multiple of 1/256 (`quantized_dropout`). No tile
    enters the map, so every kernel regenerates the same bits; and a call's 16 elements are the ones
    one thread holds in the MMA accumulator (rows l and l + 8 of a 16-row block, columns 2 q + c + 8 k
    of a 32-key block), so each byte reaches its element without leaving the thread. Key groups run
    over the ordinary keys, then the global tokens from the next multiple of 32 (`_dropout_base`).
    A draw per element held the `t5` forward's key loop at 4.4x the plain loop's instructions on
    sm_90 (the static report)."""
    WIDTH: tl.constexpr = 32 if BLOCK_N < 32 else BLOCK_N  # whole 32-key blocks are drawn
    MB: tl.constexpr = BLOCK_M // 16
    NB: tl.constexpr = WIDTH // 32
    mb = tl.arange(0, MB)[:, None, None, None]
    lane_row = tl.arange(0, 8)[None, :, None, None]
    nb = tl.arange(0, NB)[None, None, :, None]
    q = tl.arange(0, 4)[None, None, None, :]
    shape: tl.constexpr = (MB, 8, NB, 4)
    c0 = tl.broadcast_to(k0 - k0 % 32 + 32 * nb + 2 * q, shape).to(tl.uint32, bitcast=True)
    c1 = tl.broadcast_to(bh * (tl.cdiv(Lq, 16) * 16) + m0 + 16 * mb + lane_row, shape).to(tl.uint32, bitcast=True)
    w0, w1, w2, w3 = _philox7(seed, c0, c1)
    words = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # (..., x, r): word x + 2 r
    # Byte j of a word is below t exactly when the word shifted left by 24 - 8 j is below t * 2^24: no byte
    # is extracted (that took a PRMT and more an element, the static report).
    octets = tl.join(tl.join(words << 24, words << 16), tl.join(words << 8, words))  # bytes 0, 1, 2, 3 on top
    threshold = tl.cast(256.0 - dropout_p * 256.0, tl.uint32) << 24  # p * 256 is whole, and p > 0
    keep = octets < threshold  # (mb, l, nb, q, x, r, c, d)
    keep = tl.reshape(tl.permute(keep, (0, 5, 1, 2, 4, 7, 3, 6)), (BLOCK_M, WIDTH))  # (mb, r, l), (nb, x, d, q, c)
    if BLOCK_N < 32:
        lo, hi = tl.split(tl.permute(tl.reshape(keep, (BLOCK_M, 2, 16)), (0, 2, 1)))
        keep = tl.where(k0 % 32 == 0, lo, hi)
    return keep


@triton.jit
def _dropout_base(Lk):
    """The dropout index of the first global token after Lk ordinary keys: the next multiple of 32, so
    that no 32-key block (`_dropout_keep`) holds both."""
    return tl.cdiv(Lk, 32) * 32


@triton.jit
def _load_kv(K_bh, V_bh, offs_n, Lk, stride_kn, stride_vn, offs_d, d_ok):
    """One tile of keys and values (rows past Lk and columns past D read as zeros)."""
    kv_mask = (offs_n < Lk)[:, None] & d_ok[None, :]
    k = tl.load(K_bh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V_bh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, seed, bh, m0, k0, Lq, dropout_p, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over a tile of scores (log2 domain) and its values: rows from m0, keys
    from dropout index k0 (`_dropout_keep`). Dropped entries are zeroed; the kept ones' 1 / (1 - p)
    is left to the end of the row (linear in the accumulator: one multiply a row, not one an element)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key so far masked keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, m0, k0, Lq, dropout_p, s.shape[0], s.shape[1])
        p = _opaque(tl.where(keep, p, 0.0))
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, l_i, acc


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
    tokens). The tile goes through this program's own scratch in global memory (it stays in L2), a
    (BLOCK_M, SKEW) array, so that each thread sums the distances it owns. No shuffle, no atomics, no
    register-resident skew (a `tl.gather` skew of the tile cost 548 SHFL and 1,256 spill bytes in the
    dQ kernel on sm_90, the static report).

    Ordinary keys: each row's shift is the same in every tile, so the tile is written skewed (row m
    from column shift(m)) into a scratch whose other cells stay zero (`_zero_scratch`), and a
    distance's sum reads one column, unmasked (a masked skewed read of a tile written as the MMA left
    it cost the dQ key loop three instructions more a row at sm_90, D = 64, the static report).
    Global tokens: the shifts move from tile to tile, so the tile is written as it is and read skewed."""
    _block_barrier()  # every thread is done reading the previous tile
    t = tl.arange(0, SKEW)
    diag = tl.zeros((SKEW,), tl.float32)
    if GLOBAL_ROWS:
        tl.store(SCR_p + tl.arange(0, BLOCK_M)[:, None] * SKEW + tl.arange(0, BLOCK_N)[None, :], ds)
        _block_barrier()  # the tile is written before any thread reads it skewed
        for m in range(BLOCK_M):
            shift = tl.minimum(tl.maximum(pos_hi - tl.minimum((m0 + m) // gbs, cap), 0), BLOCK_M - 1)
            col = t - shift
            diag += tl.load(SCR_p + m * SKEW + col, mask=(col >= 0) & (col < BLOCK_N), other=0.0)
    else:
        rows = SCR_p + tl.arange(0, BLOCK_M) * (SKEW - 1) + (BLOCK_M - 1)  # row m, column BLOCK_M - 1 - m
        tl.store(rows[:, None] + tl.arange(0, BLOCK_N)[None, :], ds)
        _block_barrier()  # the tile is written before any thread reads a column
        for m in range(BLOCK_M):
            diag += tl.load(SCR_p + m * SKEW + t)
    return diag


@triton.jit
def _zero_scratch(SCR_p, BLOCK_M: tl.constexpr, SKEW: tl.constexpr):
    """Zero a program's (BLOCK_M, SKEW) scratch once, before its first tile: the cells off each row's
    band are never written after (`_diagonal_sums`)."""
    tl.store(SCR_p + tl.arange(0, BLOCK_M)[:, None] * SKEW + tl.arange(0, SKEW)[None, :],
             tl.zeros((BLOCK_M, SKEW), tl.float32))  # fmt: skip


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
def _load_rows(P, b64, h, offs, stride_b, stride_h, stride_l, offs_d, mask):
    """Rows `offs` of head h of batch element b64 of a `(B, H, L, D)` tensor (last dim contiguous), as
    a `(rows, BLOCK_D)` tile, masked entries zero."""
    return tl.load(P + b64 * stride_b + h * stride_h + offs[:, None] * stride_l + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _program(pid_base, h_base, b_base, H, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr = 1):
    """What a program of a (tiles, H, B) grid owns: its tile pid of batch element b (and b64, for batch offsets
    in 64 bits: (B - 1) * stride_qb passes 2**31 at t5-11b sizes), head h, row b * H + h of the
    (B, H, L) buffers, its tile's first row and rows, and the head dim's columns. With CHUNKS > 1 the grid
    has CHUNKS programs per tile, one per chunk of the head dim (`_head_chunk`)."""
    pid = pid_base + tl.program_id(0) // CHUNKS
    h = h_base + tl.program_id(1)
    b = b_base + tl.program_id(2)
    bh = b * H + h
    b64 = b.to(tl.int64)
    start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return pid, b, b64, h, bh, start, offs, offs_d, offs_d < D


@triton.jit
def _head_chunk(D, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr):
    """The columns of the head dim whose gradients this backward program writes, chunk
    `program_id(0) % (BLOCK_D // BLOCK_DC)` (`_program`'s CHUNKS), and which of them lie below D. Each
    chunk's program computes the tile's scores and dP over the whole head dim again: at D = 256 on sm_90
    a whole row of fp32 gradients held the registers past the limit on every wgmma tile (`tiles.py`)."""
    offs_dc = (tl.program_id(0) % (BLOCK_D // BLOCK_DC)) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    return offs_dc, offs_dc < D


@triton.jit
def _query_tile_keys(QSEG_b, SPAN, b64, offs_m, m0, Lq, Lk, q_offset, window, CAUSAL: tl.constexpr,
                     WINDOWED: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):  # fmt: skip
    """The head of a query tile's loop over the ordinary keys (forward and dQ): the rows' segment ids
    (their offsets without HAS_SEG) and the keys [n_start, n_end) it visits (`_key_tiles`)."""
    num_m = tl.cdiv(Lq, BLOCK_M)
    qseg = offs_m
    if HAS_SEG:
        qseg = _segment_ids(QSEG_b, offs_m, Lq, -1)
    n_start, n_end = _key_tiles(m0, Lk, q_offset, window, SPAN + b64 * 2 * num_m, num_m, CAUSAL, WINDOWED, HAS_SEG,
                                BLOCK_M, BLOCK_N)  # fmt: skip
    return qseg, n_start, n_end


@triton.jit
def _key_tile(q, k, DT_h, KPM_b, KSEG_b, qseg, offs_m, m0, n0, n_end, Lk, q_offset, C, window, scale_log2,
              HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
              HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):  # fmt: skip
    """The scores of the key tile at n0 in a query tile's loop over the ordinary keys (`_tile_scores`),
    with the keys' segment ids loaded for it."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kseg = offs_n
    if HAS_SEG:
        kseg = _segment_ids(KSEG_b, offs_n, Lk, -2, n0, n_end)
    return _tile_scores(
        q, k, DT_h, KPM_b, offs_m, offs_n, m0, n0, Lk, q_offset, C, window, scale_log2, qseg, kseg,
        HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, BLOCK_M, BLOCK_N, PRECISION,
    )  # fmt: skip


@triton.jit
def _global_keys(CAP, GK, GV, GDT, b, b64, h, offs_m, m0, Lq, CG, stride_gkb, stride_gkh, stride_gvb, stride_gvh,
                 GBS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The head of a query tile's loop over LongT5's global tokens: the row's last global token, the
    rows' positions (`_global_rows`), the head's global keys and values and its padded distance table."""
    cap = tl.load(CAP + b)
    pos_lo, pos_hi, shift = _global_rows(offs_m, m0, Lq, cap, GBS, BLOCK_M)
    GK_bh = GK + b64 * stride_gkb + h * stride_gkh
    GV_bh = GV + b64 * stride_gvb + h * stride_gvh
    GDT_h = GDT + h * (2 * CG + 1 + 2 * (BLOCK_M + BLOCK_N))
    return cap, pos_lo, pos_hi, shift, GK_bh, GV_bh, GDT_h


@triton.jit
def _global_tile(q, GK_bh, GV_bh, GDT_h, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2, stride_gkn, stride_gvn,
                 offs_d, d_ok, HAS_GBIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """One step of the loop over the global tokens: the tile at g0, its keys and values and scores."""
    offs_g = g0 + tl.arange(0, BLOCK_N)
    gk, gv = _load_kv(GK_bh, GV_bh, offs_g, G, stride_gkn, stride_gvn, offs_d, d_ok)
    s = _global_tile_scores(
        q, gk, GDT_h, offs_g, g0, G, cap, pos_lo, pos_hi, shift, CG, scale_log2, HAS_GBIAS, BLOCK_M, BLOCK_N, PRECISION
    )
    return offs_g, gk, gv, s


@triton.jit
def _accumulate(acc, a, b, live, APART: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. With APART the product runs under `if live`, a condition true wherever it runs (a tile
    index below its bound), so that it sits in a region of its own. On mma.sync (sm_80, sm_86) Triton
    gives the products that share an operand or a result (a chain) the warp layout of the first one it
    converts, the loop's last, here this one: a dK/dV product of 32 keys by 64 or 128 head-dim columns
    spread the warps over its columns, and with them the scores' over the keys, so that no thread held
    the 16 elements of its Philox call (`_dropout_keep`) and the mask went through shared memory, 12
    barriers more in the key loop (the static report). Apart, the scores keep a warp per 16 query rows
    and the product takes its own layout; its operand comes through shared memory, as it did."""
    if APART:
        if live:
            acc += _dot(a, b, PRECISION)
    else:
        acc += _dot(a, b, PRECISION)
    return acc


@triton.jit
def _grad_scores(s, lse, delta, do, v, seed, bh, m0, k0, Lq, dropout_p, DROPOUT: tl.constexpr,
                 PRECISION: tl.constexpr, KEY_MAJOR: tl.constexpr = False, OPAQUE: tl.constexpr = True):  # fmt: skip
    """The backward of one tile of scores: Z, P (rows without keys have lse = +inf: P = 0) as the
    forward applied it to V, dropped entries zeroed but the kept ones without their 1 / (1 - p) (dV
    takes it once, at its end, `_softmax_step`), and dS = P * (dP - delta), dP = dO V^T through the
    same dropout (KEY_MAJOR: `_dot_t`). With dropout Z goes through `_opaque`, fenced under OPAQUE,
    and under OPAQUE dS does too: the products that take them keep mma.sync's operand layout. dK/dV
    asks for OPAQUE where its products run apart (APART: below Hopper, 16 rows a warp); on sm_90 the
    fences cost its t5 key loop at D = 64 43 instructions (680 to 723, before `_philox7`)."""
    p = tl.math.exp2(s - lse[:, None])
    dp = _dot_t(do, v, KEY_MAJOR, PRECISION)
    z = p
    if DROPOUT:
        keep = _dropout_keep(seed, bh, m0, k0, Lq, dropout_p, s.shape[0], s.shape[1])  # k0: the first key's id
        z = _opaque(tl.where(keep, p, 0.0), OPAQUE)
        dp = tl.where(keep, dp, 0.0) * (1.0 / (1.0 - dropout_p))  # one FFMA with the delta below
    ds = p * (dp - delta[:, None])
    if DROPOUT and OPAQUE:
        ds = _opaque(ds)
    return z, ds


@triton.jit
def _bias_grad_zeros(BLOCK_M: tl.constexpr, SKEW: tl.constexpr):
    """The clamped ends of a table's gradient as `_bias_grad_tile` keeps them: per row for tiles
    beyond the cut-off (negative, positive side), per diagonal for band tiles."""
    far = tl.zeros((BLOCK_M,), tl.float32)
    band = tl.zeros((SKEW,), tl.float32)
    return far, far, band, band
