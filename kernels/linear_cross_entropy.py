"""LM head and cross-entropy in one chunked pass, never holding all `(tokens, vocab)` logits.

The loss is the mean over labels that are not `ignore_index`, as
`torch.nn.CrossEntropyLoss`; a batch with every label ignored has loss 0 and
zero gradients (not NaN).
"""

from __future__ import annotations

import torch

from ._backend import upcast, use_triton

HAS_TRITON_KERNEL = False

# Logits of one chunk stay below this many fp32 elements (128 MiB).
_CHUNK_ELEMENTS = 1 << 25


def _chunk_rows(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, _CHUNK_ELEMENTS // max(vocab, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, the gradients of hidden,
    weight and bias for a unit upstream gradient; backward only scales them.
    Saved for backward: those gradients (the size of the inputs), never logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index):
        N, _ = hidden.shape
        V = weight.shape[0]
        valid = labels != ignore_index
        count = valid.sum()
        denom = count.clamp(min=1).to(torch.promote_types(weight.dtype, torch.float32))
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        w32 = upcast(weight)
        b32 = upcast(bias) if bias is not None else None
        grad_h = torch.empty_like(hidden, dtype=w32.dtype) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        grad_b = torch.zeros_like(b32) if need_b else None
        loss_sum = hidden.new_zeros((), dtype=w32.dtype)
        step = _chunk_rows(N, V)
        for start in range(0, N, step):
            h = hidden[start : start + step].to(w32.dtype)  # (n, d)
            logits = h @ w32.t()  # (n, V)
            if b32 is not None:
                logits = logits + b32
            ok = valid[start : start + step]
            target = torch.where(ok, labels[start : start + step], 0)
            picked = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]  # (n,)
            loss_sum = loss_sum - (picked * ok).sum()
            if need_h or need_w or need_b:
                # softmax() rather than exp(log_softmax): its fused CPU kernel is several times faster
                # once large logits push most probabilities into denormals (measured on T5 v1.1 init).
                dlogits = torch.softmax(logits, dim=-1)  # (n, V)
                del logits
                dlogits.scatter_add_(1, target[:, None], -torch.ones_like(picked[:, None]))
                dlogits.mul_((ok.to(w32.dtype) / denom)[:, None])
                if need_h:
                    grad_h[start : start + step] = dlogits @ w32
                if need_w:
                    grad_w.addmm_(dlogits.t(), h)
                if need_b:
                    grad_b += dlogits.sum(0)
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return loss_sum / denom

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        needs = ctx.needs_input_grad
        out_h = (grad_h * grad_loss).to(dh) if needs[0] else None
        out_w = (grad_w * grad_loss).to(dw) if needs[1] else None
        out_b = (grad_b * grad_loss).to(db) if needs[2] else None
        return out_h, out_w, out_b, None, None


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 chunked loss. hidden `(N, d)`, weight `(V, d)`, labels `(N,)` int, bias `(V,)` -> scalar fp32."""
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T (+ bias)` against labels.

    hidden `(..., d)`, weight `(V, d)`, labels `(...)` int64, bias `(V,)` or None
    (BlenderbotSmall's final logits bias) -> scalar fp32.
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
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    counted = labels[labels != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= weight.shape[0]):
        bad = counted[(counted < 0) | (counted >= weight.shape[0])][0].item()
        raise ValueError(
            f"linear_cross_entropy: label {bad} is outside the vocabulary [0, {weight.shape[0]}) "
            f"and is not ignore_index={ignore_index}"
        )
    use_triton("linear_cross_entropy", HAS_TRITON_KERNEL, hidden, weight)
    return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, bias=bias)
