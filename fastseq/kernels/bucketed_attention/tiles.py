"""The attention's tiles: for each architecture family and head dim, the block sizes, warps and stages of
every kernel, read from the compiled code; and every build a launcher can pick, for the compile-only
tests and the static report (`compile_specs`), with the feature prices they hold. On a GPU the kernels
take 16-bit inputs (`unsupported_inputs`: float32 runs PyTorch's attention)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import interpreting, next_power_of_2
from .kernels import (
    _bucketed_attention_bwd_dkdv_kernel,
    _bucketed_attention_bwd_dq_kernel,
    _bucketed_attention_bwd_preprocess_kernel,
    _bucketed_attention_fwd_kernel,
)


class Tiles(NamedTuple):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel for one (architecture family, padded
    head dim), and for a backward kernel optionally a fifth, BLOCK_DC: the head-dim columns of the
    gradients one program writes (`head_chunk`). BLOCK_M counts query rows and BLOCK_N keys in every
    kernel."""

    fwd: tuple[int, ...]  # the forward without global tokens (T5, BlenderbotSmall, LongT5 local)
    fwd_global: tuple[int, ...]  # the forward with LongT5's transient-global tokens
    dq: tuple[int, ...]
    dkdv: tuple[int, ...]
    dq_global: tuple[int, ...]  # both dQ launches of a backward with global tokens
    dkdv_global: tuple[int, ...]  # its dK/dV of the ordinary keys and of the global tokens


def _parse_tiles(text: str) -> Tiles:
    """`Tiles` from "BLOCK_M.BLOCK_N.num_warps.num_stages[.BLOCK_DC]" per kernel, in the fields' order."""
    return Tiles(*(tuple(int(v) for v in tile.split(".")) for tile in text.split()))


# Per architecture family (90: Hopper and later, 227 KiB of shared memory per block; 80: A100,
# 163 KiB; 86: every other GPU, sm_86/sm_89 with 99 KiB) and padded head dim: the
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
# sm_90's forward at D = 128 is 128 x 64 with 2 stages (236 to 255 registers, no spill under 3.6 or 3.9; 128 x 32 gave
# wgmma N = 32). sm_80's backward at D = 64 takes 64 x 32 tiles with 4 warps and 2 stages: per score, the t5 builds' key
# loops ran 1.22 (dQ) and 1.44 (dK/dV) warp instructions against 1.98 and 2.30 on the 8-warp 32 x 64 and 64 x 32 tiles,
# with no spill under 3.6 or 3.9 (dQ 255 registers); for dK/dV's since, see below the mma.sync layouts. sm_80's forward
# at D = 128 is 128 x 32 with 8 warps (was 64 x 32): the bias build then holds as many CTAs per SM as the plain one (200
# and 196 registers under 3.6; 64 x 32 took 173 against 128, one CTA against two), and its key loop runs 0.77 warp
# instructions a score against 2.0. At D = 64 it is 128 x 64 with 2 stages (was 128 x 32 with 3): under Triton 3.6 the
# bias build took 139 registers there against the plain build's 127 (one CTA per SM against two); at 128 x 64 both hold
# one, and the plain key loop runs 0.44 warp instructions a score against 0.50 (under 3.6).
# With dropout drawn per 16 elements, dK/dV took smaller tiles at D = 16 (sm_80: 64 x 32, 4 warps) and one
# stage at D = 128 (sm_80, sm_86), and sm_90's dQ at D = 256 8 warps: those builds spilled 8 to 16 bytes.
# Below Hopper (mma.sync) dK/dV's products set the layout of the tile's scores, and the dropout mask went through
# shared memory (`_accumulate`): 17 barriers in the t5 builds' key loop against the bias build's 5, at D = 64 and 128;
# likewise sm_86's forward at D = 128 on 64 x 32, 23 against 2. With the products apart (`apart`: below Hopper, on
# tiles with 16 query rows a warp), dK/dV, T5's and LongT5's, takes 64 query rows by 32 keys on 4 warps: at D = 64
# with 2 stages (T5's took 1 stage, as 2 spilled 8 bytes under 3.6 then, and LongT5's on sm_80 8 warps; 2 spill none
# now), at D = 128 with 1 (was 32 x 32, T5's on 8 warps; 2 stages spilled 24 to 48 bytes); so does LongT5's global one
# at D = 16 on sm_86 (was 32 x 32 on 8 warps), with 1 stage. Per score, the t5 build's key loop on sm_80 runs 1.15
# warp instructions against 1.44 at D = 64 and 1.92 against 3.51 at D = 128, with no spill under 3.6 or 3.9. sm_86's
# forward at D = 128, T5's and LongT5's, takes 128 x 32 with 8 warps and 2 stages: per score its t5 key loop runs 1.09
# against 2.88, LongT5's 1.31 against 1.94. dQ at D = 128 below Hopper stays 32 x 64 on 8 warps, its mask through
# shared memory (22 barriers against 9 for the bias build): 64- and 128-row tiles, apart or not, spilled 8 to 120
# bytes under 3.6 or 3.9, and 128 x 16 ran as many instructions a score.
# sm_90's dK/dV, T5's and LongT5's, takes 128 query rows by 64 keys with 8 warps and one stage at D = 16 to
# 128: with 32 keys its products over the key tile (dV += P^T dO, dK += dS^T Q) had M = 32 and stayed
# mma.sync; with 64 query rows and 8 warps the two warpgroups both computed the tile's 64 x 64 scores, dP,
# softmax and dropout (the layout repeats the rows over warps 4 to 7). At D = 64 the t5 build's key loop ran
# 1.40 warp instructions a score on 64 x 64 and runs 0.66 on 128 x 64 (D = 16: 1.19 to 0.59; D = 32: 1.26
# to 0.61), all wgmma, no spill under 3.6 or 3.9 (at most 230 registers at D = 64); 64 x 64 with 4 warps
# ran 0.71 at 253 registers. At D = 128 (was 32 x 32: 64 HMMA) 64 x 64 spilled 64 to 696 bytes under 3.9.
# sm_90's dQ at D = 128 is 64 x 32 with 4 warps: with 8 warps both warpgroups computed the tile's scores, and
# its t5 build's key loop ran 2.94 warp instructions a score against 1.28 (no spill under 3.6 or 3.9).
# LongT5's forward at D = 256 is 64 x 32 (wgmma; was 16 x 16). sm_90's backward at D = 256 writes each tile's gradients
# in chunks of the head dim (a fifth field, `head_chunk`), every chunk's program computing the tile's scores and dP
# whole again: with whole rows a 64-row dQ tile spilled 8 to 352 bytes (its 64 x 256 fp32 dQ) and a 64 x 64 dK/dV tile
# 408 to 640 (two 64 x 256 fp32 accumulators), so it stayed on 16-row mma.sync tiles. Both now take 4 warps, 2 stages
# and chunks of 64 columns: dQ 64 x 32 (128-column chunks spilled 24 to 48 bytes under 3.6, and 64 x 64 tiles 8 to 168),
# dK/dV 32 query rows by 64 keys, its scores and dP computed key-major so that every product has the keys as wgmma's M
# (`_dot_t`; query-major, the scores stayed mma.sync). Counting each chunk's recomputation, the t5 builds' key loops run
# 6.4 (dQ) and 6.1 (dK/dV) warp instructions a score against 6.9 and 5.8 on the 16-row tiles; 16 x 64 dK/dV with 8 warps
# and 128-column chunks ran 14.1 (its 64 x 16 scores were computed by both warpgroups) and 64 x 64 spilled. All 8
# builds: wgmma only, no spill under 3.6 or 3.9.
# LongT5's dK/dV of the global tokens on sm_80 (D = 32) and sm_86 (D = 32) take one stage: with two, the
# tile's cheaper masks and bias left those builds 8 bytes of spill under 3.9 (at D = 64 on sm_80 one stage
# spills 8 bytes since its products run apart, and two none). Under 3.6 they left more with 8 to 16 bytes,
# each mended so: LongT5's dK/dV at D = 256 on sm_80 takes 8 warps; on sm_86 LongT5's dQ at D = 32 128 x 32
# tiles; and a 16-row decoding tile at most two stages (`_short_tile`).
# Since the dropout mask's tiles go through `_opaque` and Philox's products are 64-bit (`_philox7`), the per-score
# figures above are lower below Hopper: on sm_80 the t5 builds' key loops run 0.89 (dK/dV, D = 64), 1.22 (dK/dV,
# D = 128), 1.12 (dQ, D = 64) and 0.92 (the forward, D = 128) warp instructions a score under Triton 3.9; sm_86's
# forward at D = 128 0.94, LongT5's 1.15. Three tiles moved so that no build spills under 3.6 or 3.9: sm_86's forward
# at D = 16 takes 2 stages (3 spilled 8 bytes under 3.6), its dQ at D = 64 64 x 64 (64 x 32 spilled 8 under 3.6 in
# the packed build; 64 x 64 runs 1.04 a score against 1.31), and its LongT5 global dK/dV at D = 256 8 warps (4 spilled
# 16 under 3.9).
# fmt: off
_TILES: dict[tuple[int, int], Tiles] = {key: _parse_tiles(text) for key, text in {
    #           fwd        fwd_global dq         dkdv       dq_global  dkdv_global
    (90, 16):   "128.32.8.3 128.64.8.3 128.64.8.2 128.64.8.1 128.64.8.2 128.64.8.1",
    (90, 32):   "128.32.8.3 128.64.8.3 128.64.8.2 128.64.8.1 128.32.8.2 128.64.8.1",
    (90, 64):   "128.64.8.3 128.64.8.3 64.32.4.2  128.64.8.1 128.32.8.2 128.64.8.1",
    (90, 128):  "128.64.8.2 128.64.8.2 64.32.4.2  128.64.8.1 64.32.4.2  128.64.8.1",
    (90, 256):  "64.32.8.2  64.32.8.2  64.32.4.2.64 32.64.4.2.64 64.32.4.2.64 32.64.4.2.64",
    (80, 16):   "128.64.8.3 128.64.8.3 128.64.8.2 64.32.4.2  128.64.8.2 64.32.4.2",
    (80, 32):   "128.64.8.3 128.64.8.3 128.32.8.2 128.32.8.2 128.64.8.2 128.32.8.1",
    (80, 64):   "128.64.8.2 128.32.8.3 64.32.4.2  64.32.4.2  128.32.8.2 64.32.4.2",
    (80, 128):  "128.32.8.2 128.32.8.3 32.64.8.2  64.32.4.1  32.64.8.2  64.32.4.1",
    (80, 256):  "32.32.8.2  64.32.8.2  16.16.4.1  16.16.4.1  16.16.4.1  16.16.8.1",
    (86, 16):   "128.64.8.2 128.64.8.3 128.32.8.2 128.64.8.2 128.64.8.2 64.32.4.1",
    (86, 32):   "128.64.8.3 128.64.8.3 128.32.8.2 128.32.8.2 128.32.8.2 128.32.8.1",
    (86, 64):   "128.32.8.3 128.32.8.3 64.64.4.2  64.32.4.2  128.32.8.2 64.32.4.2",
    (86, 128):  "128.32.8.2 128.32.8.2 32.64.8.2  64.32.4.1  32.64.8.2  64.32.4.1",
    (86, 256):  "32.32.4.2  64.32.8.2  16.32.4.1  16.16.4.1  16.32.4.1  16.16.8.1",
}.items()}
# fmt: on
# Under the interpreter, small tiles so that short test sequences still span many tiles,
# band tiles and tiles beyond the cut-off.
_INTERPRET_TILE = (16, 16, 4, 1)
_MAX_HEAD_DIM = 256


def _skew(block_m: int, block_n: int) -> int:
    return next_power_of_2(block_m + block_n - 1)


def head_chunk(tile: tuple[int, ...], block_d: int) -> int:
    """BLOCK_DC of a backward tile: the head-dim columns of dQ, or of dK and dV, that one program writes
    (all BLOCK_D unless the tile names fewer; then BLOCK_D // BLOCK_DC programs share each tile, each
    computing the tile's scores and dP whole, `_head_chunk`)."""
    if len(tile) <= 4:
        return block_d
    chunk = tile[4]
    smallest = 1 if interpreting() else 16  # tl.dot's least N on a GPU
    if not smallest <= chunk <= block_d or chunk & (chunk - 1):
        raise ValueError(f"attention tile {tile}: BLOCK_DC must be a power of two, {smallest} to BLOCK_D = {block_d}")
    return chunk


def _block_d(D: int) -> int:
    return max(16, next_power_of_2(D))


def _arch(device: torch.device) -> int:
    """The config family of a CUDA device: 90 from Hopper on, 80 for A100 (sm_80), 86 otherwise."""
    capability = torch.cuda.get_device_capability(device)
    return 90 if capability[0] >= 9 else 80 if capability == (8, 0) else 86


def _tiles(D: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    if interpreting():
        return Tiles(*[_INTERPRET_TILE] * len(Tiles._fields))
    return _TILES[(_arch(device), _block_d(D))]


def apart(arch: int | None, tile: tuple[int, ...]) -> bool:
    """dK/dV's APART (`_accumulate`) on a tile of config family `arch`: below Hopper (mma.sync), where the
    tile has 16 query rows for each warp (fewer rows cannot give every warp its own); always under the
    interpreter (`arch` None), where it changes no result but is run."""
    if arch is None:
        return True
    return arch != 90 and tile[0] >= 16 * tile[2]


def _fwd_config(
    D: int, dtype: torch.dtype, Lq: int, device: torch.device, has_global: bool = False
) -> tuple[int, int, int, int]:
    tiles = _tiles(D, dtype, device)
    tile = tiles.fwd_global if has_global else tiles.fwd
    if interpreting():
        return tile
    # Incremental decoding (Lq = 1 against a cache) needs no 128-row query tile.
    return _short_tile(tile, max(_decode_rows(_arch(device)), next_power_of_2(Lq)))


def _decode_rows(arch: int) -> int:
    """The fewest query rows of a forward tile: 64 from Hopper on, where a 16-row tile's products stay
    mma.sync (a warpgroup's wgmma takes 64 rows); 16 below."""
    return 64 if arch == 90 else 16


def _short_tile(tile: tuple[int, int, int, int], rows: int) -> tuple[int, int, int, int]:
    """A forward tile cut to at most `rows` query rows. A cut tile takes at most one warp per 16 rows and
    at least 4 (a warpgroup's 64 rows on Hopper): with 8 warps on a 64-row tile sm_90's two warpgroups
    computed the same scores, and with Philox's 64-bit products (`_philox7`) its decoding key loop
    held 6 barriers against 3 under Triton 3.9. A 16-row one takes at most 2 stages: with 3 sm_86's
    decoding tile at D = 16 spilled 8 bytes under Triton 3.9 (8 warps, and 4 under 3.6), and with 8
    warps and 2 it spilled 8 under 3.9 once the dropout mask went through `_opaque`."""
    block_m, block_n, warps, stages = tile
    if rows >= block_m:
        return tile
    warps = min(warps, max(4, rows // 16))
    return rows, block_n, warps, min(stages, 2) if rows <= 16 else stages


def _cut_rows(arch: int, block_m: int) -> list[int]:
    """The query rows of the tiles that `_fwd_config` cuts from a `block_m`-row forward tile: powers of two
    from `_decode_rows(arch)` below `block_m`."""
    rows = _decode_rows(arch)
    cut = []
    while rows < block_m:
        cut.append(rows)
        rows *= 2
    return cut


def _precision(dtype: torch.dtype) -> str:
    """Exact products: fp32 inputs run the kernels only under the interpreter (`unsupported_inputs`)."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "ieee"


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
# (priced build, baseline build, at most this many times the baseline's SASS instructions in the whole
# kernel, and in its dearest key loop), for bf16 at D = 64 and 128 on sm_80 and sm_90 (build names
# without the "-sm{arch}-D{d}-bf16" tail), under Triton 3.6 and 3.9. A tile reads its bias through one
# pointer per row and an immediate offset per key (`_add_bias`), the padding mask as one added row
# (`key_bias`), causality from the bias table (`_kernel_table`); dropout draws a Philox call per 16
# elements and compares its bytes in place (`_dropout_keep`).
PRICES = [
    ("fwd-bias-pad", "fwd-none", 1.2, 1.2),  # T5's bias (padding on) against the same tile without either
    # What fine-tuning runs: bias, padding, causal, dropout. Its key loop is at most 1.47x (sm_90, D = 64,
    # Triton 3.6; 1.46x under 3.9): the Philox rounds alone are about a fifth of the plain loop.
    ("fwd-t5", "fwd-none", 1.5, 1.5),
    ("dq-bias-pad+dkdv-bias-pad", "dq-none+dkdv-none", 1.5, 1.5),  # the backward with the table's gradient
    # The dropout mask is drawn again in dQ and in dK/dV. Dearest on sm_90 at D = 64 under Triton 3.6: the whole
    # backward 1.70x, its key loops 1.82x (sm_80: 1.63x and 1.72x at most).
    ("dq-t5+dkdv-t5", "dq-none+dkdv-none", 1.75, 1.9),
    ("fwd_global-local-global", "fwd_global-none", 2.1, 1.75),  # LongT5 local + transient-global
    ("fwd_global-longt5", "fwd_global-none", 2.5, 2.15),
    # Packed rows (segment ids and the tile bounds of their spans) against a padding mask, T5's
    # self-attention (bias) and cross-attention (none). The mask is one added row per key tile, cheaper
    # than a plain tile's bounds check; the segments compare ids per element.
    ("fwd-bias-pack", "fwd-bias-pad", 1.2, 1.25),
    ("fwd-pack", "fwd-pad", 1.2, 1.35),
    ("dq-bias-pack+dkdv-bias-pack", "dq-bias-pad+dkdv-bias-pad", 1.15, 1.15),
    ("dq-pack+dkdv-pack", "dq-pad+dkdv-pad", 1.2, 1.25),
]
# (build, baseline): no more barriers in the dearest key loop than the baseline's. The bias reaches
# the scores in their own layout, with no shared-memory round trip (`_gather`).
# Dropout's mask reaches each score in the thread that holds it, with no shared memory: in the forward and
# in dK/dV (`_dropout_keep`, `_accumulate`).
BARRIER_BOUNDS = [
    ("fwd-bias-pad", "fwd-none"),
    ("fwd_global-local-global", "fwd_global-none"),
    ("fwd-t5", "fwd-none"),
    ("dkdv-t5", "dkdv-bias-pad"),
]
# (build, baseline): as many CTAs per SM as the baseline (`_compile.ctas_per_sm`: registers and shared
# memory), so that the bias costs no occupancy.
OCCUPANCY_BOUNDS = [("fwd-bias-pad", "fwd-none")]
# (build, baseline): no more warp shuffles than the baseline (the bias spread and the segment masks
# cost none).
SHUFFLE_BOUNDS = [
    ("fwd-bias-pad", "fwd-pad"),
    *((f"{kernel}-{bias}pack", f"{kernel}-{bias}pad") for kernel in ("fwd", "dq", "dkdv") for bias in ("", "bias-")),
]
# Builds compiled only as a price's baseline, never launched: no launcher runs the global-token tile
# without global tokens.
BASELINES_ONLY = ("fwd_global-none",)


# Batch strides of the segment ids: their rows are as long as the sequence, any length (the padding mask's
# rows are whole groups of 64 keys, `key_bias`).
_ANY_LENGTH = ("stride_qsegb", "stride_ksegb")


def compile_specs() -> list:
    """Every configuration the launchers can pick on a GPU, for the compile-only tests and the
    static report (`_compile`): for every tile of `_TILES`, the forward with T5's heaviest features,
    the decoding tile (Lq = 1) with them and the other tiles short queries cut (`_cut_rows`: "fwd32", T5's,
    and "fwd_global16", LongT5's), the forward with LongT5's global tokens, the backward's
    dQ and dK/dV kernels with each, LongT5's second dQ launch and global dK/dV, the backward's
    preprocessing; fp16 once per architecture (its buffers are bf16's); for bf16 at D = 64 and 128
    on sm_80 and sm_90 also the builds that `PRICES` and `SHUFFLE_BOUNDS` compare. Each is built as
    Triton specializes it for the usual inputs (aligned buffers, strides and D multiples of 16), and
    its batch strides are held to 64-bit products. Names read `<kernel>-<features>-sm<arch>-D<d>-<dtype>`."""
    from .._compile import CompileSpec, signature

    floats = ("scale", "scale_log2", "dropout_p")
    specs = []
    for (arch, block_d), tiles in _TILES.items():
        dtypes = ["bf16", "fp16"] if block_d == 64 else ["bf16"]
        for dtype in dtypes:
            pointers = {n: f"*{dtype}" for n in ("Q", "K", "V", "GK", "GV", "Out", "DO", "DQ", "DK", "DV")}
            pointers.update(DT="*fp32", GDT="*fp32", LSE="*fp32", DELTA="*fp32", DDT="*fp32", DDTG="*fp32",
                                        SCR="*fp32", DQP="*fp32", KPM="*fp32", CAP="*i32", QSEG="*i32", KSEG="*i32",
                            SPAN="*i32", SEED="*i32")  # fmt: skip

            def add(role, features, kernel, tile, extra=(), arch=arch, block_d=block_d, dtype=dtype, pointers=pointers):
                bm, bn, warps, stages = tile[:4]
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
                    BLOCK_DC=head_chunk(tile, block_d),
                    APART=apart(arch, tile),
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
                                         aligned=aligned, module=kernel.fn.__module__))  # fmt: skip

            fwd, bwd_dq, bwd_dkdv = _bucketed_attention_fwd_kernel, _bucketed_attention_bwd_dq_kernel, \
                _bucketed_attention_bwd_dkdv_kernel  # fmt: skip
            add("fwd", "t5", fwd, tiles.fwd)
            add("fwd", "t5-pack", fwd, tiles.fwd)
            add("decode", "t5", fwd, _short_tile(tiles.fwd, _decode_rows(arch)))
            # The other forward tiles that short queries cut (`_fwd_config`), T5's and LongT5's.
            for rows in _cut_rows(arch, tiles.fwd[0]):
                if rows > _decode_rows(arch):
                    add(f"fwd{rows}", "t5", fwd, _short_tile(tiles.fwd, rows))
            for rows in _cut_rows(arch, tiles.fwd_global[0]):
                add(f"fwd_global{rows}", "longt5", fwd, _short_tile(tiles.fwd_global, rows))
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
