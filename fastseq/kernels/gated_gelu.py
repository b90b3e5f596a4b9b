"""Gated GELU of T5 v1.1 (`gelu_tanh(gate) * up`, Hugging Face's `gelu_new`) and the FFNs built on it.

`gated_gelu` is the elementwise op. `gated_ffn` is the whole T5 v1.1 feed-forward,
`wo(dropout(gelu_tanh(x @ wi_0.T) * (x @ wi_1.T)))`, with a backward that keeps only x and the two
projections (gate, up): the activation h that `wo`'s weight gradient needs is recomputed from them
by the backward kernel (one elementwise pass), and dropout's mask is regenerated from its seed.
Autograd of the plain composition keeps gate, up, gelu(gate), the dropout mask and h: fastseq keeps
two `(tokens, d_ff)` tensors where it keeps four and a mask. `relu_ffn` does the same for T5 v1.0's
ReLU FFN (kept: the pre-activation; not kept: the activation, its mask, its copy for `wo`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import (
    autocast_cast,
    autocast_dtype,
    autocast_off,
    cdiv,
    draw_seed,
    seed_arg,
    unsupported_dtypes,
    upcast,
    use_triton,
)
from ._launch import launch_kernel

HAS_TRITON_KERNEL = True
_BLOCK = 1024
_SQRT_2_OVER_PI = 0.7978845608028654
# The element count, tokens x d_ff, stays specialized: a multiple of 16 wherever d_ff is (every T5, mT5,
# ByT5 and LongT5 size), so it compiles once. The dropout seed is a tensor the kernels read.


@triton.jit
def _gelu_tanh(g):
    """gelu_tanh(g) and its tanh term, fp32. tanh(z) = 1 - 2 / (exp(2z) + 1), with z clamped to
    [-15, 15] (tanh is +-1 in fp32 there) so that exp never overflows."""
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)
    t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    return 0.5 * g * (1.0 + t), t


@triton.jit
def _dropout(x, keep, dropout_p, DROPOUT: tl.constexpr):
    """x where kept, scaled by 1 / (1 - p); 0 where dropped."""
    if DROPOUT:
        x = tl.where(keep, x / (1.0 - dropout_p), 0.0)
    return x


@triton.jit
def _ffn_activation_fwd_kernel(
    # pointers
    G,  # gate (the ReLU FFN's pre-activation), n elements
    U,  # up, n elements (only with GATED)
    H,  # out, n elements
    SEED,  # (1,) int32: the call's dropout seed, read on the device (with DROPOUT; `_backend.draw_seed`)
    # sizes and scalars
    n,
    dropout_p,
    # meta-parameters
    GATED: tl.constexpr,  # gelu_tanh(gate) * up (T5 v1.1); else relu(gate) (T5 v1.0)
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        gelu, _ = _gelu_tanh(g)
        h = gelu * tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.maximum(g, 0.0)
    keep = tl.rand(tl.load(SEED), offs) >= dropout_p if DROPOUT else None  # Philox: the call's seed, 64-bit index
    h = _dropout(h, keep, dropout_p, DROPOUT)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _ffn_activation_bwd_kernel(
    # pointers
    DH,  # gradient of the output, n elements
    G,
    U,  # only with GATED
    DG,
    DU,  # only with GATED
    H,  # the recomputed output (written only with RECOMPUTE)
    SEED,
    # sizes and scalars
    n,
    dropout_p,
    # meta-parameters
    GATED: tl.constexpr,
    DROPOUT: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    keep = tl.rand(tl.load(SEED), offs) >= dropout_p if DROPOUT else None
    dh = _dropout(tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32), keep, dropout_p, DROPOUT)
    if GATED:
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        gelu, t = _gelu_tanh(g)
        dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        tl.store(DG + offs, (dh * u * dgelu).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dh * gelu).to(DU.dtype.element_ty), mask=mask)
        h = gelu * u
    else:
        tl.store(DG + offs, tl.where(g > 0.0, dh, 0.0).to(DG.dtype.element_ty), mask=mask)
        h = tl.maximum(g, 0.0)
    if RECOMPUTE:
        tl.store(H + offs, _dropout(h, keep, dropout_p, DROPOUT).to(H.dtype.element_ty), mask=mask)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def _forward(gate: torch.Tensor, up: torch.Tensor | None, seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """dropout(gelu_tanh(gate) * up), or dropout(relu(gate)) when `up` is None; `seed` from `draw_seed`."""
    g = _flat(gate)
    h = torch.empty_like(g)
    if g.numel():
        launch_kernel(_ffn_activation_fwd_kernel, (cdiv(g.numel(), _BLOCK),), (
            g, _flat(up) if up is not None else g, h, seed_arg(seed, dropout_p, g.device), g.numel(), dropout_p,
        ), dict(GATED=up is not None, DROPOUT=dropout_p > 0.0, BLOCK=_BLOCK, num_warps=4))  # fmt: skip
    return h.view(gate.shape)


def _backward(dh, gate, up, seed, dropout_p, recompute: bool):
    """dgate, dup (None without `up`), and (with `recompute`) the forward's output again."""
    g, d = _flat(gate), _flat(dh)
    u = _flat(up) if up is not None else g
    dg = torch.empty_like(g)
    du = torch.empty_like(u) if up is not None else dg
    h = torch.empty_like(g) if recompute else dg
    if g.numel():
        launch_kernel(_ffn_activation_bwd_kernel, (cdiv(g.numel(), _BLOCK),), (
            d, g, u, dg, du, h, seed_arg(seed, dropout_p, g.device), g.numel(), dropout_p,
        ), dict(GATED=up is not None, DROPOUT=dropout_p > 0.0, RECOMPUTE=recompute, BLOCK=_BLOCK,
                num_warps=4))  # fmt: skip
    shape = gate.shape
    return dg.view(shape), (du.view(shape) if up is not None else None), (h.view(shape) if recompute else None)


def gated_gelu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fp32 math. gate/up `(..., d_ff)` -> `(..., d_ff)` in gate's dtype."""
    return (F.gelu(upcast(gate), approximate="tanh") * upcast(up)).to(gate.dtype)


@torch.library.custom_op("fastseq::ffn_activation_fwd", mutates_args=())
def _fwd_op(gate: torch.Tensor, up: torch.Tensor | None, seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """dropout(gelu_tanh(gate) * up), or dropout(relu(gate)) without `up`; `seed` from `draw_seed`
    (None without dropout)."""
    return _forward(gate, up, seed, dropout_p)


@_fwd_op.register_fake
def _fwd_fake(gate, up, seed, dropout_p):
    return torch.empty_like(gate)


@torch.library.custom_op("fastseq::ffn_activation_bwd", mutates_args=())
def _bwd_op(
    dh: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor | None,
    seed: torch.Tensor | None,
    dropout_p: float,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dgate, dup (`(0,)` without `up`), and the forward's output recomputed (`(0,)` unless `recompute`)."""
    dg, du, h = _backward(dh, gate, up, seed, dropout_p, recompute)
    empty = gate.new_empty(0)
    return dg, du if du is not None else empty, h if h is not None else empty


@_bwd_op.register_fake
def _bwd_fake(dh, gate, up, seed, dropout_p, recompute):
    empty = gate.new_empty(0)
    return (
        torch.empty_like(gate),
        torch.empty_like(up) if up is not None else empty,
        (torch.empty_like(gate) if recompute else empty),
    )


def _setup_context(ctx, inputs, output):
    gate, up, seed, dropout_p = inputs
    ctx.save_for_backward(gate, up, seed)
    ctx.dropout_p = dropout_p


def _backward_op(ctx, dh):
    gate, up, seed = ctx.saved_tensors
    dg, du, _ = torch.ops.fastseq.ffn_activation_bwd(dh, gate, up, seed, ctx.dropout_p, False)
    return dg, (du if up is not None else None), None, None


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def _check(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"{op}: gate and up must have one dtype; got {gate.dtype} and {up.dtype}")


def _triton(op: str, *tensors: torch.Tensor) -> bool:
    """Whether `op` runs the kernel for these tensors (their dtypes are all it depends on)."""
    return use_triton(op, HAS_TRITON_KERNEL, *tensors, unsupported=lambda: unsupported_dtypes(*tensors))


def gated_gelu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate/up `(..., d_ff)`, same shape and dtype -> `(..., d_ff)`."""
    _check("gated_gelu", gate, up)
    if _triton("gated_gelu", gate, up):
        return torch.ops.fastseq.ffn_activation_fwd(gate, up, None, 0.0)
    return gated_gelu_reference(gate, up)


class _FFN(torch.autograd.Function):
    """`wo(dropout(act(x @ wi_0.T [, x @ wi_1.T])))`, gated GELU with wi_1, ReLU without. Saves x and
    the projections (gate, up); recomputes the activation h in the backward kernel."""

    @staticmethod
    def forward(ctx, x, wi_0, wi_1, wo, dropout_p, seed):
        gate = x @ wi_0.t()  # (tokens, d_ff)
        up = x @ wi_1.t() if wi_1 is not None else None  # (tokens, d_ff)
        h = torch.ops.fastseq.ffn_activation_fwd(gate, up, seed, dropout_p)  # (tokens, d_ff), not saved
        ctx.save_for_backward(x, wi_0, wi_1, wo, gate, up, seed)
        ctx.dropout_p = dropout_p
        return h.to(wo.dtype) @ wo.t()  # (tokens, d_model)

    @staticmethod
    def backward(ctx, dy):
        with autocast_off(dy):  # a backward run inside an autocast region computes what forward did
            return _FFN._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, wi_0, wi_1, wo, gate, up, seed = ctx.saved_tensors
        need_x, need_wi_0, need_wi_1, need_wo = ctx.needs_input_grad[:4]
        dh = (dy @ wo).to(gate.dtype)  # (tokens, d_ff)
        dgate, dup, h = torch.ops.fastseq.ffn_activation_bwd(dh, gate, up, seed, ctx.dropout_p, need_wo)
        dwo = dy.t() @ h.to(dy.dtype) if need_wo else None
        dx = None
        if need_x:
            dx = dgate @ wi_0 + dup @ wi_1 if wi_1 is not None else dgate @ wi_0
        dwi_0 = dgate.t() @ x if need_wi_0 else None
        dwi_1 = dup.t() @ x if wi_1 is not None and need_wi_1 else None
        return dx, dwi_0, dwi_1, dwo, None, None


def _fused_ffn(x, wi_0, wi_1, wo, dropout_p):
    seed = draw_seed(dropout_p, x.device)
    out = _FFN.apply(x.reshape(-1, x.shape[-1]), wi_0, wi_1, wo, dropout_p, seed)
    return out.view(*x.shape[:-1], wo.shape[0])


def gated_ffn_reference(
    x: torch.Tensor, wi_0: torch.Tensor, wi_1: torch.Tensor, wo: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """T5 v1.1's feed-forward with autograd of the plain composition (as `transformers`)."""
    h = gated_gelu_reference(x @ wi_0.t(), x @ wi_1.t())
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p, training=True)
    return h.to(wo.dtype) @ wo.t()


def gated_ffn(
    x: torch.Tensor, wi_0: torch.Tensor, wi_1: torch.Tensor, wo: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """`wo(dropout(gelu_tanh(x @ wi_0.T) * (x @ wi_1.T)))`. x `(..., d_model)`, wi_0/wi_1
    `(d_ff, d_model)`, wo `(d_model, d_ff)` -> `(..., d_model)`; `dropout_p` applies in training.
    Under autocast every input is cast to autocast's dtype first, as for `F.linear`."""
    d_ff, d_model = wi_0.shape
    if wi_1.shape != wi_0.shape or tuple(wo.shape) != (d_model, d_ff) or x.shape[-1] != d_model:
        raise ValueError(
            f"gated_ffn: need x (..., d_model), wi_0 and wi_1 (d_ff, d_model), wo (d_model, d_ff); got x "
            f"{tuple(x.shape)}, wi_0 {tuple(wi_0.shape)}, wi_1 {tuple(wi_1.shape)}, wo {tuple(wo.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"gated_ffn: dropout_p must be in [0, 1); got {dropout_p}")
    if dtype := autocast_dtype(x):
        with autocast_off(x):
            return gated_ffn(*autocast_cast(dtype, x, wi_0, wi_1, wo), dropout_p)
    if _triton("gated_gelu", x, wi_0, wi_1, wo) and x.dtype == wi_0.dtype == wi_1.dtype:
        return _fused_ffn(x, wi_0, wi_1, wo, dropout_p)
    return gated_ffn_reference(x, wi_0, wi_1, wo, dropout_p)


def relu_ffn_reference(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """T5 v1.0's feed-forward with autograd of the plain composition (as `transformers`)."""
    h = torch.relu(x @ wi.t())
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p, training=True)
    return h.to(wo.dtype) @ wo.t()


def relu_ffn(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """`wo(dropout(relu(x @ wi.T)))`, T5 v1.0's FFN. x `(..., d_model)`, wi `(d_ff, d_model)`, wo
    `(d_model, d_ff)` -> `(..., d_model)`. Backward keeps x and the pre-activation, not the
    activation, its dropout mask and its copy for `wo`. Under autocast as `gated_ffn`."""
    d_ff, d_model = wi.shape
    if tuple(wo.shape) != (d_model, d_ff) or x.shape[-1] != d_model:
        raise ValueError(
            f"relu_ffn: need x (..., d_model), wi (d_ff, d_model), wo (d_model, d_ff); got x {tuple(x.shape)}, "
            f"wi {tuple(wi.shape)}, wo {tuple(wo.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"relu_ffn: dropout_p must be in [0, 1); got {dropout_p}")
    if dtype := autocast_dtype(x):
        with autocast_off(x):
            return relu_ffn(*autocast_cast(dtype, x, wi, wo), dropout_p)
    if _triton("gated_gelu", x, wi, wo) and x.dtype == wi.dtype:
        return _fused_ffn(x, wi, None, wo, dropout_p)
    return relu_ffn_reference(x, wi, wo, dropout_p)


def compile_specs() -> list:
    """Every configuration the launchers can pick on a GPU, for the compile-only tests (`_compile`)."""
    from ._compile import CompileSpec, signature

    specs = []
    for capability in (80, 86, 90):
        for dtype, gated, dropout in ((d, g, p) for d in ("bf16", "fp16", "fp32") for g in (True, False)
                                      for p in (False, True)):  # fmt: skip
            tag = f"sm{capability}-{dtype}-{'gated' if gated else 'relu'}-dropout{int(dropout)}"
            options = dict(num_warps=4)
            ce = dict(GATED=gated, DROPOUT=dropout, BLOCK=_BLOCK)
            k = _ffn_activation_fwd_kernel
            sig = signature(k, {p: f"*{dtype}" for p in ("G", "U", "H")} | {"SEED": "*i32"}, ("dropout_p",), ce)
            specs.append(CompileSpec(f"fwd-{tag}", k.__name__, sig, ce, options, capability))
            for recompute in (False, True):
                ce = dict(GATED=gated, DROPOUT=dropout, RECOMPUTE=recompute, BLOCK=_BLOCK)
                k = _ffn_activation_bwd_kernel
                pointers = {p: f"*{dtype}" for p in ("DH", "G", "U", "DG", "DU", "H")} | {"SEED": "*i32"}
                sig = signature(k, pointers, ("dropout_p",), ce)
                specs.append(CompileSpec(f"bwd-{tag}-recompute{int(recompute)}", k.__name__, sig, ce, options,
                                         capability))  # fmt: skip
    return specs
