"""The launchers: the host side of the kernels. T5's bucket table becomes the per-distance table the
kernels read, masks and packed rows become their arguments, and the forward and backward launch on
the tiles of `tiles`, the backward's dQ in chunks of bounded scratch."""

from __future__ import annotations

import collections
import functools
import math
from typing import NamedTuple

import torch

from .._backend import autocast_off, capturing, cdiv, interpreting, last_dim_contiguous, placeholder, seed_arg
from .._launch import launch_kernel
from . import tiles
from .kernels import (
    _bucketed_attention_bwd_dkdv_kernel,
    _bucketed_attention_bwd_dq_kernel,
    _bucketed_attention_bwd_preprocess_kernel,
    _bucketed_attention_fwd_kernel,
)
from .reference import relative_position_bucket
from .tiles import _arch, _block_d, _fwd_config, _precision, _skew, _tiles, apart, head_chunk

_LOG2E = 1.4426950408889634


# Keys of the additive mask per row come in whole groups of this many: every key tile's BLOCK_N divides
# it, so a tile never reads past a row, and the rows' stride is a multiple of 16.
_KEY_BIAS_GROUP = 64
_KEY_BIAS_CACHE: collections.OrderedDict = collections.OrderedDict()
_KEY_BIAS_CACHED = 8


class KeyBias(NamedTuple):
    """A padding mask already converted by `key_bias` (a forward keeps it for its backward, so that both
    read the same mask whatever happens to the caller's tensor in between: `kept_mask`)."""

    bias: torch.Tensor


def kept_mask(key_padding_mask: torch.Tensor | None, Lk: int, device: torch.device) -> KeyBias | None:
    """A forward's padding mask, converted once (`key_bias`) and kept for its backward; None without."""
    return None if key_padding_mask is None else KeyBias(key_bias(key_padding_mask, Lk, device))


def key_bias(key_padding_mask: torch.Tensor | KeyBias | None, Lk: int, device: torch.device) -> torch.Tensor:
    """A `(B, Lk)` padding mask (nonzero = attend, any dtype and strides) as the attention kernels read
    it: `(B, Lk rounded up to 64)` fp32, 0 where a key is attended and -inf where it is padding or past
    Lk, added to the scores of each key tile (a mask read one byte a key and compared cost the forward's
    key loop 69 of its 477 instructions at sm_90, D = 64; this row is loaded with the keys and needs no
    compare, the static report). A masked key's score is the sum, as `transformers`' additive mask
    makes it: a padded key whose score is NaN or +inf (a key row holding inf) makes its row NaN. An
    empty `(0, 64)` for None; a `KeyBias` gives its bias.

    The layers of a model pass the same mask tensor in each forward, so the last few are converted
    once: an entry is that tensor object, kept alive, with its version, used only while that version
    stands (an in-place change converts it again). Not cached: inference tensors (no version), masks
    under torch.compile's tracing or a CUDA graph's capture (a replay must convert what it is given)."""
    if key_padding_mask is None:
        return placeholder((0, _KEY_BIAS_GROUP), torch.float32, device)
    if isinstance(key_padding_mask, KeyBias):
        return key_padding_mask.bias
    mask = key_padding_mask
    cacheable = not (torch.compiler.is_compiling() or mask.is_inference() or capturing(mask))
    if cacheable:
        ident = (id(mask), Lk, device)
        entry = _KEY_BIAS_CACHE.get(ident)
        if entry is not None and entry[0] is mask and entry[1] == mask._version:
            _KEY_BIAS_CACHE.move_to_end(ident)
            return entry[2]
    width = cdiv(max(Lk, 1), _KEY_BIAS_GROUP) * _KEY_BIAS_GROUP
    bias = torch.full((mask.shape[0], width), float("-inf"), dtype=torch.float32, device=device)
    bias[:, :Lk].masked_fill_(mask[:, :Lk] != 0, 0.0)
    if cacheable:
        _KEY_BIAS_CACHE[ident] = (mask, mask._version, bias)
        _KEY_BIAS_CACHE.move_to_end(ident)
        while len(_KEY_BIAS_CACHE) > _KEY_BIAS_CACHED:
            _KEY_BIAS_CACHE.popitem(last=False)
    return bias


def _mask_args(key_padding_mask, segs, Lk: int, device: torch.device) -> torch.Tensor:
    """The launch's padding mask (`key_bias`). Packed rows take theirs folded into the keys' segment ids
    (`_segments`): the kernels read one or the other."""
    if key_padding_mask is not None and segs is not None:
        raise ValueError("attention launch: fold the padding mask into the segment ids (_segments), not both")
    return key_bias(key_padding_mask, Lk, device)


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


class PositionBias:
    """T5's `(num_buckets, H)` bias table made ready for the kernels once per model forward and shared
    by every layer that reads it (`bucketed_attention` and `local_attention` take it in place of the
    table): the `(H, 2C + 1)` distance table `dist_table`, differentiable back to the table (the layers'
    gradients add up in it, and one matmul takes their sum back to the buckets), and, made on first use
    and kept, the padded log2-scaled copy that each tile reads (`padded`). It holds one forward's
    values: build a new one for each forward (the table changes with every optimizer step)."""

    __slots__ = ("table", "bidirectional", "max_distance", "dist_table", "cut", "_padded")

    def __init__(self, table: torch.Tensor, *, bidirectional: bool, max_distance: int):
        self.table = table  # (num_buckets, H), what the reference reads
        self.bidirectional, self.max_distance = bidirectional, max_distance
        self.dist_table = distance_table(table, bidirectional=bidirectional, max_distance=max_distance)
        self.cut = _cut(self.dist_table)
        self._padded: dict[tuple[int, bool], torch.Tensor] = {}

    def check(self, who: str, bidirectional: bool, max_distance: int) -> None:
        """Refuse, in one line, a call that asks for other buckets than the ones this was made with."""
        if (self.bidirectional, self.max_distance) != (bidirectional, max_distance):
            raise ValueError(
                f"{who}: the PositionBias was made with bidirectional={self.bidirectional}, "
                f"max_distance={self.max_distance}; this call asks for bidirectional={bidirectional}, "
                f"max_distance={max_distance}"
            )

    def padded(self, pad: int, causal: bool = False) -> torch.Tensor:
        """`_kernel_table` of the distance table for tiles with BLOCK_M + BLOCK_N = pad (no gradient: the
        launchers return the distance table's)."""
        if torch.compiler.is_compiling():
            return _kernel_table(self.dist_table.detach(), pad, causal)
        table = self._padded.get((pad, causal))
        if table is None:
            table = self._padded[(pad, causal)] = _kernel_table(self.dist_table.detach(), pad, causal)
        return table


def bucket_table(bias: torch.Tensor | PositionBias | None) -> torch.Tensor | None:
    """The `(num_buckets, H)` table of a table or a `PositionBias` (what the references read)."""
    return bias.table if isinstance(bias, PositionBias) else bias


def natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' log2-domain log-sum-exp (+inf: no key) as a natural one (-inf: no key), differentiable:
    the forwards return the log2 one, which their backwards read as it is, and a caller that wants the
    log-sum-exp converts it here (a row with no key passes no gradient back)."""
    return torch.where(torch.isinf(lse2), float("-inf"), lse2 / _LOG2E)


def quantized_dropout(dropout_p: float) -> float:
    """`dropout_p` as the kernels apply it: the nearest multiple of 1/256, at most 255/256. A key is kept
    when a random byte is below 256 (1 - p) (`_dropout_keep`) and scaled by exactly 1 / (1 - p), so the
    output stays unbiased; T5's 0.1 drops 26 of 256 (0.1016)."""
    return min(round(dropout_p * 256), 255) / 256


def _heads_stride(H: int, L: int, D: int) -> tuple[int, int, int, int]:
    """The strides of `_like_heads`' tensors: those of a contiguous `(B, L, H, D)`, as torch gives them."""
    row, head = max(H, 1) * max(D, 1), max(D, 1)
    return max(L, 1) * row, head, row, 1


def _like_heads(B: int, H: int, L: int, D: int, ref: torch.Tensor) -> torch.Tensor:
    """An empty `(B, H, L, D)` tensor laid out as `(B, L, H, D)`, so that merging the heads after
    attention (`transpose(1, 2).reshape(B, L, H * D)`) is free."""
    return torch.empty_strided((B, H, L, D), _heads_stride(H, L, D), dtype=ref.dtype, device=ref.device)


# The dQ programs' slots (`attention_backward`) take at most this many bytes per launch: a backward runs as
# many launches as it needs, so that they do not grow with B * H * L (one slot per program of a
# whole backward took 4 GiB at t5-11b, B = 32, L = 4096).
_DQ_SCRATCH_BYTES = 64 * 2**20


def _even_chunk(total: int, most: int) -> int:
    """The size of the fewest equal chunks (the last one shorter) that cover `total` with at most `most` each."""
    return cdiv(total, cdiv(total, max(1, most)))


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
        if t is None or t.untyped_storage().nbytes() < 2**31 * t.element_size():
            continue  # every element it addresses lies in a storage of fewer than 2**31 elements
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if span >= 2**31:
            raise ValueError(
                f"bucketed_attention: one batch element of a {tuple(t.shape)} tensor with strides {t.stride()} spans "
                f"{span + 1} elements; the kernels take up to 2**31 per batch element (split the heads or the sequence)"
            )


def _cut(dist_table: torch.Tensor | None) -> int:
    return 0 if dist_table is None else (dist_table.shape[1] - 1) // 2


def _kernel_table(dist_table: torch.Tensor, pad: int, causal: bool = False) -> torch.Tensor:
    """The `(H, 2C + 1)` distance table as a kernel with tiles of BLOCK_M + BLOCK_N = pad reads it
    (`_add_bias`): scaled by log2(e) (the scores are in the log2 domain) and padded with `pad` copies of
    its end values on either side. Causal, every positive distance (a key after its query) holds -inf:
    the bias masks those keys, and the kernels compare no position (`_tile_scores`)."""
    scaled = dist_table * _LOG2E  # (H, 2C + 1)
    H, row = scaled.shape
    table = torch.cat([scaled[:, :1].expand(H, pad), scaled, scaled[:, -1:].expand(H, pad)], dim=1)
    if causal:
        table[:, pad + row // 2 + 1 :] = float("-inf")  # distance 0 sits at pad + C
    return table.contiguous()


def _table_args(dist_table: torch.Tensor | PositionBias, block_m: int, block_n: int, causal: bool = False):
    """The padded table a launch with (block_m, block_n) tiles reads and the cut-off C (a launch without
    a bias passes its plan's placeholder, `_Absent`); a `PositionBias` gives the copy it keeps. `causal`:
    the table masks the keys after each query (`_kernel_table`)."""
    if isinstance(dist_table, PositionBias):
        return dist_table.padded(block_m + block_n, causal), dist_table.cut
    return _kernel_table(dist_table, block_m + block_n, causal), _cut(dist_table)


class GlobalTokens(NamedTuple):
    """LongT5's transient-global tokens as extra keys of every query row: keys and values
    `(B, H, G, D)`, their `(H, 2CG + 1)` distance table (a `PositionBias`, or None), `caps` `(B,)` int32 (each row's
    last global token, -1 for none) and the block size. Query i sits at global position
    `min(i // block_size, caps[b])`; its bias to global g is that of distance `g - position`."""

    k: torch.Tensor
    v: torch.Tensor
    dist_table: torch.Tensor | PositionBias | None
    caps: torch.Tensor
    block_size: int


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
    tiles = cdiv(n_rows, block)
    lo = torch.full((B, tiles * block), n_cols, dtype=torch.int32, device=rows.device)
    hi = torch.zeros(B, tiles * block, dtype=torch.int32, device=rows.device)
    lo[:, :n_rows] = first.gather(1, slot(rows))
    hi[:, :n_rows] = last.gather(1, slot(rows))
    return torch.stack([lo.view(B, tiles, block).amin(2), hi.view(B, tiles, block).amax(2)], 1).contiguous()


def _tile_source() -> tuple[int, ...] | None:
    """What `_tiles` reads besides its arguments (the interpreter's tile; None off the interpreter): part
    of the key of every plan below."""
    return tiles._INTERPRET_TILE if interpreting() else None


def _cut_of(dist_table: torch.Tensor | PositionBias | None) -> int:
    return dist_table.cut if isinstance(dist_table, PositionBias) else _cut(dist_table)


class _Absent(NamedTuple):
    """The placeholders a launch passes for what its flags leave unread (`placeholder`), of a plan's dtype
    and device: kept in the plan, so that a call looks none of them up."""

    table: torch.Tensor  # (1,) fp32: no bias table, no dQ buffer
    ids: torch.Tensor  # (1, 1) int32: no segment ids, no spans
    keys: torch.Tensor  # (0, 1, 1, 1): no global keys or values
    caps: torch.Tensor  # (1,) int32: no global tokens' caps


def _absent(dtype: torch.dtype, device: torch.device) -> _Absent:
    return _Absent(placeholder((1,), torch.float32, device), placeholder((1, 1), torch.int32, device),
                   placeholder((0, 1, 1, 1), dtype, device), placeholder((1,), torch.int32, device))  # fmt: skip


class _ForwardPlan(NamedTuple):
    """What a forward's launch takes from its sizes and flags alone (`_forward_plan`)."""

    block_m: int
    block_n: int
    grid: tuple[int, int, int]
    out_stride: tuple[int, int, int, int]  # `_like_heads`
    absent: _Absent
    meta: dict


@functools.lru_cache(maxsize=256)
def _forward_plan(
    B: int, H: int, Lq: int, D: int, dtype: torch.dtype, device: torch.device, source: tuple | None, G: int, gbs: int,
    flags: tuple[bool, ...],
) -> _ForwardPlan:  # fmt: skip
    """The forward's tile, grid, output strides, placeholders and meta-parameters for these sizes and
    `flags` (HAS_BIAS, HAS_KPM, CAUSAL, WINDOWED, HAS_SEG, HAS_GBIAS, DROPOUT), worked out once per shape:
    set-up that would otherwise be host time in every call. `source` is `_tile_source()`."""
    block_m, block_n, warps, stages = _fwd_config(D, dtype, Lq, device, has_global=G > 0)
    has_bias, has_kpm, causal, windowed, has_seg, has_gbias, dropout = flags
    meta = dict(
        HAS_BIAS=has_bias, HAS_KPM=has_kpm, CAUSAL=causal, WINDOWED=windowed, HAS_SEG=has_seg, HAS_GLOBAL=G > 0,
        HAS_GBIAS=has_gbias, DROPOUT=dropout, GBS=gbs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        PRECISION=_precision(dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    grid = (cdiv(Lq, block_m), H, B)
    return _ForwardPlan(block_m, block_n, grid, _heads_stride(H, Lq, D), _absent(dtype, device), meta)


def _globals_of(globals_: GlobalTokens | None) -> tuple[int, int]:
    """The global tokens' count and block size (0 and 1 without), part of a plan's key."""
    return (0, 1) if globals_ is None else (globals_.k.shape[2], globals_.block_size)


def attention_forward(q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window=-1,
                      globals_=None, segs=None):  # fmt: skip
    """Launch the forward. Returns out `(B, H, Lq, D)` (laid out `(B, Lq, H, D)`) and lse `(B, H, Lq)`
    fp32 (log2 domain). `dist_table` is the `(H, 2C + 1)` distance table or a `PositionBias` (None: no
    bias); `seed` the `(1,)` int32 dropout seed on q's device (`_backend.draw_seed`; None without
    dropout). With `globals_` every row also attends to the global tokens; with `segs` (packed rows) only
    the keys of its own segment."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dropout_p = quantized_dropout(dropout_p)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    G, gbs = _globals_of(globals_)
    has_gbias = globals_ is not None and globals_.dist_table is not None
    flags = (dist_table is not None, key_padding_mask is not None, causal, window >= 0, segs is not None, has_gbias,
             dropout_p > 0.0)  # fmt: skip
    plan = _forward_plan(B, H, Lq, D, q.dtype, q.device, _tile_source(), G, gbs, flags)
    absent = plan.absent
    gk = gv = absent.keys
    gtable, cut_g, caps = absent.table, 0, absent.caps
    if globals_ is not None:
        gk, gv, caps = last_dim_contiguous(globals_.k), last_dim_contiguous(globals_.v), globals_.caps
        if globals_.dist_table is not None:
            gtable, cut_g = _table_args(globals_.dist_table, plan.block_m, plan.block_n)
        _check_batch_span(gk, gv)
    _check_batch_span(q, k, v)
    out = torch.empty_strided((B, H, Lq, D), plan.out_stride, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    kpm = _mask_args(key_padding_mask, segs, Lk, q.device)
    qseg = kseg = spans = absent.ids
    if segs is not None:
        qseg, kseg, spans = segs.q, segs.k, _segment_spans(segs.q, segs.k, plan.block_m)
    table, cut = absent.table, 0
    if dist_table is not None:
        table, cut = _table_args(dist_table, plan.block_m, plan.block_n, causal)
    qs, ks, vs, gks, gvs, os_ = q.stride(), k.stride(), v.stride(), gk.stride(), gv.stride(), plan.out_stride
    launch_kernel(_bucketed_attention_fwd_kernel, plan.grid, (
        q, k, v, table, kpm, gk, gv, gtable, caps, qseg, kseg, spans, out, lse,
        qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], gks[0], gks[1], gks[2], gvs[0], gvs[1], gvs[2],
        os_[0], os_[1], os_[2], kpm.stride(0), qseg.stride(0), kseg.stride(0),
        H, Lq, Lk, G, D, q_offset, cut, cut_g, window, scale * _LOG2E, dropout_p, seed_arg(seed, dropout_p, q.device),
    ), plan.meta)  # fmt: skip
    return out, lse


class _BackwardPlan(NamedTuple):
    """What a backward's launches take from its sizes and flags alone (`_backward_plan`)."""

    dq_block: tuple[int, int]  # the dQ tile's BLOCK_M, BLOCK_N (the padded tables' and the slots' tile)
    dkdv_block: tuple[int, int]
    dq_chunks: int  # programs per dQ tile, and per dK/dV tile: one per chunk of the head dim (`head_chunk`)
    dkdv_chunks: int
    num_m: int  # query tiles
    chunk: tuple[int, int, int]  # query tiles, heads and batch elements of one dQ launch
    slots: int
    whole: bool  # one dQ launch: its rows, summed, are the tables' gradients
    tile: int  # floats of a slot's dS tile, row partials and fp32 dQ tile
    partial_tile: int
    q_stride: tuple[int, int, int, int]  # `_like_heads` of dQ, and of dK and dV
    k_stride: tuple[int, int, int, int]
    grids: tuple  # each dQ launch's (m0, h0, b0), its grid of programs and its slots' rows by head
    preprocess: dict  # each launch's meta-parameters
    dkdv: dict
    dkdv_global: dict
    dq: dict
    dq_global: dict
    absent: _Absent


@functools.lru_cache(maxsize=256)
def _backward_plan(
    B: int, H: int, Lq: int, Lk: int, D: int, dtype: torch.dtype, device: torch.device, source: tuple | None, G: int,
    gbs: int, row: int, grow: int, flags: tuple[bool, ...], scratch_bytes: int,
) -> _BackwardPlan:  # fmt: skip
    """The backward's tiles, dQ chunks and meta-parameters for these sizes, table rows (`row`, `grow`:
    2C + 1 per table, 0 without) and `flags` (HAS_KPM, CAUSAL, WINDOWED, DROPOUT, HAS_SEG), worked out
    once per shape. `source` is `_tile_source()`, `scratch_bytes` the _DQ_SCRATCH_BYTES that `_dq_chunks`
    reads."""
    tile_set = _tiles(D, dtype, device)
    dq_tile, dkdv_tile = (tile_set.dq_global, tile_set.dkdv_global) if G > 0 else (tile_set.dq, tile_set.dkdv)
    block_m, block_n = dq_tile[:2]
    num_m, block_d = cdiv(Lq, block_m), _block_d(D)
    has_kpm, causal, windowed, dropout, has_seg = flags
    has_bias, has_gbias = row > 0, grow > 0
    common = dict(HAS_KPM=has_kpm, CAUSAL=causal, WINDOWED=windowed, DROPOUT=dropout, GBS=gbs, BLOCK_D=block_d,
                  PRECISION=_precision(dtype), HAS_SEG=has_seg)  # fmt: skip

    def options(tile):
        bm, bn, warps, stages = tile[:4]
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DC=head_chunk(tile, block_d), num_warps=warps, num_stages=stages)

    keys_apart = apart(None if interpreting() else _arch(device), dkdv_tile)
    dkdv = dict(common, HAS_BIAS=has_bias, GLOBAL_KEYS=False, APART=keys_apart, **options(dkdv_tile))
    dkdv_global = dict(common, HAS_BIAS=has_gbias, GLOBAL_KEYS=True, HAS_KPM=False, CAUSAL=False, WINDOWED=False,
                       HAS_SEG=False, APART=keys_apart, **options(dkdv_tile))  # fmt: skip
    dq = dict(common, HAS_BIAS=has_bias, HAS_GBIAS=has_gbias, SKEW=_skew(block_m, block_n), **options(dq_tile))
    # Each dQ program has a slot: a dS tile for the bias gradient's diagonal sums (it stays in L2), a
    # row of per-distance partials per table and, with global tokens (two launches: the ordinary keys
    # into an fp32 dQ, then the globals on top), its fp32 dQ tile. The launches go in chunks whose
    # slots fit in _DQ_SCRATCH_BYTES, each reusing the same buffers.
    tile = block_m * _skew(block_m, block_n) if has_bias or has_gbias else 0
    partial_tile = block_m * block_d if G > 0 else 0
    chunk = _dq_chunks(num_m, H, B, 4 * (tile + row + grow + partial_tile))
    dq_chunks = block_d // head_chunk(dq_tile, block_d)
    grids = []
    for b0 in range(0, B, chunk[2]):
        for h0 in range(0, H, chunk[1]):
            for m0 in range(0, num_m, chunk[0]):
                grid = (min(chunk[0], num_m - m0), min(chunk[1], H - h0), min(chunk[2], B - b0))
                # The slots' rows in the launch, (head, batch element, query tile): one reduction over the
                # middle sums each head's in a fixed order.
                grids.append(((m0, h0, b0), (grid[0] * dq_chunks, *grid[1:]), (grid[1], grid[2] * grid[0])))
    return _BackwardPlan(
        (block_m, block_n), tuple(dkdv_tile[:2]), dq_chunks, block_d // head_chunk(dkdv_tile, block_d), num_m,
        chunk, math.prod(chunk), chunk == (num_m, H, B), tile, partial_tile, _heads_stride(H, Lq, D),
        _heads_stride(H, Lk, D), tuple(grids), dict(BLOCK_M=block_m, BLOCK_D=block_d), dkdv, dkdv_global,
        dict(dq, ORDINARY=True, HAS_GLOBAL=False, PARTIAL_IN=False, PARTIAL_OUT=G > 0),
        dict(dq, ORDINARY=False, HAS_GLOBAL=True, PARTIAL_IN=True, PARTIAL_OUT=False), _absent(dtype, device),
    )  # fmt: skip


def attention_backward(do, q, k, v, out, lse, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p,
                       window=-1, grad_lse=None, globals_=None, segs=None):  # fmt: skip
    """Launch the backward on the forward's log2-domain `lse` (and `grad_lse`, the gradient on it, or
    None). Returns dq, dk, dv (in the layout of `_like_heads`), the `(H, 2C + 1)` fp32 gradient of the
    distance table (`dist_table` as in `attention_forward`; None without a bias) and, with `globals_`,
    the gradients of the global keys, values and distance table (None without)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    device = q.device
    dropout_p = quantized_dropout(dropout_p)
    q, k, v, do = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), last_dim_contiguous(do)
    G, gbs = _globals_of(globals_)
    gdist = None if globals_ is None else globals_.dist_table
    has_bias, has_gbias = dist_table is not None, gdist is not None
    cut, cut_g = _cut_of(dist_table), _cut_of(gdist)
    row, grow = (2 * cut + 1 if has_bias else 0), (2 * cut_g + 1 if has_gbias else 0)
    dgk = dgv = None
    if globals_ is not None:
        dgk, dgv = _like_heads(B, H, G, D, globals_.k), _like_heads(B, H, G, D, globals_.v)
    if Lq == 0 or Lk == 0:  # no query or no key: every gradient is zero, and there is nothing to launch
        dq, dk, dv = _like_heads(B, H, Lq, D, q), _like_heads(B, H, Lk, D, k), _like_heads(B, H, Lk, D, v)
        for t in (dq, dk, dv, dgk, dgv):
            if t is not None:
                t.zero_()
        return dq, dk, dv, _table_grad(None, row, dq), dgk, dgv, _table_grad(None, grow, dq)
    flags = (key_padding_mask is not None, causal, window >= 0, dropout_p > 0.0, segs is not None)
    plan = _backward_plan(B, H, Lq, Lk, D, q.dtype, device, _tile_source(), G, gbs, row, grow, flags,
                          _DQ_SCRATCH_BYTES)  # fmt: skip
    absent = plan.absent
    gk = gv = absent.keys
    caps = absent.caps
    if globals_ is not None:
        gk, gv, caps = last_dim_contiguous(globals_.k), last_dim_contiguous(globals_.v), globals_.caps
    _check_batch_span(do)  # q, k, v and the global tokens passed the forward's check, out is the forward's
    dq = torch.empty_strided((B, H, Lq, D), plan.q_stride, dtype=q.dtype, device=device)
    dk = torch.empty_strided((B, H, Lk, D), plan.k_stride, dtype=k.dtype, device=device)
    dv = torch.empty_strided((B, H, Lk, D), plan.k_stride, dtype=v.dtype, device=device)
    grads = [None, None]  # the tables' gradients, None until a launch writes them
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=device)
    os_, dos = out.stride(), do.stride()
    launch_kernel(_bucketed_attention_bwd_preprocess_kernel, (plan.num_m, H, B), (
        out, do, delta, os_[0], os_[1], os_[2], dos[0], dos[1], dos[2], H, Lq, D,
    ), plan.preprocess)  # fmt: skip
    if grad_lse is not None:
        # d lse_i / d s_ij = p_ij: a gradient on the natural log-sum-exp enters dS = P * (dP - delta) as
        # -grad; `grad_lse` is the gradient on the log2 one, log2(e) times smaller.
        delta.sub_(grad_lse, alpha=_LOG2E)
    kpm = _mask_args(key_padding_mask, segs, Lk, device)
    tail = (scale, scale * _LOG2E, dropout_p, seed_arg(seed, dropout_p, q.device))
    qs, ks, vs, gks, gvs = q.stride(), k.stride(), v.stride(), gk.stride(), gv.stride()
    bm, bn = plan.dkdv_block
    qseg = kseg = spans = absent.ids
    if segs is not None:
        qseg, kseg, spans = segs.q, segs.k, _segment_spans(segs.k, segs.q, bn)
    mask_strides = (kpm.stride(0), qseg.stride(0), kseg.stride(0))
    for keys_k, keys_v, keys_table, keys_causal, n_keys, key_base, grad_k, grad_v, meta in (
        (k, v, dist_table, causal, Lk, 0, dk, dv, plan.dkdv),
        *(((gk, gv, gdist, False, G, Lk, dgk, dgv, plan.dkdv_global),) if G > 0 else ()),
    ):
        padded, keys_cut = absent.table, 0
        if keys_table is not None:
            padded, keys_cut = _table_args(keys_table, bm, bn, keys_causal)
        kks, kvs, dks = keys_k.stride(), keys_v.stride(), grad_k.stride()
        launch_kernel(_bucketed_attention_bwd_dkdv_kernel, (cdiv(n_keys, bn) * plan.dkdv_chunks, H, B), (
            q, keys_k, keys_v, padded, kpm, caps, qseg, kseg, spans, do, lse, delta, grad_k, grad_v,
            qs[0], qs[1], qs[2], kks[0], kks[1], kks[2], kvs[0], kvs[1], kvs[2], dos[0], dos[1], dos[2],
            dks[0], dks[1], dks[2], *mask_strides, H, Lq, n_keys, D, q_offset, keys_cut, window, key_base, *tail,
        ), meta)  # fmt: skip
    if G == 0 and dgk is not None:
        dgk.zero_(), dgv.zero_()
    # The dQ programs' slots (`_backward_plan`); a buffer that no launch reads is a placeholder.
    slots, whole = plan.slots, plan.whole
    scratch = torch.empty(slots * plan.tile, dtype=torch.float32, device=device) if plan.tile else absent.table
    rows = grows = absent.table
    if row:
        rows = (torch.zeros if whole else torch.empty)((slots, row), dtype=torch.float32, device=device)
    if grow:
        grows = (torch.zeros if whole else torch.empty)((slots, grow), dtype=torch.float32, device=device)
    partial = absent.table
    if plan.partial_tile:
        partial = torch.empty(slots * plan.partial_tile, dtype=torch.float32, device=device)
    block_m, block_n = plan.dq_block
    table = gtable = absent.table
    if dist_table is not None:
        table, _ = _table_args(dist_table, block_m, block_n, causal)
    if gdist is not None:
        gtable, _ = _table_args(gdist, block_m, block_n)
    if segs is not None:
        spans = _segment_spans(segs.q, segs.k, block_m)
    dqs = dq.stride()
    head = (q, k, v, table, kpm, gk, gv, gtable, caps, qseg, kseg, spans, do, lse, delta, dq, partial, rows, grows,
            scratch, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], gks[0], gks[1], gks[2],
            gvs[0], gvs[1], gvs[2], dos[0], dos[1], dos[2], dqs[0], dqs[1], dqs[2], *mask_strides,
            H, Lq, Lk, G, D, q_offset, cut, cut_g, window)  # fmt: skip
    for base, programs, by_head in plan.grids:
        if not whole:
            for partials, width in ((rows, row), (grows, grow)):
                if width:
                    partials.zero_()
        launch_kernel(_bucketed_attention_bwd_dq_kernel, programs, (*head, *base, *tail), plan.dq)
        if G > 0:
            launch_kernel(_bucketed_attention_bwd_dq_kernel, programs, (*head, *base, *tail), plan.dq_global)
        for i, partials, width in ((0, rows, row), (1, grows, grow)):
            if not width:
                continue
            if whole:
                grads[i] = partials.view(*by_head, width).sum(1)
            else:
                per_head = partials[: by_head[0] * by_head[1]].view(*by_head, width).sum(1)
                if grads[i] is None:
                    grads[i] = torch.zeros(H, width, dtype=torch.float32, device=device)
                h0 = base[1]
                grads[i][h0 : h0 + by_head[0]] += per_head
    return dq, dk, dv, _table_grad(grads[0], row, dq), dgk, dgv, _table_grad(grads[1], grow, dq)


def _table_grad(grad: torch.Tensor | None, width: int, dq: torch.Tensor) -> torch.Tensor | None:
    """A table's gradient as `attention_backward` returns it: None without the table, zeros where no
    launch wrote it (no key saw the table)."""
    if not width:
        return None
    return grad if grad is not None else torch.zeros(dq.shape[1], width, dtype=torch.float32, device=dq.device)
