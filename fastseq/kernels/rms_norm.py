"""T5LayerNorm: RMS normalisation without mean subtraction or bias.

The kernels keep T5's casting rules exactly: the variance is taken in fp32, the normalised value
`x * rsqrt(variance + eps)` is fp32 (x is promoted), it is rounded to the weight's dtype when that
is half precision, and the product with the weight follows PyTorch's type promotion (fp32 weight
times fp32 value: fp32 output even for bf16 x, as in `transformers`).

Backward saves x and one fp32 `rstd` per row (not the normalised value, which is one multiply
away) and reduces the weight gradient in fp32: each program sums its rows into its own partial
row, and the partials are summed on the host. No atomics: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import cdiv, last_dim_contiguous, next_power_of_2, unsupported_dtypes, upcast, use_triton
from ._launch import launch_kernel

HAS_TRITON_KERNEL = True
_HALF = (torch.float16, torch.bfloat16)
_MAX_WIDTH = 65536  # one row per program, held in registers


@triton.jit
def _rms_norm_fwd_kernel(
    # pointers
    X,  # (N, D)
    W,  # (D,)
    Y,  # (N, D)
    RSTD,  # (N,) fp32
    # strides (the last dim is contiguous)
    stride_x,
    stride_y,
    # sizes and scalars
    D,
    eps,
    # meta-parameters
    W_HALF: tl.constexpr,  # round the normalised value to the weight's dtype first, as T5 does
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
    normed = x * rstd
    if W_HALF:
        normed = normed.to(W.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


# The row count and the rows each program takes change with the batch: Triton does not specialize on
# them (a value of 1 or a multiple of 16 would otherwise compile another kernel for such batches).
@triton.jit(do_not_specialize=("N", "rows_per_program"))
def _rms_norm_bwd_kernel(
    # pointers
    DY,  # (N, D)
    X,  # (N, D)
    W,  # (D,)
    RSTD,  # (N,) fp32
    DX,  # (N, D)
    DW,  # (num_programs, D) fp32 partial weight gradients
    # strides (the last dim is contiguous)
    stride_dy,
    stride_x,
    stride_dx,
    # sizes
    N,
    D,
    rows_per_program,
    # meta-parameters
    W_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DX_PASS: tl.constexpr,  # compute dX
    DW_PASS: tl.constexpr,  # accumulate this program's dW
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if DX_PASS:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if DW_PASS:
        dw = tl.zeros((BLOCK_D,), tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    count = tl.minimum(first + rows_per_program, N) - first
    for i in range(0, count):
        row = first + i
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = x * rstd
        if DW_PASS:
            if W_HALF:
                dw += dy * normed.to(W.dtype.element_ty).to(tl.float32)
            else:
                dw += dy * normed
        if DX_PASS:
            dnormed = dy * w
            # d/dx of x * rsqrt(mean(x^2) + eps): rstd * (dn - normed * mean(dn * normed))
            dx = rstd * (dnormed - normed * (tl.sum(dnormed * normed, 0) / D))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    if DW_PASS:
        tl.store(DW + pid * D + cols, dw, mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as `(N, D)` with a contiguous last dim (a view when the layout allows)."""
    return last_dim_contiguous(x.reshape(-1, x.shape[-1]))


def _warps(block_d: int) -> int:
    """Warps per row: 16 elements a thread up to 4096, then 32 warps (8 or 16 elements): at 8192 with
    8 or 16 warps the backward held 250-255 registers or spilled (the static report)."""
    return 4 if block_d <= 2048 else 8 if block_d <= 4096 else 32


# Up to this width one backward pass computes dX and accumulates dW; a wider row takes two passes
# over the rows (dX, then dW), so that no thread holds the weight, its gradient and a row at once:
# at 16,384 the single pass spilled (the static report).
_ONE_PASS_WIDTH = 8192
# The backward's row loop is not software-pipelined: a prefetched next row held a second copy of x
# and dy in registers, which spilled at 16,384 (the static report).
_BWD_STAGES = 1


def _out_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.dtype:
    """T5's result dtype: the weight's when half precision, else `w * (x promoted to fp32)`."""
    return w_dtype if w_dtype in _HALF else torch.promote_types(w_dtype, torch.promote_types(x_dtype, torch.float32))


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    N, D = x2.shape
    y = torch.empty(N, D, dtype=_out_dtype(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N:
        block_d = next_power_of_2(D)
        launch_kernel(_rms_norm_fwd_kernel, (N,), (
            x2, weight, y, rstd, x2.stride(0), y.stride(0), D, eps,
        ), dict(W_HALF=weight.dtype in _HALF, BLOCK_D=block_d, num_warps=_warps(block_d)))  # fmt: skip
    return y.view(x.shape), rstd


def _backward(dy, x, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    x2, dy2 = _rows(x), _rows(dy)
    N, D = x2.shape
    dx = torch.empty(N, D, dtype=x.dtype, device=x.device)
    block_d = next_power_of_2(D)
    # Enough programs to fill the GPU, each reducing its rows' weight gradient in registers.
    programs = max(1, min(N, 4 * _multiprocessors(x.device)))
    rows_per_program = cdiv(max(N, 1), programs)
    programs = cdiv(max(N, 1), rows_per_program)
    dw = torch.zeros(programs, D, dtype=torch.float32, device=x.device)
    passes = [(True, True)] if block_d <= _ONE_PASS_WIDTH else [(True, False), (False, True)]
    for dx_pass, dw_pass in passes if N else []:
        launch_kernel(_rms_norm_bwd_kernel, (programs,), (
            dy2, x2, weight, rstd, dx, dw, dy2.stride(0), x2.stride(0), dx.stride(0), N, D, rows_per_program,
        ), dict(W_HALF=weight.dtype in _HALF, BLOCK_D=block_d, DX_PASS=dx_pass, DW_PASS=dw_pass,
                num_warps=_warps(block_d), num_stages=_BWD_STAGES))  # fmt: skip
    return dx.view(x.shape), dw.sum(0).to(weight.dtype)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: few programs, each with several rows
    return torch.cuda.get_device_properties(device).multi_processor_count


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `(..., d)`, weight `(d,)`. The variance is taken in fp32 (fp64 for fp64 input); the normalised
    value is cast to the weight's dtype when that is half precision, and the
    result follows PyTorch's type promotion of `weight * normalised`, exactly as T5."""
    variance = upcast(x).pow(2).mean(-1, keepdim=True)
    normed = x * torch.rsqrt(variance + eps)
    if weight.dtype in _HALF:
        normed = normed.to(weight.dtype)
    return weight * normed


@torch.library.custom_op("fastseq::rms_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y `(..., d)` and rstd `(N,)` fp32."""
    return _forward(x, weight, eps)


@_fwd_op.register_fake
def _fwd_fake(x, weight, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(x.shape, dtype=_out_dtype(x.dtype, weight.dtype)), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("fastseq::rms_norm_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx `(..., d)` in x's dtype and dweight `(d,)` in the weight's."""
    return _backward(dy, x, weight, rstd)


@_bwd_op.register_fake
def _bwd_fake(dy, x, weight, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward_op(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.fastseq.rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


def _unsupported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if reason := unsupported_dtypes(x, weight):
        return reason
    if x.shape[-1] > _MAX_WIDTH:
        return f"width {x.shape[-1]} (the kernel holds a row in registers: at most {_MAX_WIDTH})"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x `(..., d)`, weight `(d,)` -> `(..., d)` (dtype as T5: see the module docstring)."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight must be (d,) with d = x.shape[-1]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    if use_triton("rms_norm", HAS_TRITON_KERNEL, x, weight, unsupported=lambda: _unsupported(x, weight)):
        return torch.ops.fastseq.rms_norm_fwd(x, weight, float(eps))[0]
    return rms_norm_reference(x, weight, eps)


def compile_specs() -> list:
    """Every configuration the launchers can pick on a GPU, for the compile-only tests (`_compile`)."""
    from ._compile import CompileSpec, signature

    specs = []
    for capability in (80, 86, 90):
        for x_dtype, w_dtype in (("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")):
            for width in (512, 1024, 2048, 4096, 8192, 16384):  # d_model of every published T5-family size
                ce = dict(W_HALF=w_dtype != "fp32", BLOCK_D=width)
                out = w_dtype if w_dtype != "fp32" else "fp32"
                options = dict(num_warps=_warps(width))
                tag = f"sm{capability}-x{x_dtype}-w{w_dtype}-D{width}"
                k = _rms_norm_fwd_kernel
                sig = signature(k, dict(X=f"*{x_dtype}", W=f"*{w_dtype}", Y=f"*{out}", RSTD="*fp32"), ("eps",), ce)
                specs.append(CompileSpec(f"fwd-{tag}", k.__name__, sig, ce, options, capability))
                k = _rms_norm_bwd_kernel
                pointers = dict(DY=f"*{out}", X=f"*{x_dtype}", W=f"*{w_dtype}", RSTD="*fp32", DX=f"*{x_dtype}",
                                DW="*fp32")  # fmt: skip
                one_pass = width <= _ONE_PASS_WIDTH
                for dx_pass, dw_pass in [(True, True)] if one_pass else [(True, False), (False, True)]:
                    bwd = dict(ce, DX_PASS=dx_pass, DW_PASS=dw_pass)
                    sig = signature(k, pointers, (), bwd)
                    name = "bwd" if one_pass else "bwd_dx" if dx_pass else "bwd_dw"
                    specs.append(CompileSpec(f"{name}-{tag}", k.__name__, sig, bwd,
                                             dict(options, num_stages=_BWD_STAGES), capability))  # fmt: skip
    return specs
