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

The package by role: `kernels` (the `@triton.jit` kernels) and `jit` (the helpers they share), `tiles`
(the tile of each kernel per GPU and the builds the static report compiles), `launch` (the host side
of a launch), `op` (the public function, its custom ops and autograd) and `reference` (the PyTorch
specification).
"""

from __future__ import annotations

from .launch import (
    GlobalTokens,
    KeyBias,
    PositionBias,
    attention_backward,
    attention_forward,
    bucket_table,
    distance_table,
    kept_mask,
    key_bias,
    natural_lse,
)
from .op import HAS_TRITON_KERNEL, attention_with_lse, bucketed_attention, unsupported_inputs
from .reference import bucketed_attention_reference, relative_bias, relative_position_bucket
from .tiles import (
    BARRIER_BOUNDS,
    BASELINES_ONLY,
    FEATURES,
    OCCUPANCY_BOUNDS,
    PRICES,
    SHUFFLE_BOUNDS,
    compile_specs,
)

__all__ = [
    "BARRIER_BOUNDS",
    "BASELINES_ONLY",
    "FEATURES",
    "GlobalTokens",
    "HAS_TRITON_KERNEL",
    "KeyBias",
    "OCCUPANCY_BOUNDS",
    "PositionBias",
    "PRICES",
    "SHUFFLE_BOUNDS",
    "attention_backward",
    "attention_forward",
    "attention_with_lse",
    "bucket_table",
    "bucketed_attention",
    "bucketed_attention_reference",
    "compile_specs",
    "distance_table",
    "kept_mask",
    "key_bias",
    "natural_lse",
    "relative_bias",
    "relative_position_bucket",
    "unsupported_inputs",
]
