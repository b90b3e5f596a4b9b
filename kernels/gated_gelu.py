"""Gated GELU of T5 v1.1: `gelu_tanh(gate) * up` (Hugging Face's `gelu_new`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import upcast, use_triton

HAS_TRITON_KERNEL = False


def gated_gelu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """fp32 math. gate/up `(..., d_ff)` -> `(..., d_ff)` in gate's dtype."""
    return (F.gelu(upcast(gate), approximate="tanh") * upcast(up)).to(gate.dtype)


def gated_gelu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate/up `(..., d_ff)`, same shape and dtype -> `(..., d_ff)`."""
    if gate.shape != up.shape:
        raise ValueError(f"gated_gelu: gate and up must have one shape; got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"gated_gelu: gate and up must have one dtype; got {gate.dtype} and {up.dtype}")
    use_triton("gated_gelu", HAS_TRITON_KERNEL, gate, up)
    return gated_gelu_reference(gate, up)
