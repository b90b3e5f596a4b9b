"""LM head and cross-entropy in one chunked pass, never holding all `(tokens, vocab)` logits.

The loss is the mean over labels that are not `ignore_index`, as `torch.nn.CrossEntropyLoss`; a
batch with every label ignored has loss 0 and zero gradients (not NaN). Optional terms:
- `label_smoothing` eps: `(1 - eps) * nll + eps * mean_j(-log p_j)`, as CrossEntropyLoss;
- `z_loss` z: `+ z * logsumexp(logits)^2` per counted token (keeps the softmax normaliser near 1).

Rows are processed in chunks whose logits stay below `_CHUNK_ELEMENTS` (the kernel path takes at
least `_MIN_CHUNK_ROWS` rows). For each chunk the logits come from one matmul; the Triton kernel then reads
each row twice (an online max / sum-exp pass, then the gradient pass) and writes the gradient of
the loss over the logits in place, so the chunk's buffer serves as logits and as their gradient;
`dhidden = dlogits @ W` and `dW += dlogits.T @ h` follow while the chunk is hot, the latter summed
in fp32 without rounding a chunk's product to 16 bits. Forward therefore computes every gradient
for a unit upstream gradient (saved: tensors the size of the inputs, never logits); backward only
scales them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._backend import (
    autocast_cast,
    autocast_dtype,
    autocast_off,
    capturing,
    next_power_of_2,
    unsupported_dtypes,
    upcast,
    use_triton,
)
from ._launch import launch_kernel

HAS_TRITON_KERNEL = True

# Logits of one chunk stay below this many elements (128 MiB in fp32), except that the kernel path
# takes at least _MIN_CHUNK_ROWS rows. There each chunk passes over (V, d) twice in 16 bits (logits,
# dhidden) and once in fp32 (dW, read and written): 12 bytes per weight element against 6 * rows
# FLOPs, so 512 rows do 256 FLOPs per byte, near an H100's balance in bf16 (~300). mT5 (V = 250,112)
# would get 134 rows, 490 passes over its 366 MiB weight (d = 768) at 65k tokens; 512 rows make it 128
# passes, for 244 MiB of logits. The reference computes in fp32 without tensor cores: its matmuls are
# compute-bound at any chunk size, and it keeps the element bound alone.
_CHUNK_ELEMENTS = 1 << 25
_MIN_CHUNK_ROWS = 512
# torch.addmm with 16-bit factors into an fp32 `self` and `out` (cuBLAS accumulates in fp32): CUDA only;
# an fp32 `self` is accepted since pytorch#167931 (November 2025), in torch 2.11 and later.
_ADDMM_INTO_FP32 = torch.torch_version.TorchVersion(torch.__version__) >= (2, 11)


@triton.jit
def _cross_entropy_kernel(
    # pointers
    Logits,  # (n, V): read as logits, overwritten with d(loss_sum / count) / d(logits)
    Labels,  # (n,) int64
    Loss,  # (n,) fp32 per-row loss (0 for ignored rows)
    Scale,  # () fp32: 1 / number of counted rows in the whole batch
    # strides
    stride_row,
    # sizes and scalars
    V,
    ignore_index,
    smoothing,
    z_loss,
    # meta-parameters
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = Logits + row * stride_row
    label = tl.load(Labels + row)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for v0 in range(0, V, BLOCK_V):
            tl.store(ptr + v0 + cols, tl.zeros((BLOCK_V,), tl.float32).to(Logits.dtype.element_ty), mask=v0 + cols < V)
        tl.store(Loss + row, 0.0)
    else:
        # Pass 1: online max and sum of exponentials, and the plain sum for label smoothing.
        m = float("-inf")
        s = 0.0
        total = 0.0
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            x = tl.load(ptr + v0 + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            total += tl.sum(tl.where(mask, x, 0.0), 0)
            m = m_new
        lse = m + tl.log(s)
        in_vocab = (label >= 0) & (label < V)
        x_label = tl.load(ptr + tl.minimum(tl.maximum(label, 0), V - 1)).to(tl.float32)
        loss = (1.0 - smoothing) * (lse - x_label) + smoothing * (lse - total / V) + z_loss * lse * lse
        loss = tl.where(in_vocab, loss, float("nan"))
        tl.store(Loss + row, loss)
        # Pass 2: d loss / d x_j = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j = label], times 1 / count.
        scale = tl.load(Scale)
        # Pass 2 overwrites the row in place, and logits[label] belongs to one thread while every thread
        # read it above: all of them must have read it before that thread's store (one bar.sync per row;
        # pass 1 alone has several per block, for its reductions). Pass 2 itself is race-free: each
        # thread rewrites only the elements it loaded.
        tl.debug_barrier()
        for v0 in range(0, V, BLOCK_V):
            mask = v0 + cols < V
            x = tl.load(ptr + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            grad = p * (1.0 + 2.0 * z_loss * lse) - smoothing / V - tl.where(v0 + cols == label, 1.0 - smoothing, 0.0)
            tl.store(ptr + v0 + cols, (grad * scale).to(Logits.dtype.element_ty), mask=mask)


def _block_v(V: int) -> int:
    return min(next_power_of_2(V), 4096)


def _chunk_rows(num_rows: int, vocab: int, min_rows: int) -> int:
    return max(1, min(num_rows, max(min_rows, _CHUNK_ELEMENTS // max(vocab, 1))))


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, summed in acc's dtype (fp32 or fp64): a 16-bit product is never rounded to 16 bits
    before it is added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _ADDMM_INTO_FP32:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # no 16-bit matmul with an fp32 result here (the CPU): fp32 copies of one chunk's factors
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _loss_and_dlogits_triton(logits, labels, ignore_index, scale, smoothing, z_loss):
    """Per-row losses; `logits` (n, V) becomes the gradient of loss_sum * scale in place."""
    n, V = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block_v = _block_v(V)
        launch_kernel(_cross_entropy_kernel, (n,), (
            logits, labels, losses, scale, logits.stride(0), V, ignore_index, smoothing, z_loss,
        ), dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4))  # fmt: skip
    return losses


def _loss_and_dlogits_reference(logits, labels, ignore_index, scale, smoothing, z_loss):
    """The same as the kernel in PyTorch ops (fp32 or fp64 logits): per-row losses; `logits` becomes
    the gradient in place."""
    V = logits.shape[1]
    ok = labels != ignore_index
    target = torch.where(ok, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    nll = lse - logits.gather(1, target[:, None])[:, 0]
    losses = (1.0 - smoothing) * nll + z_loss * lse * lse
    if smoothing:
        losses = losses + smoothing * (lse - logits.mean(-1))
    losses = losses * ok
    # softmax() rather than exp(x - lse): its fused CPU kernel is several times faster once large
    # logits push most probabilities into denormals (measured on T5 v1.1 init).
    probs = torch.softmax(logits, dim=-1)
    if z_loss:
        probs.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    if smoothing:
        probs.sub_(smoothing / V)
    probs.scatter_add_(1, target[:, None], torch.full_like(nll[:, None], -(1.0 - smoothing)))
    logits.copy_(probs.mul_((ok.to(probs.dtype) * scale)[:, None]))
    return losses


def _loss_and_grads(hidden, weight, bias, labels, ignore_index, smoothing, z_loss, fused, need_h, need_w, need_b):
    """The mean loss and, chunk by chunk, the gradients of hidden, weight and bias for a unit upstream
    gradient (`(0,)` where not needed). fp32 accumulation (fp64 for fp64 inputs)."""
    N, _ = hidden.shape
    V = weight.shape[0]
    count = (labels != ignore_index).sum()
    acc = torch.promote_types(weight.dtype, torch.float32)
    scale = 1.0 / count.clamp(min=1).to(acc)  # a device tensor: no host sync
    # The kernel takes logits in the inputs' dtype (as the LM head produces them); the reference
    # computes them in fp32.
    w = weight if fused else upcast(weight)
    b = (bias if fused else upcast(bias)) if bias is not None else None
    grad_h = torch.empty_like(hidden, dtype=w.dtype) if need_h else hidden.new_empty(0)
    grad_w = torch.zeros_like(weight, dtype=acc) if need_w else weight.new_empty(0)
    grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else weight.new_empty(0)
    loss_sum = hidden.new_zeros((), dtype=acc)
    step = _chunk_rows(N, V, _MIN_CHUNK_ROWS if fused else 1)
    for start in range(0, N, step):
        h = hidden[start : start + step].to(w.dtype)  # (n, d)
        logits = h @ w.t()  # (n, V)
        if b is not None:
            logits = logits + b
        chunk_labels = labels[start : start + step]
        if fused:
            losses = _loss_and_dlogits_triton(logits, chunk_labels, ignore_index, scale, smoothing, z_loss)
        else:
            losses = _loss_and_dlogits_reference(logits, chunk_labels, ignore_index, scale, smoothing, z_loss)
        loss_sum = loss_sum + losses.sum()
        dlogits = logits  # (n, V), overwritten in place
        if need_h:
            torch.mm(dlogits, w, out=grad_h[start : start + step])
        if need_w:
            _add_product(grad_w, dlogits.t(), h)
        if need_b:
            grad_b += dlogits.sum(0, dtype=acc)
    return loss_sum * scale, grad_h, grad_w, grad_b


def _scaled(grads, dtypes, grad_loss):
    """The saved unit-upstream gradients times the upstream gradient, in the inputs' dtypes."""
    return tuple((g * grad_loss).to(d) if d is not None else None for g, d in zip(grads, dtypes, strict=True))


class _LinearCrossEntropy(torch.autograd.Function):
    """The reference path. Forward computes the loss and every gradient; backward only scales them.
    Saved: those gradients (the size of the inputs), never logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, smoothing, z_loss):
        needs = ctx.needs_input_grad[:3]
        loss, *grads = _loss_and_grads(hidden, weight, bias, labels, ignore_index, smoothing, z_loss, False, *needs)
        ctx.save_for_backward(*grads)
        ctx.dtypes = tuple(t.dtype if need else None for t, need in zip((hidden, weight, bias), needs, strict=True))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*_scaled(ctx.saved_tensors, ctx.dtypes, grad_loss), None, None, None, None)


@torch.library.custom_op("fastseq::linear_cross_entropy", mutates_args=())
def _fused_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel path: loss (fp32 scalar) and the unit-upstream gradients of hidden, weight and bias."""
    return _loss_and_grads(hidden, weight, bias, labels, ignore_index, smoothing, z_loss, True, need_h, need_w, need_b)


@_fused_op.register_fake
def _fused_fake(hidden, weight, bias, labels, ignore_index, smoothing, z_loss, need_h, need_w, need_b):
    f32 = torch.float32
    return (
        hidden.new_empty((), dtype=f32),
        torch.empty_like(hidden, dtype=weight.dtype) if need_h else hidden.new_empty(0),
        torch.empty_like(weight, dtype=f32) if need_w else weight.new_empty(0),
        weight.new_empty(weight.shape[0], dtype=f32) if need_b else weight.new_empty(0),
    )


def _fused_setup(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = tuple(t.dtype if need else None for t, need in zip((hidden, weight, bias), inputs[7:], strict=True))
    ctx.mark_non_differentiable(*output[1:])


def _fused_backward(ctx, grad_loss, *_):
    return (*_scaled(ctx.saved_tensors, ctx.dtypes, grad_loss), None, None, None, None, None, None, None)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """fp32 chunked loss. hidden `(N, d)`, weight `(V, d)`, labels `(N,)` int, bias `(V,)` -> scalar fp32."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss)


def _unsupported(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    if reason := unsupported_dtypes(hidden, weight, bias):
        return reason
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1:
        return f"mixed dtypes {sorted(map(str, dtypes))} (the kernel takes one dtype for all)"
    return None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T (+ bias)` against labels.

    hidden `(..., d)`, weight `(V, d)`, labels `(...)` int64, bias `(V,)` or None
    (BlenderbotSmall's final logits bias) -> scalar fp32 (fp64 for fp64 inputs). Under autocast
    hidden, weight and bias are cast to autocast's dtype first, as for the LM head's `F.linear`; the
    loss is fp32 as autocast's `cross_entropy`.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V, d) with d = hidden.shape[-1]; "
            f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels must have hidden's leading shape {tuple(hidden.shape[:-1])}; "
            f"got {tuple(labels.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias must be ({weight.shape[0]},); got {tuple(bias.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"linear_cross_entropy: label_smoothing must be in [0, 1]; got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"linear_cross_entropy: z_loss must be >= 0; got {z_loss}")
    if dtype := autocast_dtype(hidden, weight):
        with autocast_off(hidden):
            hidden, weight, bias = autocast_cast(dtype, hidden, weight, bias)
            return linear_cross_entropy(
                hidden, weight, labels, ignore_index, bias=bias, label_smoothing=label_smoothing, z_loss=z_loss
            )
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    # A clear error needs the labels on the host; torch.compile traces without that check, and a CUDA
    # graph's capture runs without it (a read back to the host cannot be captured): the kernel then
    # returns a NaN loss for an out-of-range label rather than reading outside the row.
    on_host = not (torch.compiler.is_compiling() or capturing(labels))
    counted = labels[labels != ignore_index] if on_host else labels[:0]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= weight.shape[0]):
        bad = counted[(counted < 0) | (counted >= weight.shape[0])][0].item()
        raise ValueError(
            f"linear_cross_entropy: label {bad} is outside the vocabulary [0, {weight.shape[0]}) "
            f"and is not ignore_index={ignore_index}"
        )
    smoothing, z_loss = float(label_smoothing), float(z_loss)
    unsupported = functools.partial(_unsupported, hidden, weight, bias)
    if use_triton("linear_cross_entropy", HAS_TRITON_KERNEL, hidden, weight, unsupported=unsupported):
        needs = [t is not None and t.requires_grad and torch.is_grad_enabled() for t in (hidden, weight, bias)]
        op = torch.ops.fastseq.linear_cross_entropy
        return op(hidden, weight, bias, labels, ignore_index, smoothing, z_loss, *needs)[0]
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index, smoothing, z_loss)


def compile_specs() -> list:
    """Every configuration the launcher can pick on a GPU, for the compile-only tests (`_compile`)."""
    from ._compile import CompileSpec, signature

    specs = []
    for capability in (80, 86, 90):
        for dtype in ("bf16", "fp16", "fp32"):
            for block_v in (512, 4096):  # small vocabularies (ByT5: 384) and every larger one
                ce = dict(BLOCK_V=block_v)
                k = _cross_entropy_kernel
                pointers = dict(Logits=f"*{dtype}", Labels="*i64", Loss="*fp32", Scale="*fp32")
                sig = signature(k, pointers, ("smoothing", "z_loss"), ce)
                options = dict(num_warps=8 if block_v >= 2048 else 4)
                specs.append(CompileSpec(f"ce-sm{capability}-{dtype}-V{block_v}", k.__name__, sig, ce, options,
                                         capability))  # fmt: skip
    return specs
