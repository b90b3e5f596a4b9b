"""Drop-in kernel patching of Hugging Face (`transformers`) T5-family and BlenderbotSmall models.

`patch(model, ...)` swaps the forwards of a model's modules, in place, for kernel-backed ones with
the same parameters (the state dict is untouched); `unpatch(model)` restores the originals.
`patch_transformers(...)` does the same at class level, for models built afterwards, until
`unpatch_transformers()`. What each family gets is in `REGISTRY`, keyed by `config.model_type`.

- attention: T5's bucketed relative-position bias computed in the kernel (no `(H, Lq, Lk)` bias
  tensor), LongT5's local and transient-global attention, UMT5's per-layer tables, BlenderbotSmall's
  plain scaled attention; the `transformers` cache classes work as before (`patch_attention`).
- norm: the RMSNorms (T5LayerNorm's casting rules). ffn: gated GELU (`gated_ffn`) and ReLU
  (`relu_ffn`) blocks; the backward recomputes the `(tokens, d_ff)` activation.
- loss: in training with labels, the LM head and the cross-entropy run as one chunked kernel and
  the `(tokens, vocab)` logits are never built: the output's `logits` is None. In eval mode, or
  without labels, the model computes its logits as before. The loss runs inside the LM head's own
  module call, so DeepSpeed ZeRO-3 gathers the head's weight for it, forward and backward.
  `patch(model, label_smoothing=eps)` smooths that loss (and the eval-mode loss) as `Seq2SeqTrainer`'s
  `label_smoothing_factor` does. That Trainer option itself takes the labels away from the model and
  computes the loss from the full logits (its `LabelSmoother`): the numbers are the same, the fused
  loss is bypassed, and a patched model says so once (a warning) when it is trained without labels.

A module whose configuration a kernel does not cover (another activation, biases, weights kept in
another dtype, attention weights asked for, a mask that is not a padding mask) runs its own
forward, decided per call, so no patched call returns different numbers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastseq import kernels
from fastseq.patch_attention import ATTENTION_FORWARDS, CLASS_ORIGINALS, ORIGINAL, call_arguments, original_forward

PARTS = ("attention", "ffn", "norm", "loss")
# model_type -> what the patch can swap in that family. BlenderbotSmall's norms are LayerNorms and
# its FFN has biases: neither has a kernel here.
REGISTRY: dict[str, frozenset[str]] = {
    "t5": frozenset(PARTS),
    "mt5": frozenset(PARTS),
    "umt5": frozenset(PARTS),
    "longt5": frozenset(PARTS),
    "blenderbot-small": frozenset({"attention", "loss"}),
}
# model_type -> the transformers module defining its classes (for patch_transformers)
_MODULES = {
    "t5": "transformers.models.t5.modeling_t5",
    "mt5": "transformers.models.mt5.modeling_mt5",
    "umt5": "transformers.models.umt5.modeling_umt5",
    "longt5": "transformers.models.longt5.modeling_longt5",
    "blenderbot-small": "transformers.models.blenderbot_small.modeling_blenderbot_small",
}
# The transformers releases (major, minor) the patch is tested against, oldest and newest: CI runs
# the patch tests under both. Older releases are refused; a newer one is patched with a warning
# (the patch reads `transformers` internals, which a release may change). pyproject's test extra
# asks for at least TRANSFORMERS_TESTED[0] (a test checks the two agree).
TRANSFORMERS_TESTED = ((5, 23), (5, 25))


# ---- norm and FFN ----------------------------------------------------------------------------


def _activation_name(module: nn.Module) -> str | None:
    act = getattr(module, "act", None)
    name = type(act).__name__
    if name == "NewGELUActivation":
        return "gelu_new"
    if name == "ReLU" or act is torch.relu or getattr(act, "__name__", "") == "relu":
        return "relu"
    return None


def _plain(*linears: nn.Module) -> bool:
    return all(isinstance(m, nn.Linear) and m.bias is None and m.weight.dtype.is_floating_point for m in linears)


def _gated_applies(module: nn.Module) -> bool:
    return _activation_name(module) == "gelu_new" and _plain(module.wi_0, module.wi_1, module.wo)


def _relu_applies(module: nn.Module) -> bool:
    return _activation_name(module) == "relu" and _plain(module.wi, module.wo)


def _rms_norm_forward(self, hidden_states):
    return kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _zero3_ready(module: nn.Module, weights) -> bool:
    """Whether DeepSpeed ZeRO-3 (if it partitions these weights) gathers them for `module`'s forward.

    The kernel reads the weights of the module's children without calling them, so ZeRO-3 must know
    them as the module's external parameters; then it gathers them for its forward and backward.
    The first call registers them and returns False: that call runs the module's own forward, whose
    child calls gather them as usual."""
    if not any(hasattr(w, "ds_id") for w in weights):
        return True
    registered = getattr(module, "_external_params", {})
    if all(id(w) in registered for w in weights):
        return True
    import deepspeed

    for w in weights:
        deepspeed.zero.register_external_parameter(module, w)
    return False


def _ffn(module: nn.Module, hidden_states, applies: bool, weights: tuple, kernel: str):
    """The FFN through `kernels.<kernel>`, or the module's own forward where the kernel does not
    apply (another activation, biases, a weight in another dtype such as FLAN-T5's fp32 `wo` under
    bf16, or ZeRO-3 weights not yet registered)."""
    if not applies or any(w.dtype != hidden_states.dtype for w in weights) or not _zero3_ready(module, weights):
        return original_forward(module)(hidden_states)
    p = module.dropout.p if module.training else 0.0
    return getattr(kernels, kernel)(hidden_states, *weights, dropout_p=p)


def _gated_ffn_forward(self, hidden_states):
    weights = (self.wi_0.weight, self.wi_1.weight, self.wo.weight)
    return _ffn(self, hidden_states, _gated_applies(self), weights, "gated_ffn")


def _relu_ffn_forward(self, hidden_states):
    return _ffn(self, hidden_states, _relu_applies(self), (self.wi.weight, self.wo.weight), "relu_ffn")


# ---- loss ------------------------------------------------------------------------------------

_CAPTURE = "_fastseq_capture"  # set on the LM head while the model's forward runs for a fused loss
_SMOOTHING = "_fastseq_label_smoothing"  # set on the model by patch(label_smoothing=eps)
_WARNED_UNFUSED = "_fastseq_warned_unfused"  # set on a model once it has warned that its loss is computed outside


def _lm_head_forward(self, hidden_states, labels=None, bias=None, label_smoothing=0.0):
    """With labels: the mean (label-smoothed) cross-entropy of `hidden @ W.T (+ bias)`, as a scalar fp32.
    While the model's own forward runs for a fused loss: the hidden states themselves (nothing is computed)."""
    if labels is not None:  # under autocast the kernel casts as F.linear would
        return kernels.linear_cross_entropy(hidden_states, self.weight, labels, bias=bias,
                                            label_smoothing=label_smoothing)  # fmt: skip
    if getattr(self, _CAPTURE, False):
        return hidden_states
    return original_forward(self)(hidden_states)


def _shift_right(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "_shift_right"):  # the T5 family
        return model._shift_right(labels)
    from transformers.models.blenderbot_small.modeling_blenderbot_small import shift_tokens_right

    return shift_tokens_right(labels, model.config.pad_token_id, model.config.decoder_start_token_id)


def _seq2seq_loss_forward(self, *args, **kwargs):
    """The model's forward with the LM head and the loss fused, in training with labels."""
    original = original_forward(self)
    arguments = call_arguments(original, args, kwargs)
    labels = arguments.pop("labels", None)
    head = self.get_output_embeddings()
    smoothing = getattr(self, _SMOOTHING, 0.0)
    if labels is None and self.training and torch.is_grad_enabled():
        _warn_unfused(self)
    if not (labels is not None and self.training and isinstance(head, nn.Linear) and head.bias is None):
        out = original(*args, **kwargs)
        return _smoothed(out, labels, smoothing) if labels is not None and smoothing else out
    if ORIGINAL in head.__dict__:
        return _fused_loss(self, original, arguments, labels, head)
    # A model patched only through its classes (patch_transformers): the head, a plain Linear, gets the
    # fused forward for this call only, so that unpatch_transformers leaves nothing of the patch behind.
    _swap(head, _lm_head_forward)
    try:
        return _fused_loss(self, original, arguments, labels, head)
    finally:
        _restore(head)


def _warn_unfused(model: nn.Module) -> None:
    if model.__dict__.get(_WARNED_UNFUSED):
        return
    model.__dict__[_WARNED_UNFUSED] = True
    warnings.warn(
        "fastseq.patch: this model is trained without labels, so its loss is computed outside it from the full "
        "(tokens, vocab) logits and the fused loss kernel is bypassed (the numbers are unchanged). Seq2SeqTrainer "
        "does this when label_smoothing_factor > 0; to keep the fused loss, set label_smoothing_factor=0 and "
        "patch with fastseq.patch(model, label_smoothing=FACTOR)",
        stacklevel=3,
    )


def _smoothed(out, labels: torch.Tensor, smoothing: float):
    """The model's own outputs with the loss label-smoothed (eval mode: the logits are there)."""
    logits = out.logits if hasattr(out, "logits") else out[1]
    loss = F.cross_entropy(logits.float().flatten(0, -2), labels.to(logits.device).flatten(), ignore_index=-100,
                           label_smoothing=smoothing)  # fmt: skip
    if isinstance(out, tuple):
        return (loss, *out[1:])
    out.loss = loss
    return out


def _fused_loss(self, original, arguments: dict, labels: torch.Tensor, head: nn.Module):
    """The model's outputs with the loss from the fused LM head and cross-entropy (logits None)."""
    return_dict = arguments.pop("return_dict", None)
    want_tuple = return_dict is False or (return_dict is None and not getattr(self.config, "return_dict", True))
    if arguments.get("decoder_input_ids") is None and arguments.get("decoder_inputs_embeds") is None:
        arguments["decoder_input_ids"] = _shift_right(self, labels)
    bias = None
    if hasattr(self, "final_logits_bias"):  # BlenderbotSmall: the base model, then head + bias
        from transformers.modeling_outputs import Seq2SeqLMOutput as output_type

        arguments["use_cache"] = False  # as the model does when given labels
        out = self.model(**arguments, return_dict=True)
        hidden = out.last_hidden_state
        bias = self.final_logits_bias.reshape(-1)
        fields = {k: v for k, v in out.items() if k != "last_hidden_state"}
    else:  # the T5 family: the model's own forward, with the head handing back its input
        setattr(head, _CAPTURE, True)
        try:
            out = original(**arguments, return_dict=True)
        finally:
            setattr(head, _CAPTURE, False)
        hidden = out.logits  # the head's input, scaled as the model scales it
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        output_type = type(out)
    smoothing = getattr(self, _SMOOTHING, 0.0)
    # a module call: ZeRO-3 gathers the weight
    loss = head(hidden, labels=labels.to(hidden.device), bias=bias, label_smoothing=smoothing)
    result = output_type(loss=loss, logits=None, **fields)
    return result.to_tuple() if want_tuple else result


# ---- selection ---------------------------------------------------------------------------------


def _replacement(module: nn.Module, parts: set[str], *, check: bool = True):
    """The kernel-backed forward for this module, or None to leave it as it is. `check` also asks
    the module's configuration (instance patching); class-level patching checks per call."""
    name = type(module).__name__ if isinstance(module, nn.Module) else module.__name__
    if "attention" in parts and name in ATTENTION_FORWARDS:
        return ATTENTION_FORWARDS[name]
    if "norm" in parts and name.endswith("LayerNorm") and name != "LayerNorm":
        if not check or hasattr(module, "variance_epsilon"):
            return _rms_norm_forward
    if "ffn" in parts and name.endswith("DenseGatedActDense") and (not check or _gated_applies(module)):
        return _gated_ffn_forward
    if "ffn" in parts and name.endswith("DenseActDense") and (not check or _relu_applies(module)):
        return _relu_ffn_forward
    if "loss" in parts and name.endswith("ForConditionalGeneration"):
        return _seq2seq_loss_forward
    return None


def _class_patched(module: nn.Module) -> bool:
    return any(cls in CLASS_ORIGINALS for cls in type(module).__mro__)


def _signed(forward, original):
    """`forward` under `original`'s name and signature (what `inspect.signature` and the Trainer see)."""
    if original is None:
        return forward

    @functools.wraps(original)
    def signed(self, *args, **kwargs):
        return forward(self, *args, **kwargs)

    return signed


def _swap(module: nn.Module, forward) -> None:
    """Give `module` its own patched forward. Under `patch_transformers` the forward it keeps as its
    original is its class's own (not the class-level patch), so the module stays patched, and `unpatch`
    restores it, whatever happens to the classes later."""
    if ORIGINAL in module.__dict__:
        return  # already patched
    original = original_forward(module) if _class_patched(module) else module.forward
    setattr(module, ORIGINAL, original)
    # The original's signature shows through (`__wrapped__`): the Trainer picks dataset columns by it.
    module.forward = types.MethodType(_signed(forward, getattr(original, "__func__", None)), module)


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "5.24.0" or "5.25.0.dev0"."""
    parts = [int("".join(c for c in part if c.isdigit()) or 0) for part in version.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


def _tested_range() -> str:
    (a, b), (c, d) = TRANSFORMERS_TESTED
    return f"{a}.{b} to {c}.{d}"


def installed_transformers() -> str:
    """The version of the installed transformers distribution."""
    return importlib.metadata.version("transformers")


def _check_transformers() -> None:
    """Refuse a transformers older than the tested range; warn once for a newer one."""
    version = installed_transformers()
    found = _release(version)
    oldest, newest = TRANSFORMERS_TESTED
    if found < oldest:
        raise ValueError(
            f"fastseq.patch supports transformers {_tested_range()} (tested); found {version}. "
            f"Upgrade with: pip install 'transformers>={oldest[0]}.{oldest[1]}'"
        )
    if found > newest and version not in _WARNED:
        _WARNED.add(version)
        warnings.warn(
            f"fastseq.patch is tested with transformers {_tested_range()}; found {version}, which "
            "may have changed the internals the patch replaces. If patched and unpatched outputs differ, install "
            f"'transformers<{newest[0]}.{newest[1] + 1}' and report it",
            stacklevel=3,
        )


_WARNED: set[str] = set()  # the newer releases already warned about


def _parts(attention: bool, ffn: bool, norm: bool, loss: bool) -> set[str]:
    return {p for p, wanted in zip(PARTS, (attention, ffn, norm, loss), strict=True) if wanted}


def patch(
    model: nn.Module,
    *,
    attention: bool = True,
    ffn: bool = True,
    norm: bool = True,
    loss: bool = True,
    label_smoothing: float = 0.0,
):
    """Swap the forwards of `model`'s attention, FFN, norm and loss for fastseq's kernels, in place;
    returns the model. `patched_modules(model)` lists what was swapped. `label_smoothing` eps smooths
    the model's loss (training and eval) as `Seq2SeqTrainer`'s `label_smoothing_factor` does."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in REGISTRY:
        raise ValueError(
            f"fastseq.patch: model_type {model_type!r} is not supported; supported: {', '.join(sorted(REGISTRY))}"
        )
    _check_transformers()
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"fastseq.patch: label_smoothing must be in [0, 1); got {label_smoothing}")
    if label_smoothing and not (loss and _replacement(model, {"loss"}) is _seq2seq_loss_forward):
        raise ValueError("fastseq.patch: label_smoothing needs the loss patched (loss=True, a model with an LM head)")
    parts = _parts(attention, ffn, norm, loss) & REGISTRY[model_type]
    for module in model.modules():
        forward = _replacement(module, parts)
        if forward is not None:
            _swap(module, forward)
    if "loss" in parts and _replacement(model, parts) is _seq2seq_loss_forward:
        model.__dict__[_SMOOTHING] = float(label_smoothing)
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear) and head.bias is None:
            _swap(head, _lm_head_forward)
    return model


def _restore(module: nn.Module) -> None:
    if ORIGINAL in module.__dict__:
        del module.forward  # the instance attribute; the class's forward shows again
        delattr(module, ORIGINAL)


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every forward `patch` swapped. While `patch_transformers` is active, the classes'
    patched forwards then show through; after `unpatch_transformers`, the model is `transformers`' own."""
    for module in model.modules():
        _restore(module)
    model.__dict__.pop(_SMOOTHING, None)
    return model


def patched_modules(model: nn.Module) -> list[str]:
    """Names of the modules running a fastseq forward (instance or class-level patch)."""
    return [
        name
        for name, module in model.named_modules()
        if ORIGINAL in module.__dict__
        or (_class_patched(module) and _replacement(type(module), set(PARTS), check=False) is not None)
    ]


def patch_transformers(
    model_types=None, *, attention: bool = True, ffn: bool = True, norm: bool = True, loss: bool = True
) -> None:
    """Patch the `transformers` classes of `model_types` (default: every family in REGISTRY), so models
    built afterwards (`from_pretrained`, a Trainer's `model_init`) run fastseq's forwards.
    `unpatch_transformers()` undoes it. The per-call checks are those of `patch`."""
    _check_transformers()
    if model_types is None:
        model_types = list(REGISTRY)
    elif isinstance(model_types, str):
        model_types = [model_types]
    unknown = [t for t in model_types if t not in REGISTRY]
    if unknown:
        raise ValueError(f"fastseq.patch_transformers: unsupported model_type {unknown}; supported: {sorted(REGISTRY)}")
    wanted = _parts(attention, ffn, norm, loss)
    for model_type in model_types:
        parts = wanted & REGISTRY[model_type]
        module = importlib.import_module(_MODULES[model_type])
        for cls in vars(module).values():
            if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == module.__name__):
                continue
            forward = _replacement(cls, parts, check=False)
            if forward is None or cls in CLASS_ORIGINALS:
                continue
            CLASS_ORIGINALS[cls] = cls.__dict__["forward"]
            cls.forward = _signed(forward, CLASS_ORIGINALS[cls])


def unpatch_transformers() -> None:
    """Give every class `patch_transformers` touched its own forward back."""
    for cls, forward in list(CLASS_ORIGINALS.items()):
        cls.forward = forward
        del CLASS_ORIGINALS[cls]
