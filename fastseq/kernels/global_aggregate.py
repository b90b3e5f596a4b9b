"""Transient-global aggregation for LongT5: the block sums that become global tokens.

Block-id rules (those of the reference LongT5 implementation):
- token i of a row belongs to block `i // block_size`; padding belongs to none (-1);
- a block counts as full when its last position holds a real token; tokens after
  the last full block (a trailing partial block, or one whose last position is
  padding) join the last full block; with no full block at all, no token has a block;
- there are `L // block_size` global tokens; global g exists for a row when
  g <= the largest block id of that row. Aggregates of blocks that hold only
  padding are zero.

So a row is described by one number, its cap (the last full block, -1 for none): token i
sits at position `min(i // block_size, cap)`, and the real tokens at position g are summed
into global g. The Triton kernels work from the caps: the forward gives each (row, global)
pair one program that sums its block's positions (the last one runs to the end of the row,
collecting the trailing tokens); the backward gives each token the gradient of its global.
No atomics, no `(B, L, G)` one-hot: deterministic and O(L * d_model).

The global RMSNorm that follows is not fused in: the aggregate is `block_size` times smaller
than its input, so a separate normalisation costs one pass over 1/16 of the hidden states
(block size 16), while fusing it would need each program to hold a whole d_model row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import (
    autocast_cast,
    autocast_dtype,
    autocast_off,
    cdiv,
    interpreting,
    key_mask,
    last_dim_contiguous,
    unsupported_dtypes,
    use_triton,
)
from ._launch import launch_kernel

HAS_TRITON_KERNEL = True


def global_block_ids(key_padding_mask: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block id of every token and which global tokens exist.

    key_padding_mask `(B, L)`, nonzero = real token. Returns block_ids `(B, L)` int64
    (-1 for tokens in no block) and global_valid `(B, L // block_size)` bool.
    """
    if block_size < 1:
        raise ValueError(f"global_block_size must be >= 1; got {block_size}")
    B, L = key_padding_mask.shape
    valid = key_padding_mask != 0
    caps = global_caps(key_padding_mask, B, L, block_size, key_padding_mask.device).long()  # (B,)
    block_ids = torch.where(valid, global_positions(key_padding_mask, block_size), -1)  # (B, L)
    global_valid = torch.arange(L // block_size, device=key_padding_mask.device)[None, :] <= caps[:, None]  # (B, G)
    return block_ids, global_valid


def global_caps(
    key_padding_mask: torch.Tensor | None, B: int, L: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """`(B,)` int32: each row's last full block (its last global token), -1 where it has none."""
    if block_size < 1:
        raise ValueError(f"global_block_size must be >= 1; got {block_size}")
    if key_padding_mask is None:
        return torch.full((B,), L // block_size - 1, dtype=torch.int32, device=device)
    block_ends = (key_padding_mask[:, block_size - 1 :: block_size] != 0).sum(-1)  # (B,)
    return (block_ends - 1).to(torch.int32)


def global_positions(key_padding_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """`(B, L)` int64: `min(i // block_size, cap)`, the block id of every real token (and the
    position a padded token would have)."""
    B, L = key_padding_mask.shape
    caps = global_caps(key_padding_mask, B, L, block_size, key_padding_mask.device).long()
    pos = torch.arange(L, device=key_padding_mask.device) // block_size
    return torch.minimum(pos[None, :], caps[:, None])


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


# The sequence length, and with it the padding mask's row stride, changes with the batch: Triton does
# not specialize on them (a multiple of 16 would otherwise compile another kernel for such batches).
_PLAIN = ("L", "stride_kpmb")


@triton.jit(do_not_specialize=_PLAIN)
def _global_aggregate_fwd_kernel(
    X,  # (B, L, d) hidden states
    KPM,  # (B, L) int8, nonzero = real token
    CAP,  # (B,) int32
    Out,  # (B, G, d)
    stride_xb,
    stride_xl,
    stride_kpmb,
    stride_ob,
    stride_og,
    L,
    d,
    gbs,
    HAS_KPM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    cap = tl.load(CAP + b)
    start = g * gbs
    end = tl.minimum(start + gbs, L)
    if g == cap:
        end = L  # the tokens after the last full block join it
    if g > cap:
        end = start  # no such global token in this row: zeros
    acc = tl.zeros((BLOCK_D,), tl.float32)
    X_b = X + b.to(tl.int64) * stride_xb
    for i0 in range(start, end, BLOCK_L):
        rows = i0 + tl.arange(0, BLOCK_L)
        ok = rows < end
        if HAS_KPM:
            ok = ok & (tl.load(KPM + b * stride_kpmb + rows, mask=ok, other=0) != 0)
        x = tl.load(X_b + rows[:, None].to(tl.int64) * stride_xl + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0)  # fmt: skip
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(Out + b * stride_ob + g * stride_og + cols, acc.to(Out.dtype.element_ty), mask=col_ok)


@triton.jit(do_not_specialize=_PLAIN)
def _global_aggregate_bwd_kernel(
    DO,  # (B, G, d)
    KPM,
    CAP,
    DX,  # (B, L, d)
    stride_dob,
    stride_dog,
    stride_kpmb,
    stride_dxb,
    stride_dxl,
    L,
    d,
    gbs,
    HAS_KPM: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < L
    col_ok = cols < d
    cap = tl.load(CAP + b)
    pos = tl.minimum(rows // gbs, cap)
    real = row_ok & (pos >= 0)
    if HAS_KPM:
        real = real & (tl.load(KPM + b * stride_kpmb + rows, mask=row_ok, other=0) != 0)
    grad = tl.load(DO + b * stride_dob + tl.maximum(pos, 0)[:, None] * stride_dog + cols[None, :],
                   mask=real[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
    tl.store(DX + b.to(tl.int64) * stride_dxb + rows[:, None].to(tl.int64) * stride_dxl + cols[None, :], grad,
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


# Rows per step and columns per program. Both kernels are memory-bound streams; under the
# interpreter small tiles so that tests cross tile borders.
_CONFIG = (16, 128, 4)  # BLOCK_L, BLOCK_D, num_warps
_INTERPRET_CONFIG = (4, 16, 1)


def _config() -> tuple[int, int, int]:
    return _INTERPRET_CONFIG if interpreting() else _CONFIG


@torch.library.custom_op("fastseq::global_aggregate_fwd", mutates_args=(), device_types=None)
def _fwd_op(
    hidden: torch.Tensor, key_padding_mask: torch.Tensor | None, caps: torch.Tensor, block_size: int
) -> torch.Tensor:
    """`(B, L // block_size, d)` block sums (fp32 accumulation) in hidden's dtype."""
    hidden = last_dim_contiguous(hidden)
    B, L, d = hidden.shape
    G = L // block_size
    out = hidden.new_empty(B, G, d)
    if G == 0 or d == 0:
        return out
    block_l, block_d, warps = _config()
    kpm = key_mask(key_padding_mask, hidden.device)
    launch_kernel(_global_aggregate_fwd_kernel, (G, cdiv(d, block_d), B), (
        hidden, kpm, caps, out, hidden.stride(0), hidden.stride(1), kpm.stride(0), out.stride(0), out.stride(1),
        L, d, block_size,
    ), dict(HAS_KPM=key_padding_mask is not None, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps))  # fmt: skip
    return out


@_fwd_op.register_fake
def _fwd_fake(hidden, key_padding_mask, caps, block_size):
    B, L, d = hidden.shape
    return hidden.new_empty(B, L // block_size, d)


@torch.library.custom_op("fastseq::global_aggregate_bwd", mutates_args=(), device_types=None)
def _bwd_op(
    grad: torch.Tensor, key_padding_mask: torch.Tensor | None, caps: torch.Tensor, length: int, block_size: int
) -> torch.Tensor:
    """`(B, length, d)`: each real token gets the gradient of its global token."""
    grad = last_dim_contiguous(grad)
    B, G, d = grad.shape
    dx = grad.new_empty(B, length, d)
    if length == 0 or d == 0:
        return dx
    if G == 0:
        return dx.zero_()
    block_l, block_d, warps = _config()
    kpm = key_mask(key_padding_mask, grad.device)
    launch_kernel(_global_aggregate_bwd_kernel, (cdiv(length, block_l), cdiv(d, block_d), B), (
        grad, kpm, caps, dx, grad.stride(0), grad.stride(1), kpm.stride(0), dx.stride(0), dx.stride(1),
        length, d, block_size,
    ), dict(HAS_KPM=key_padding_mask is not None, BLOCK_L=block_l, BLOCK_D=block_d, num_warps=warps))  # fmt: skip
    return dx


@_bwd_op.register_fake
def _bwd_fake(grad, key_padding_mask, caps, length, block_size):
    B, _, d = grad.shape
    return grad.new_empty(B, length, d)


def _setup_context(ctx, inputs, output):
    hidden, key_padding_mask, caps, block_size = inputs
    ctx.save_for_backward(key_padding_mask, caps)
    ctx.length, ctx.block_size = hidden.shape[1], block_size


def _backward_op(ctx, grad):
    key_padding_mask, caps = ctx.saved_tensors
    dx = torch.ops.fastseq.global_aggregate_bwd(grad, key_padding_mask, caps, ctx.length, ctx.block_size)
    return dx, None, None, None


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Reference and dispatch
# --------------------------------------------------------------------------------------------


def global_aggregate_reference(
    hidden: torch.Tensor, key_padding_mask: torch.Tensor | None, block_size: int = 16
) -> torch.Tensor:
    """Block sums in fp32. hidden `(B, L, d_model)` -> `(B, L // block_size, d_model)` in hidden's dtype."""
    B, L, d = hidden.shape
    if key_padding_mask is None:
        key_padding_mask = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
    block_ids, _ = global_block_ids(key_padding_mask, block_size)
    num_globals = L // block_size
    # Tokens in no block go to an extra slot that is dropped.
    slot = torch.where(block_ids < 0, num_globals, block_ids)  # (B, L)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    sums = hidden.new_zeros(B, num_globals + 1, d, dtype=acc)
    sums = sums.scatter_add(1, slot[:, :, None].expand(B, L, d), hidden.to(acc))
    return sums[:, :num_globals].to(hidden.dtype)


def global_aggregate(hidden: torch.Tensor, key_padding_mask: torch.Tensor | None, block_size: int = 16) -> torch.Tensor:
    """LongT5 global tokens before their RMSNorm. hidden `(B, L, d_model)`, key_padding_mask `(B, L)`
    or None -> `(B, L // block_size, d_model)`. Under autocast hidden is cast to autocast's dtype
    first: `transformers` sums the blocks with an einsum, which autocast runs in that dtype."""
    if hidden.dim() != 3:
        raise ValueError(f"global_aggregate expects hidden of shape (B, L, d_model); got {tuple(hidden.shape)}")
    if key_padding_mask is not None and key_padding_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"global_aggregate: key_padding_mask must be {tuple(hidden.shape[:2])}; got {tuple(key_padding_mask.shape)}"
        )
    if block_size < 1:
        raise ValueError(f"global_block_size must be >= 1; got {block_size}")
    if dtype := autocast_dtype(hidden):
        with autocast_off(hidden):
            return global_aggregate(autocast_cast(dtype, hidden)[0], key_padding_mask, block_size)
    if use_triton("global_aggregate", HAS_TRITON_KERNEL, hidden, unsupported=lambda: unsupported_dtypes(hidden)):
        B, L, _ = hidden.shape
        caps = global_caps(key_padding_mask, B, L, block_size, hidden.device)
        return torch.ops.fastseq.global_aggregate_fwd(hidden, key_padding_mask, caps, int(block_size))
    return global_aggregate_reference(hidden, key_padding_mask, block_size)


def compile_specs() -> list:
    """The one configuration of each kernel, for bf16 and fp32, for the compile-only tests."""
    from ._compile import CompileSpec, signature

    block_l, block_d, warps = _CONFIG
    specs = []
    for arch in (80, 86, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            for kernel, pointers in (
                (_global_aggregate_fwd_kernel, dict(X=f"*{dtype}", Out=f"*{dtype}")),
                (_global_aggregate_bwd_kernel, dict(DO=f"*{dtype}", DX=f"*{dtype}")),
            ):
                pointers = dict(pointers, KPM="*i8", CAP="*i32")
                constexprs = dict(HAS_KPM=True, BLOCK_L=block_l, BLOCK_D=block_d)
                sig = signature(kernel, pointers, (), constexprs)
                name = f"{kernel.__name__}-sm{arch}-{dtype}"
                specs.append(CompileSpec(name, kernel.__name__, sig, constexprs, dict(num_warps=warps), arch))
    return specs
