"""T5LayerNorm: RMS normalisation without mean subtraction or bias."""

from __future__ import annotations

import torch

from ._backend import upcast, use_triton

HAS_TRITON_KERNEL = False
_HALF = (torch.float16, torch.bfloat16)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x `(..., d)`, weight `(d,)`. The variance is taken in fp32 (fp64 for fp64 input); the normalised
    value is cast to the weight's dtype when that is half precision, and the
    result follows PyTorch's type promotion of `weight * normalised`, exactly as T5."""
    variance = upcast(x).pow(2).mean(-1, keepdim=True)
    normed = x * torch.rsqrt(variance + eps)
    if weight.dtype in _HALF:
        normed = normed.to(weight.dtype)
    return weight * normed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x `(..., d)`, weight `(d,)` -> `(..., d)`."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"rms_norm: weight must be (d,) with d = x.shape[-1]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
        )
    use_triton("rms_norm", HAS_TRITON_KERNEL, x, weight)
    return rms_norm_reference(x, weight, eps)
