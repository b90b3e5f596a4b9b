"""LongT5 encoder attention: blocked local attention plus optional transient-global tokens.

Semantics (those of the reference LongT5 implementation):
- the sequence is cut into blocks of `radius + 1`; a query sees the keys of its
  own block and the two neighbouring blocks that lie within `radius` of it,
  with T5's bidirectional bucketed bias of `j - i` from `bias_table`;
- with `global_k`/`global_v` (transient-global), every query also sees every
  existing global token g with the bias `global_bias_table[bucket(g - block_id(i))]`;
  block ids and which globals exist follow `global_aggregate.global_block_ids` (a
  padded query takes the block position its index would have,
  `global_aggregate.global_positions`);
- padded keys are never attended. Outputs at padded query positions are
  unspecified (they never reach a real token); a query with nothing to attend
  returns zeros.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._backend import autocast_cast, autocast_dtype, autocast_off, draw_seed, upcast, use_triton
from .bucketed_attention import (
    GlobalTokens,
    PositionBias,
    attention_backward,
    attention_forward,
    bucket_table,
    distance_table,
    kept_mask,
    relative_bias,
    relative_position_bucket,
    unsupported_inputs,
)
from .global_aggregate import global_block_ids, global_caps, global_positions

HAS_TRITON_KERNEL = True


def _three_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, nb * block, ...) -> (B, H, nb, 3 * block, ...): previous, own and next block of each block."""
    padded = F.pad(x.movedim(2, -1), (block, block)).movedim(-1, 2)  # (B, H, (nb + 2) * block, ...)
    windows = padded.unfold(2, 3 * block, block)  # (B, H, nb, ..., 3 * block)
    return windows.movedim(-1, 3)  # (B, H, nb, 3 * block, ...)


def _side_bias(
    global_bias_table: torch.Tensor, positions: torch.Tensor, num_globals: int, max_distance: int
) -> torch.Tensor:
    """(B, H, L, G) bias of query i to global g: global_bias_table[bucket(g - positions[i])]."""
    # positions lie in [-1, G - 1], so g - position lies in [-(G - 1), G].
    distances = torch.arange(-(num_globals - 1), num_globals + 1, device=positions.device)  # (2G,)
    buckets = relative_position_bucket(
        distances, bidirectional=True, num_buckets=global_bias_table.shape[0], max_distance=max_distance
    )
    per_distance = upcast(global_bias_table)[buckets]  # (2G, H)
    g = torch.arange(num_globals, device=positions.device)
    index = g[None, None, :] - positions[:, :, None] + (num_globals - 1)  # (B, L, G)
    return per_distance[index].permute(0, 3, 1, 2)  # (B, H, L, G)


@torch.library.custom_op("fastseq::local_attention_fwd", mutates_args=(), device_types=None)
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dist_table: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    global_k: torch.Tensor | None,
    global_v: torch.Tensor | None,
    global_dist_table: torch.Tensor | None,
    caps: torch.Tensor | None,
    seed: torch.Tensor | None,
    radius: int,
    global_block_size: int,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out `(B, L, H, D)` and each row's log-sum-exp `(B, H, L)` fp32 over its window and the global
    tokens, in the kernels' log2 domain (+inf for a row with no key), as the backward reads it."""
    globals_ = _globals(global_k, global_v, global_dist_table, caps, global_block_size)
    out, lse2 = attention_forward(
        q, k, v, dist_table, key_padding_mask, seed, False, 0, 1.0, dropout_p, radius, globals_
    )
    return out.transpose(1, 2), lse2


@_fwd_op.register_fake
def _fwd_fake(q, k, v, *_):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fastseq::local_attention_bwd", mutates_args=(), device_types=None)
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
    global_k: torch.Tensor | None,
    global_v: torch.Tensor | None,
    global_dist_table: torch.Tensor | None,
    caps: torch.Tensor | None,
    seed: torch.Tensor | None,
    radius: int,
    global_block_size: int,
    dropout_p: float,
) -> list[torch.Tensor]:
    """dq `(B, L, H, D)`, dk, dv, the `(H, 2C + 1)` gradient of dist_table, the global keys' and
    values' `(B, G, H, D)` gradients and the global distance table's; absent ones as empty tensors."""
    globals_ = _globals(global_k, global_v, global_dist_table, caps, global_block_size)
    dq, dk, dv, ddt, dgk, dgv, dgdt = attention_backward(
        do, q, k, v, out, lse, dist_table, key_padding_mask, seed, False, 0, 1.0, dropout_p, radius,
        grad_lse, globals_,
    )  # fmt: skip

    def heads(t):
        return t.transpose(1, 2) if t is not None else q.new_empty(0)

    return [
        heads(dq),
        heads(dk),
        heads(dv),
        ddt if dist_table is not None else q.new_empty(0),
        heads(dgk),
        heads(dgv),
        dgdt if dgdt is not None else q.new_empty(0),
    ]


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, out, lse, grad_lse, dist_table, key_padding_mask, global_k, global_v, global_dist_table,
              *_):  # fmt: skip
    B, H, L, D = q.shape

    def heads(t):
        return t.new_empty(t.shape[0], t.shape[2], t.shape[1], t.shape[3]) if t is not None else q.new_empty(0)

    def table(t):
        return torch.empty_like(t) if t is not None else q.new_empty(0)

    return [heads(q), heads(k), heads(v), table(dist_table), heads(global_k), heads(global_v), table(global_dist_table)]


def _setup_context(ctx, inputs, output):
    q, k, v, dist_table, kpm, global_k, global_v, global_dist_table, caps, seed, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, dist_table, kpm, global_k, global_v, global_dist_table, caps, seed)
    ctx.args = args


def _backward_op(ctx, grad_out, grad_lse):
    q, k, v, out, lse, dist_table, kpm, global_k, global_v, global_dist_table, caps, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, ddt, dgk, dgv, dgdt = torch.ops.fastseq.local_attention_bwd(
        grad_out.transpose(1, 2), q, k, v, out.transpose(1, 2), lse, grad_lse, dist_table, kpm, global_k, global_v,
        global_dist_table, caps, seed, *ctx.args,
    )  # fmt: skip
    return (
        dq.transpose(1, 2),
        dk.transpose(1, 2),
        dv.transpose(1, 2),
        ddt if dist_table is not None else None,
        None,
        dgk.transpose(1, 2) if global_k is not None else None,
        dgv.transpose(1, 2) if global_v is not None else None,
        dgdt if global_dist_table is not None else None,
        *([None] * 5),
    )


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def _globals(global_k, global_v, global_dist_table, caps, block_size) -> GlobalTokens | None:
    if global_k is None:
        return None
    return GlobalTokens(global_k, global_v, global_dist_table, caps, block_size)


class _EagerLocalAttention(torch.autograd.Function):
    """The ops' forward and backward and their autograd without the dispatcher, as `bucketed_attention`'s
    eager path: what eager mode runs (the ops are what torch.compile traces; a test holds the two bitwise
    equal). Tensors stay `(B, H, L, D)`, the padding mask is converted once, a `PositionBias` gives the
    padded tables it keeps, and the log-sum-exp stays in the kernels' log2 domain, as the ops keep it (no
    caller of `local_attention` reads it).

    Inputs: q, k, v, the distance table (None: no bias) whose gradient is returned and what the
    launchers read for it (that table or its `PositionBias`), the launchers' mask, the global keys and
    values, the global distance table and its launch form, caps, the seed (`draw_seed`, None without
    dropout) and (radius, global_block_size, dropout_p)."""

    @staticmethod
    def forward(ctx, q, k, v, dist_table, table, kpm, global_k, global_v, global_dist_table, global_table, caps,
                seed, args):  # fmt: skip
        radius, block_size, dropout_p = args
        globals_ = _globals(global_k, global_v, global_table, caps, block_size)
        kpm = kept_mask(kpm, k.shape[2], q.device)
        out, lse = attention_forward(q, k, v, table, kpm, seed, False, 0, 1.0, dropout_p, radius, globals_)
        ctx.save_for_backward(q, k, v, out, lse, global_k, global_v)
        ctx.table, ctx.global_table, ctx.kpm, ctx.caps, ctx.seed, ctx.args = table, global_table, kpm, caps, seed, args
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, global_k, global_v = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        radius, block_size, dropout_p = ctx.args
        globals_ = _globals(global_k, global_v, ctx.global_table, ctx.caps, block_size)
        dq, dk, dv, ddt, dgk, dgv, dgdt = attention_backward(
            grad_out, q, k, v, out, lse, ctx.table, ctx.kpm, ctx.seed, False, 0, 1.0, dropout_p, radius, None, globals_
        )
        return dq, dk, dv, ddt, None, None, dgk, dgv, dgdt, None, None, None, None


def _distance_table(bias_table: torch.Tensor | PositionBias, max_distance: int) -> torch.Tensor:
    """The `(H, 2C + 1)` distance table of a table, or the one a `PositionBias` made (both sides' buckets)."""
    if isinstance(bias_table, PositionBias):
        return bias_table.dist_table
    return distance_table(bias_table, bidirectional=True, max_distance=max_distance)


def _distance(bias_table, max_distance: int) -> tuple[torch.Tensor | None, torch.Tensor | PositionBias | None]:
    """A table's distance table (None without) and what the eager path's launchers read for it."""
    if bias_table is None:
        return None, None
    if isinstance(bias_table, PositionBias):
        return bias_table.dist_table, bias_table
    table = _distance_table(bias_table, max_distance)
    return table, table


def _local_attention_triton(
    q,
    k,
    v,
    bias_table,
    *,
    radius,
    max_distance,
    key_padding_mask,
    global_k,
    global_v,
    global_bias_table,
    global_block_size,
    dropout_p,
) -> torch.Tensor:
    """One kernel: a query tile visits only the key tiles its window touches (O(L * radius)), then
    every global token, in one online softmax; the biases come from per-distance tables."""
    caps = None
    dist_table, table = _distance(bias_table, max_distance)
    global_dist_table, global_table = _distance(global_bias_table, max_distance)
    if global_k is not None:
        B, _, L, _ = q.shape
        caps = global_caps(key_padding_mask, B, L, global_block_size, q.device)
    seed = draw_seed(dropout_p, q.device)
    if not torch.compiler.is_compiling():
        args = (int(radius), int(global_block_size), float(dropout_p))
        return _EagerLocalAttention.apply(q, k, v, dist_table, table, key_padding_mask, global_k, global_v,
                                          global_dist_table, global_table, caps, seed, args)  # fmt: skip
    out, _ = torch.ops.fastseq.local_attention_fwd(
        q, k, v, dist_table, key_padding_mask, global_k, global_v, global_dist_table, caps, seed, int(radius),
        int(global_block_size), float(dropout_p),
    )  # fmt: skip
    return out.transpose(1, 2)  # (B, H, L, D)


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | None,
    *,
    radius: int = 127,
    max_distance: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    global_bias_table: torch.Tensor | None = None,
    global_block_size: int = 16,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """fp32 blocked attention. q/k/v `(B, H, L, D)`, global_k/global_v `(B, H, G, D)` -> `(B, H, L, D)`."""
    B, H, L, D = q.shape
    block = radius + 1
    num_blocks = -(-L // block)
    pad = num_blocks * block - L
    if key_padding_mask is None:
        key_valid = torch.ones(B, L, dtype=torch.bool, device=q.device)
    else:
        key_valid = key_padding_mask != 0
    qf = F.pad(upcast(q), (0, 0, 0, pad)).view(B, H, num_blocks, block, D)  # (B, H, nb, W, D)
    k3 = _three_blocks(F.pad(upcast(k), (0, 0, 0, pad)), block)  # (B, H, nb, 3W, D)
    v3 = _three_blocks(F.pad(upcast(v), (0, 0, 0, pad)), block)  # (B, H, nb, 3W, D)
    scores = torch.matmul(qf, k3.transpose(-1, -2))  # (B, H, nb, W, 3W)
    # Query i of a block sits at offset `block` of its three-block window.
    if bias_table is not None:
        bias = relative_bias(
            bias_table, block, 3 * block, bidirectional=True, max_distance=max_distance, q_offset=block
        )
        scores = scores + bias.to(scores.dtype)[None, :, None]  # (B, H, nb, W, 3W)
    rel = torch.arange(3 * block, device=q.device)[None, :] - block - torch.arange(block, device=q.device)[:, None]
    local_ok = rel.abs() <= radius  # (W, 3W)
    valid3 = _three_blocks(F.pad(key_valid, (0, pad))[:, None], block)[:, 0]  # (B, nb, 3W)
    allowed = local_ok[None, None, None] & valid3[:, None, :, None, :]  # (B, 1, nb, W, 3W)

    if global_k is not None:
        G = global_k.shape[2]
        _, global_valid = global_block_ids(key_valid, global_block_size)
        side = torch.matmul(upcast(q), upcast(global_k).transpose(-1, -2))  # (B, H, L, G)
        if global_bias_table is not None:
            positions = global_positions(key_valid, global_block_size)
            side = side + _side_bias(global_bias_table, positions, G, max_distance).to(side.dtype)
        side = F.pad(side, (0, 0, 0, pad)).view(B, H, num_blocks, block, G)  # (B, H, nb, W, G)
        scores = torch.cat([scores, side], dim=-1)  # (B, H, nb, W, 3W + G)
        side_ok = global_valid[:, None, None, None, :].expand(B, 1, num_blocks, block, G)
        allowed = torch.cat([allowed.expand(B, 1, num_blocks, block, 3 * block), side_ok], dim=-1)

    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)  # masked keys get exactly zero probability
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs[..., : 3 * block], v3)  # (B, H, nb, W, D)
    if global_k is not None:
        out = out + torch.matmul(probs[..., 3 * block :], upcast(global_v)[:, :, None])  # (B, H, nb, W, D)
    # A row with nothing allowed would be uniform; zero it on the (W, D) output, not the probabilities.
    out = out * allowed.any(-1, keepdim=True)  # (B, H, nb, W, D)
    return out.reshape(B, H, num_blocks * block, D)[:, :, :L].to(q.dtype)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | PositionBias | None,
    *,
    radius: int = 127,
    max_distance: int = 128,
    key_padding_mask: torch.Tensor | None = None,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    global_bias_table: torch.Tensor | PositionBias | None = None,
    global_block_size: int = 16,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LongT5 local / transient-global attention. q/k/v `(B, H, L, D)`, bias tables `(num_buckets, H)` (or
    their `PositionBias`, bidirectional, made once per forward),
    key_padding_mask `(B, L)`, global_k/global_v `(B, H, L // global_block_size, D)` -> `(B, H, L, D)`.
    Under autocast as `bucketed_attention`: q, k, v and the global tokens in autocast's dtype, the
    biases and the softmax in fp32."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"local_attention expects q, k, v of one shape (B, H, L, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if radius < 0:
        raise ValueError(f"local_attention: radius must be >= 0; got {radius}")
    B, H, L, D = q.shape
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, L):
        raise ValueError(
            f"local_attention: key_padding_mask must be (B={B}, L={L}); got {tuple(key_padding_mask.shape)}"
        )
    if (global_k is None) != (global_v is None):
        raise ValueError("local_attention: pass both global_k and global_v, or neither")
    if global_k is not None:
        G = L // global_block_size
        expected = (B, H, G, D)
        if tuple(global_k.shape) != expected or tuple(global_v.shape) != expected:
            raise ValueError(
                f"local_attention: global_k and global_v must be {expected} (G = L // global_block_size); "
                f"got {tuple(global_k.shape)} and {tuple(global_v.shape)}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"local_attention: dropout_p must be in [0, 1); got {dropout_p}")
    for table in (bias_table, global_bias_table):
        if isinstance(table, PositionBias):
            table.check("local_attention", True, max_distance)  # LongT5's tables are bidirectional
    kwargs = dict(
        radius=radius,
        max_distance=max_distance,
        key_padding_mask=key_padding_mask,
        global_k=global_k,
        global_v=global_v,
        global_bias_table=global_bias_table,
        global_block_size=global_block_size,
        dropout_p=dropout_p,
    )
    if dtype := autocast_dtype(q, k, v):
        with autocast_off(q):
            q, k, v, global_k, global_v = autocast_cast(dtype, q, k, v, global_k, global_v)
            return local_attention(q, k, v, bias_table, **dict(kwargs, global_k=global_k, global_v=global_v))
    unsupported = functools.partial(unsupported_inputs, q)
    if use_triton("local_attention", HAS_TRITON_KERNEL, q, k, v, unsupported=unsupported):
        return _local_attention_triton(q, k, v, bias_table, **kwargs)
    kwargs["global_bias_table"] = bucket_table(global_bias_table)
    return local_attention_reference(q, k, v, bucket_table(bias_table), **kwargs)
