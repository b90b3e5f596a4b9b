"""`bucketed_attention`, the public function: its checks, the dispatch between the kernels and the
reference, the `torch.library` custom ops of the forward and backward and their autograd."""

from __future__ import annotations

import functools

import torch

from .._backend import autocast_cast, autocast_dtype, autocast_off, draw_seed, unsupported_dtypes, use_triton
from . import launch
from .reference import bucketed_attention_reference
from .tiles import _MAX_HEAD_DIM

HAS_TRITON_KERNEL = True


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
    bias_table = launch.bucket_table(bias_table)
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


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dist_table: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None, seed: torch.Tensor | None,
    causal: bool, q_offset: int, scale: float, dropout_p: float, window: int,
    q_segment_ids: torch.Tensor | None = None, k_segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """out `(B, Lq, H, D)` (heads not yet moved to dim 1) and the log2-domain log-sum-exp of each row's
    scores `(B, H, Lq)` fp32 (+inf for a row with no key), differentiable (`launch.natural_lse` makes it
    the natural one). `window` < 0: no window."""
    segs = launch._segments(q_segment_ids, k_segment_ids, key_padding_mask)
    out, lse2 = launch.attention_forward(
        q, k, v, dist_table, None if segs else key_padding_mask, seed, causal, q_offset, scale,
        dropout_p, window, segs=segs,
    )  # fmt: skip
    return out.transpose(1, 2), lse2


_fwd_op = torch.library.custom_op("fastseq::bucketed_attention_fwd", mutates_args=(), device_types=None)(_forward)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, dist_table, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window,
              q_segment_ids=None, k_segment_ids=None):  # fmt: skip
    B, H, Lq, D = q.shape
    return q.new_empty(B, Lq, H, D), q.new_empty(B, H, Lq, dtype=torch.float32)


def _backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_lse: torch.Tensor | None, dist_table: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
    seed: torch.Tensor | None, causal: bool, q_offset: int, scale: float, dropout_p: float, window: int,
    q_segment_ids: torch.Tensor | None = None, k_segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dq `(B, Lq, H, D)`, dk and dv `(B, Lk, H, D)`, and the `(H, 2C + 1)` gradient of dist_table
    (`(0, 0)` without one). `lse` is the forward's log2-domain one and `grad_lse` the gradient on it."""
    segs = launch._segments(q_segment_ids, k_segment_ids, key_padding_mask)
    dq, dk, dv, ddt, *_ = launch.attention_backward(
        do, q, k, v, out, lse, dist_table, None if segs else key_padding_mask, seed, causal,
        q_offset, scale, dropout_p, window, grad_lse, segs=segs,
    )  # fmt: skip
    if ddt is None:
        ddt = q.new_zeros(0, 0, dtype=torch.float32)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), ddt


_bwd_op = torch.library.custom_op("fastseq::bucketed_attention_bwd", mutates_args=(), device_types=None)(_backward)


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
    # The table's gradient is fp32 whatever the table's dtype, as `attention_backward` returns it.
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


class _EagerAttention(torch.autograd.Function):
    """The ops' forward and backward and their autograd, without the dispatcher: what eager mode runs
    (the ops are what `torch.compile` traces; a test holds the two bitwise equal). A custom op's
    dispatch, autograd wrapper and dynamo guard took most of a call's host time on the CPU
    (`bench/bench_bucketed_attention.py --host`). Tensors stay `(B, H, L, D)` throughout, the padding
    mask is converted once for every call that passes it (`launch.key_bias`), and a `PositionBias` gives
    the padded tables it keeps.

    Inputs: q, k, v, the `(H, 2C + 1)` distance table (None: no bias) whose gradient is returned, what
    the launchers read for it (that table or its `PositionBias`), the padding mask (`launch.key_bias`),
    segment ids (`launch.Segments`) or None, the seed (`draw_seed`, None without dropout), (causal,
    q_offset, scale, dropout_p, window) and `with_lse`. Returns the output and each row's log2-domain
    log-sum-exp, the one the backward reads, differentiable with `with_lse` (`launch.natural_lse`
    converts it)."""

    @staticmethod
    def forward(ctx, q, k, v, dist_table, launch_table, kpm, segs, seed, args, with_lse):
        kpm = launch.kept_mask(kpm, k.shape[2], q.device)
        out, lse = launch.attention_forward(q, k, v, launch_table, kpm, seed, *args, segs=segs)
        if not with_lse:
            ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.table, ctx.kpm, ctx.segs, ctx.seed, ctx.args, ctx.with_lse = launch_table, kpm, segs, seed, args, with_lse
        ctx.set_materialize_grads(False)  # no zeros for the log-sum-exp's gradient when it has none
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if not ctx.with_lse:
            grad_lse = None
        dq, dk, dv, ddt, *_ = launch.attention_backward(
            grad_out, q, k, v, out, lse, ctx.table, ctx.kpm, ctx.seed, *ctx.args, grad_lse, segs=ctx.segs
        )
        return dq, dk, dv, ddt, None, None, None, None, None, None


def _eager(q, k, v, bias, key_padding_mask, seed, causal, q_offset, scale, dropout_p, window, q_segment_ids,
           k_segment_ids, with_lse=True):  # fmt: skip
    """`_EagerAttention` on the ops' arguments (`bias`: the distance table, a `PositionBias` or None;
    `seed`: `draw_seed`'s or None) -> (out `(B, H, Lq, D)`, log2-domain lse `(B, H, Lq)`)."""
    segs = launch._segments(q_segment_ids, k_segment_ids, key_padding_mask)
    kpm = None if segs is not None else key_padding_mask  # the launchers convert it once (`launch.key_bias`)
    dist_table = bias.dist_table if isinstance(bias, launch.PositionBias) else bias
    args = (causal, q_offset, scale, dropout_p, window)
    return _EagerAttention.apply(q, k, v, dist_table, bias, kpm, segs, seed, args, with_lse)


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
    out, lse2 = _attention(q, k, v, dist_table, key_padding_mask, causal, q_offset, scale, dropout_p, window,
                           q_segment_ids, k_segment_ids, with_lse=True)  # fmt: skip
    return out, launch.natural_lse(lse2)


def _attention(q, k, v, bias, key_padding_mask, causal, q_offset, scale, dropout_p, window, q_segment_ids,
               k_segment_ids, *, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The eager path or, under torch.compile, the ops (on the distance table: an op takes tensors):
    out `(B, H, Lq, D)` and the log2-domain log-sum-exp."""
    seed = draw_seed(dropout_p, q.device)
    args = (causal, q_offset, float(scale), float(dropout_p), int(window), q_segment_ids, k_segment_ids)
    if not torch.compiler.is_compiling():
        return _eager(q, k, v, bias, key_padding_mask, seed, *args, with_lse=with_lse)
    dist_table = bias.dist_table if isinstance(bias, launch.PositionBias) else bias
    out, lse = torch.ops.fastseq.bucketed_attention_fwd(q, k, v, dist_table, key_padding_mask, seed, *args)
    return out.transpose(1, 2), lse  # (B, H, Lq, D), (B, H, Lq)


def unsupported_inputs(q: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None."""
    if reason := unsupported_dtypes(q):
        return reason
    if q.dtype == torch.float32 and q.is_cuda:
        # fp32 products on the CUDA cores held the kernels' registers past the limit: 65 of the 195 fp32
        # builds spilled, up to 6,880 bytes, at head dims 32 to 256 (TF32x3 dots still spilled at
        # D = 128, on 16 x 32 tiles too; the static report).
        return "float32 on a GPU (bf16 and fp16 run the kernels; float32 runs PyTorch's attention in fp32)"
    if q.shape[-1] > _MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (the kernel takes up to {_MAX_HEAD_DIM})"
    return None


def bucketed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias_table: torch.Tensor | launch.PositionBias | None = None,
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

    A model whose layers share one table passes `PositionBias(bias_table, bidirectional=...,
    max_distance=...)`, made once per forward, in place of the table: its layers then share the
    table's preparation (and its bucket and distance settings, which must match `bidirectional` and
    `max_distance`).

    The Triton path is deterministic: the same inputs (and seed, with dropout) give bitwise the
    same outputs and gradients, with no atomics in forward or backward.
    """
    _check_inputs(q, k, v, bias_table, key_padding_mask, q_segment_ids, k_segment_ids)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"bucketed_attention: dropout_p must be in [0, 1); got {dropout_p}")
    if q_offset < 0:
        raise ValueError(f"bucketed_attention: q_offset must be >= 0; got {q_offset}")
    prepared = isinstance(bias_table, launch.PositionBias)
    if prepared:
        bias_table.check("bucketed_attention", bidirectional, max_distance)
    if dtype := autocast_dtype(q, k, v):
        with autocast_off(q):
            return bucketed_attention(
                *autocast_cast(dtype, q, k, v), bias_table, bidirectional=bidirectional, max_distance=max_distance,
                causal=causal, key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale, dropout_p=dropout_p,
                q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
            )  # fmt: skip
    unsupported = functools.partial(unsupported_inputs, q)
    if use_triton("bucketed_attention", HAS_TRITON_KERNEL, q, k, v, unsupported=unsupported):
        bias = bias_table
        if bias_table is not None and not prepared:
            bias = launch.distance_table(bias_table, bidirectional=bidirectional, max_distance=max_distance)
        out, _ = _attention(q, k, v, bias, key_padding_mask, causal, q_offset, scale, dropout_p, -1, q_segment_ids,
                            k_segment_ids, with_lse=False)  # fmt: skip
        return out
    return bucketed_attention_reference(
        q, k, v, launch.bucket_table(bias_table), bidirectional=bidirectional, max_distance=max_distance, causal=causal,
        key_padding_mask=key_padding_mask, q_offset=q_offset, scale=scale, dropout_p=dropout_p,
        q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids,
    )  # fmt: skip


# Feature sets of the compile-only builds. The heaviest that a launcher can pick: T5's decoder
# self-attention in training, padded or packed (a padding mask given with segment ids is folded into
