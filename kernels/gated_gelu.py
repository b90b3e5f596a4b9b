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

from ._backend import unsupported_dtypes, upcast, use_triton

HAS_TRITON_KERNEL = True
_BLOCK = 1024
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _gelu_tanh(g):
    """gelu_tanh(g) and its tanh term, fp32. tanh(z) = 1 - 2 / (exp(2z) + 1), with z clamped to
    [-15, 15] (tanh is +-1 in fp32 there) so that exp never overflows."""
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    inner = tl.minimum(tl.maximum(inner, -15.0), 15.0)
    t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
    return 0.5 * g * (1.0 + t), t


@triton.jit
def _gated_gelu_fwd_kernel(
    # pointers
    G,  # gate, n elements
    U,  # up, n elements
    H,  # out, n elements
    # sizes and scalars
    n,
    seed,
    dropout_p,
    # meta-parameters
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    gelu, _ = _gelu_tanh(g)
    h = gelu * u
    if DROPOUT:
        # Philox keyed by the call's seed, the element's 64-bit index as counter.
        h = tl.where(tl.rand(seed, offs) >= dropout_p, h / (1.0 - dropout_p), 0.0)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _gated_gelu_bwd_kernel(
    # pointers
    DH,  # gradient of the output, n elements
    G,
    U,
    DG,
    DU,
    H,  # the recomputed output (written only with RECOMPUTE)
    # sizes and scalars
    n,
    seed,
    dropout_p,
    # meta-parameters
    DROPOUT: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    gelu, t = _gelu_tanh(g)
    if DROPOUT:
        keep = tl.rand(seed, offs) >= dropout_p
        dh = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    tl.store(DG + offs, (dh * u * dgelu).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * gelu).to(DU.dtype.element_ty), mask=mask)
    if RECOMPUTE:
        h = gelu * u
        if DROPOUT:
            h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _relu_dropout_fwd_kernel(
    A,  # pre-activation, n elements
    H,  # out, n elements
    n,
    seed,
    dropout_p,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    h = tl.maximum(tl.load(A + offs, mask=mask, other=0.0).to(tl.float32), 0.0)
    if DROPOUT:
        h = tl.where(tl.rand(seed, offs) >= dropout_p, h / (1.0 - dropout_p), 0.0)
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _relu_dropout_bwd_kernel(
    DH,  # gradient of the output, n elements
    A,
    DA,
    H,  # the recomputed output (written only with RECOMPUTE)
    n,
    seed,
    dropout_p,
    DROPOUT: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.maximum(a, 0.0)
    if DROPOUT:
        keep = tl.rand(seed, offs) >= dropout_p
        dh = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
    tl.store(DA + offs, tl.where(a > 0.0, dh, 0.0).to(DA.dtype.element_ty), mask=mask)
    if RECOMPUTE:
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)


def _forward(gate: torch.Tensor, up: torch.Tensor, seed: int, dropout_p: float) -> torch.Tensor:
    g, u = _flat(gate), _flat(up)
    h = torch.empty_like(g)
    if g.numel():
        _gated_gelu_fwd_kernel[(triton.cdiv(g.numel(), _BLOCK),)](
            g, u, h, g.numel(), seed, dropout_p, DROPOUT=dropout_p > 0.0, BLOCK=_BLOCK, num_warps=4
        )
    return h.view(gate.shape)


def _backward(dh, gate, up, seed, dropout_p, recompute: bool):
    """dgate, dup, and (with `recompute`) the forward's output again."""
    g, u, d = _flat(gate), _flat(up), _flat(dh)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    h = torch.empty_like(g) if recompute else dg
    if g.numel():
        _gated_gelu_bwd_kernel[(triton.cdiv(g.numel(), _BLOCK),)](
            d, g, u, dg, du, h, g.numel(), seed, dropout_p,
            DROPOUT=dropout_p > 0.0, RECOMPUTE=recompute, BLOCK=_BLOCK, num_warps=4,
        )  # fmt: skip
    shape = gate.shape
    return dg.view(shape), du.view(shape), (h.view(shape) if recompute else None)


def _relu_forward(a: torch.Tensor, seed: int, dropout_p: float) -> torch.Tensor:
    flat = _flat(a)
    h = torch.empty_like(flat)
    if flat.numel():
        _relu_dropout_fwd_kernel[(triton.cdiv(flat.numel(), _BLOCK),)](
            flat, h, flat.numel(), seed, dropout_p, DROPOUT=dropout_p > 0.0, BLOCK=_BLOCK, num_warps=4
        )
    return h.view(a.shape)


def _relu_backward(dh, a, seed, dropout_p, recompute: bool):
    """da, and (with `recompute`) the forward's output again."""
    flat, d = _flat(a), _flat(dh)
    da = torch.empty_like(flat)
    h = torch.empty_like(flat) if recompute else da
    if flat.numel():
        _relu_dropout_bwd_kernel[(triton.cdiv(flat.numel(), _BLOCK),)](
            d, flat, da, h, flat.numel(), seed, dropout_p,
            DROPOUT=dropout_p > 0.0, RECOMPUTE=recompute, BLOCK=_BLOCK, num_warps=4,
        )  # fmt: skip
    return da.view(a.shape), (h.view(a.shape) if recompute else None)


def gated_gelu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fp32 math. gate/up `(..., d_ff)` -> `(..., d_ff)` in gate's dtype."""
    return (F.gelu(upcast(gate), approximate="tanh") * upcast(up)).to(gate.dtype)


def _seed_value(seed: torch.Tensor | None) -> int:
    return int(seed.item()) if seed is not None else 0


@torch.library.custom_op("fastseq::gated_gelu_fwd", mutates_args=())
def _fwd_op(gate: torch.Tensor, up: torch.Tensor, seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """dropout(gelu_tanh(gate) * up); `seed` a 1-element int64 CPU tensor (None without dropout)."""
    return _forward(gate, up, _seed_value(seed), dropout_p)


@_fwd_op.register_fake
def _fwd_fake(gate, up, seed, dropout_p):
    return torch.empty_like(gate)


@torch.library.custom_op("fastseq::gated_gelu_bwd", mutates_args=())
def _bwd_op(
    dh: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    seed: torch.Tensor | None,
    dropout_p: float,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dgate, dup, and the forward's output recomputed (`(0,)` unless `recompute`)."""
    dg, du, h = _backward(dh, gate, up, _seed_value(seed), dropout_p, recompute)
    return dg, du, h if h is not None else gate.new_empty(0)


@_bwd_op.register_fake
def _bwd_fake(dh, gate, up, seed, dropout_p, recompute):
    return torch.empty_like(gate), torch.empty_like(up), torch.empty_like(gate) if recompute else gate.new_empty(0)


def _setup_context(ctx, inputs, output):
    gate, up, seed, dropout_p = inputs
    ctx.save_for_backward(gate, up, seed)
    ctx.dropout_p = dropout_p


def _backward_op(ctx, dh):
    gate, up, seed = ctx.saved_tensors
    dg, du, _ = torch.ops.fastseq.gated_gelu_bwd(dh, gate, up, seed, ctx.dropout_p, False)
    return dg, du, None, None


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
        return torch.ops.fastseq.gated_gelu_fwd(gate, up, None, 0.0)
    return gated_gelu_reference(gate, up)


class _GatedFFN(torch.autograd.Function):
    """Saves x, gate and up; recomputes h = dropout(gelu(gate) * up) in the backward kernel."""

    @staticmethod
    def forward(ctx, x, wi_0, wi_1, wo, dropout_p, seed):
        gate = x @ wi_0.t()  # (tokens, d_ff)
        up = x @ wi_1.t()  # (tokens, d_ff)
        h = torch.ops.fastseq.gated_gelu_fwd(gate, up, seed, dropout_p)  # (tokens, d_ff), not saved
        ctx.save_for_backward(x, wi_0, wi_1, wo, gate, up, seed)
        ctx.dropout_p = dropout_p
        return h.to(wo.dtype) @ wo.t()  # (tokens, d_model)

    @staticmethod
    def backward(ctx, dy):
        x, wi_0, wi_1, wo, gate, up, seed = ctx.saved_tensors
        dh = (dy @ wo).to(gate.dtype)  # (tokens, d_ff)
        recompute = ctx.needs_input_grad[3]
        dgate, dup, h = torch.ops.fastseq.gated_gelu_bwd(dh, gate, up, seed, ctx.dropout_p, recompute)
        dwo = dy.t() @ h.to(dy.dtype) if ctx.needs_input_grad[3] else None
        dx = (dgate @ wi_0 + dup @ wi_1) if ctx.needs_input_grad[0] else None
        dwi_0 = dgate.t() @ x if ctx.needs_input_grad[1] else None
        dwi_1 = dup.t() @ x if ctx.needs_input_grad[2] else None
        return dx, dwi_0, dwi_1, dwo, None, None


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
    `(d_ff, d_model)`, wo `(d_model, d_ff)` -> `(..., d_model)`; `dropout_p` applies in training."""
    d_ff, d_model = wi_0.shape
    if wi_1.shape != wi_0.shape or tuple(wo.shape) != (d_model, d_ff) or x.shape[-1] != d_model:
        raise ValueError(
            f"gated_ffn: need x (..., d_model), wi_0 and wi_1 (d_ff, d_model), wo (d_model, d_ff); got x "
            f"{tuple(x.shape)}, wi_0 {tuple(wi_0.shape)}, wi_1 {tuple(wi_1.shape)}, wo {tuple(wo.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"gated_ffn: dropout_p must be in [0, 1); got {dropout_p}")
    if _triton("gated_gelu", x, wi_0, wi_1, wo) and x.dtype == wi_0.dtype == wi_1.dtype:
        # Drawn from PyTorch's CPU generator, so torch.manual_seed fixes the dropout mask.
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
        x2 = x.reshape(-1, d_model)
        return _GatedFFN.apply(x2, wi_0, wi_1, wo, dropout_p, seed).view(*x.shape[:-1], wo.shape[0])
    return gated_ffn_reference(x, wi_0, wi_1, wo, dropout_p)


@torch.library.custom_op("fastseq::relu_dropout_fwd", mutates_args=())
def _relu_fwd_op(a: torch.Tensor, seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """dropout(relu(a)); `seed` a 1-element int64 CPU tensor (None without dropout)."""
    return _relu_forward(a, _seed_value(seed), dropout_p)


@_relu_fwd_op.register_fake
def _relu_fwd_fake(a, seed, dropout_p):
    return torch.empty_like(a)


@torch.library.custom_op("fastseq::relu_dropout_bwd", mutates_args=())
def _relu_bwd_op(
    dh: torch.Tensor, a: torch.Tensor, seed: torch.Tensor | None, dropout_p: float, recompute: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """da, and the forward's output recomputed (`(0,)` unless `recompute`)."""
    da, h = _relu_backward(dh, a, _seed_value(seed), dropout_p, recompute)
    return da, h if h is not None else a.new_empty(0)


@_relu_bwd_op.register_fake
def _relu_bwd_fake(dh, a, seed, dropout_p, recompute):
    return torch.empty_like(a), torch.empty_like(a) if recompute else a.new_empty(0)


class _ReluFFN(torch.autograd.Function):
    """Saves x and the pre-activation a; recomputes h = dropout(relu(a)) in the backward kernel."""

    @staticmethod
    def forward(ctx, x, wi, wo, dropout_p, seed):
        a = x @ wi.t()  # (tokens, d_ff)
        h = torch.ops.fastseq.relu_dropout_fwd(a, seed, dropout_p)  # (tokens, d_ff), not saved
        ctx.save_for_backward(x, wi, wo, a, seed)
        ctx.dropout_p = dropout_p
        return h.to(wo.dtype) @ wo.t()  # (tokens, d_model)

    @staticmethod
    def backward(ctx, dy):
        x, wi, wo, a, seed = ctx.saved_tensors
        dh = (dy @ wo).to(a.dtype)  # (tokens, d_ff)
        recompute = ctx.needs_input_grad[2]
        da, h = torch.ops.fastseq.relu_dropout_bwd(dh, a, seed, ctx.dropout_p, recompute)
        dwo = dy.t() @ h.to(dy.dtype) if recompute else None
        dx = da @ wi if ctx.needs_input_grad[0] else None
        dwi = da.t() @ x if ctx.needs_input_grad[1] else None
        return dx, dwi, dwo, None, None


def relu_ffn_reference(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """T5 v1.0's feed-forward with autograd of the plain composition (as `transformers`)."""
    h = torch.relu(x @ wi.t())
    if dropout_p > 0.0:
        h = F.dropout(h, p=dropout_p, training=True)
    return h.to(wo.dtype) @ wo.t()


def relu_ffn(x: torch.Tensor, wi: torch.Tensor, wo: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """`wo(dropout(relu(x @ wi.T)))`, T5 v1.0's FFN. x `(..., d_model)`, wi `(d_ff, d_model)`, wo
    `(d_model, d_ff)` -> `(..., d_model)`. Backward keeps x and the pre-activation, not the
    activation, its dropout mask and its copy for `wo`."""
    d_ff, d_model = wi.shape
    if tuple(wo.shape) != (d_model, d_ff) or x.shape[-1] != d_model:
        raise ValueError(
            f"relu_ffn: need x (..., d_model), wi (d_ff, d_model), wo (d_model, d_ff); got x {tuple(x.shape)}, "
            f"wi {tuple(wi.shape)}, wo {tuple(wo.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"relu_ffn: dropout_p must be in [0, 1); got {dropout_p}")
    if _triton("gated_gelu", x, wi, wo) and x.dtype == wi.dtype:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else None
        out = _ReluFFN.apply(x.reshape(-1, d_model), wi, wo, dropout_p, seed)
        return out.view(*x.shape[:-1], wo.shape[0])
    return relu_ffn_reference(x, wi, wo, dropout_p)


def compile_specs() -> list:
    """Every configuration the launchers can pick on a GPU, for the compile-only tests (`_compile`)."""
    from ._compile import CompileSpec, signature

    specs = []
    for capability in (80, 86, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            for dropout in (False, True):
                tag = f"sm{capability}-{dtype}-dropout{int(dropout)}"
                options = dict(num_warps=4)
                ce = dict(DROPOUT=dropout, BLOCK=_BLOCK)
                k = _gated_gelu_fwd_kernel
                sig = signature(k, {p: f"*{dtype}" for p in ("G", "U", "H")}, ("dropout_p",), ce)
                specs.append(CompileSpec(f"fwd-{tag}", k.__name__, sig, ce, options, capability))
                k = _relu_dropout_fwd_kernel
                sig = signature(k, {p: f"*{dtype}" for p in ("A", "H")}, ("dropout_p",), ce)
                specs.append(CompileSpec(f"relu-fwd-{tag}", k.__name__, sig, ce, options, capability))
                for recompute in (False, True):
                    ce = dict(DROPOUT=dropout, RECOMPUTE=recompute, BLOCK=_BLOCK)
                    k = _relu_dropout_bwd_kernel
                    sig = signature(k, {p: f"*{dtype}" for p in ("DH", "A", "DA", "H")}, ("dropout_p",), ce)
                    specs.append(CompileSpec(f"relu-bwd-{tag}-recompute{int(recompute)}", k.__name__, sig, ce,
                                             options, capability))  # fmt: skip
                    k = _gated_gelu_bwd_kernel
                    sig = signature(k, {p: f"*{dtype}" for p in ("DH", "G", "U", "DG", "DU", "H")}, ("dropout_p",), ce)
                    specs.append(CompileSpec(f"bwd-{tag}-recompute{int(recompute)}", k.__name__, sig, ce, options,
                                             capability))  # fmt: skip
    return specs
