"""Drop-in kernel patching of Hugging Face (`transformers`) T5-family models.

`patch(model, ...)` swaps the forwards of a model's modules, in place, for kernel-backed ones with
the same parameters (the state dict is untouched); `unpatch(model)` restores the originals. What
each family gets is in `REGISTRY`, keyed by `config.model_type`.

Patched so far: the RMSNorms (`fastseq.kernels.rms_norm`, T5LayerNorm's casting rules) and the
feed-forward blocks (`gated_ffn` for gated GELU, `relu_ffn` for ReLU; the backward recomputes
the `(tokens, d_ff)` activation). A module whose configuration the kernel does not cover (another
activation, biases, a quantised or differently typed output projection) keeps its own forward,
decided per call, so no patched call returns different numbers. The attention and the loss are
not patched yet: asking for them is an error rather than a silent no-op.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fastseq import kernels

# model_type -> what the patch can swap in that family
REGISTRY: dict[str, frozenset[str]] = {
    "t5": frozenset({"norm", "ffn"}),
    "mt5": frozenset({"norm", "ffn"}),
    "umt5": frozenset({"norm", "ffn"}),
    "longt5": frozenset({"norm", "ffn"}),
}
_ORIGINAL = "_fastseq_original_forward"


def _activation_name(module: nn.Module) -> str | None:
    act = getattr(module, "act", None)
    name = type(act).__name__
    if name == "NewGELUActivation":
        return "gelu_new"
    if name == "ReLU" or act is torch.relu or getattr(act, "__name__", "") == "relu":
        return "relu"
    return None


def _plain(*linears: nn.Linear) -> bool:
    return all(isinstance(m, nn.Linear) and m.bias is None and m.weight.dtype.is_floating_point for m in linears)


def _rms_norm_forward(self, hidden_states):
    return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _gated_ffn_forward(self, hidden_states):
    weights = (self.wi_0.weight, self.wi_1.weight, self.wo.weight)
    if any(w.dtype != hidden_states.dtype for w in weights):  # e.g. FLAN-T5's fp32 `wo` under bf16
        return getattr(self, _ORIGINAL)(hidden_states)
    p = self.dropout.p if self.training else 0.0
    return kernels.gated_ffn(hidden_states, *weights, dropout_p=p)


def _relu_ffn_forward(self, hidden_states):
    weights = (self.wi.weight, self.wo.weight)
    if any(w.dtype != hidden_states.dtype for w in weights):
        return getattr(self, _ORIGINAL)(hidden_states)
    p = self.dropout.p if self.training else 0.0
    return kernels.relu_ffn(hidden_states, *weights, dropout_p=p)


def _swap(module: nn.Module, forward) -> None:
    if hasattr(module, _ORIGINAL):
        return  # already patched
    setattr(module, _ORIGINAL, module.forward)
    module.forward = types.MethodType(forward, module)


def _replacement(module: nn.Module, parts: set[str]):
    """The kernel-backed forward for this module, or None to leave it as it is."""
    name = type(module).__name__
    if "norm" in parts and name.endswith("LayerNorm") and hasattr(module, "variance_epsilon"):
        return _rms_norm_forward
    if "ffn" in parts and name.endswith("DenseGatedActDense") and _activation_name(module) == "gelu_new":
        if _plain(module.wi_0, module.wi_1, module.wo):
            return _gated_ffn_forward
    if "ffn" in parts and name.endswith("DenseActDense") and _activation_name(module) == "relu":
        if _plain(module.wi, module.wo):
            return _relu_ffn_forward
    return None


def patch(model: nn.Module, *, attention: bool = False, ffn: bool = True, norm: bool = True, loss: bool = False):
    """Swap the forwards of `model`'s norms and FFNs for fastseq's kernels, in place; returns the model.
    `patched_modules(model)` lists what was swapped."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in REGISTRY:
        raise ValueError(
            f"fastseq.patch: model_type {model_type!r} is not supported; supported: {', '.join(sorted(REGISTRY))}"
        )
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ValueError(f"fastseq.patch needs transformers 5 or newer; found {transformers.__version__}")
    unavailable = [part for part, wanted in (("attention", attention), ("loss", loss)) if wanted]
    if unavailable:
        raise NotImplementedError(
            f"fastseq.patch: patching {' and '.join(unavailable)} is not available yet; pass "
            + ", ".join(f"{p}=False" for p in unavailable)
        )
    parts = {p for p, wanted in (("norm", norm), ("ffn", ffn)) if wanted} & REGISTRY[model_type]
    for module in model.modules():
        forward = _replacement(module, parts)
        if forward is not None:
            _swap(module, forward)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every forward `patch` swapped."""
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            del module.forward  # the instance attribute; the class's forward shows again
            delattr(module, _ORIGINAL)
    return model


def patched_modules(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, _ORIGINAL)]
