"""A training step under bf16 autocast with fp32 parameters, as `fastseq train --precision auto` runs on
a GPU and as a `transformers` Trainer with `bf16=True` runs a patched model. On the CPU, CPU autocast
applies CUDA's casts and the Triton kernels run through the interpreter; on a GPU (the harvest runs
the tests marked `cuda`) CUDA autocast and the compiled kernels.

Every family, native and patched: the loss and every gradient of the Triton kernels and of the
reference backend, both under autocast, are measured against the same model's fp32 step (no
autocast). Tolerance (STYLE.md): each is at most twice the error of the unpatched `transformers`
model under the same autocast against that fp32 step, gradients per parameter on the scale of the
largest gradient (key biases have an exact gradient of zero), the loss to at least one bf16 rounding
(2^-8 relative: an fp32 loss can agree by chance). Gradients come back in the parameters' own dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastseq
from tests.conftest import DEVICE, KINDS
from tests.test_patch import build, inputs

# Each model type, both ways in (T5 v1.0 stands for the ReLU FFN; mT5 and ByT5 are T5 v1.1's modules at
# other sizes natively; UMT5 is patched only).
NATIVE = [k for k in KINDS if k not in ("mt5_like", "byt5_like")]
PATCHED = [k for k in (*KINDS, "umt5") if k not in ("t5_v10_tied", "byt5_like")]
QUICK = "t5_v11_untied"
BF16_ROUNDING = 2.0**-8


# What the GPU harvest runs (every kernel and both ways in, within its minutes).
HARVEST = {("t5_v11_untied", "native"), ("t5_v11_untied", "patched"), ("longt5_tglobal", "native"),
           ("blenderbot_small", "native"), ("umt5", "patched")}  # fmt: skip


def _cases(kinds, mode):
    """The quick run's one case is the native T5 v1.1; the rest are in the full matrix."""
    return [
        pytest.param(k, mode, marks=[m for m, on in ((pytest.mark.slow, (k, mode) != (QUICK, "native")),
                                                     (pytest.mark.cuda, (k, mode) in HARVEST)) if on])
        for k in kinds
    ]  # fmt: skip


def _step(model, data, monkeypatch, backend: str | None, autocast: bool):
    """Loss and fp64 copies of every gradient of one forward-backward (`backend` None: leave the
    model's own ops, for the unpatched `transformers` model)."""
    monkeypatch.setenv("FASTSEQ_BACKEND", backend or "reference")
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**data).loss
    assert loss.dtype == torch.float32
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.dtype == p.dtype, f"{name}: gradient {p.grad.dtype}, parameter {p.dtype}"
            assert torch.isfinite(p.grad).all(), name
            grads[name] = p.grad.double()
    return loss.detach().double(), grads


def _errors(step, truth) -> tuple[float, float]:
    """Relative error of the loss, and the largest per-parameter relative error of the gradients."""
    (loss, grads), (loss_t, grads_t) = step, truth
    assert grads.keys() == grads_t.keys()
    floor = 1e-3 * max(g.norm().item() for g in grads_t.values())
    grad_err = max((grads[n] - g).norm().item() / max(g.norm().item(), floor) for n, g in grads_t.items())
    return abs(loss - loss_t).item() / abs(loss_t).item(), grad_err


@pytest.mark.parametrize(("kind", "mode"), _cases(NATIVE, "native") + _cases(PATCHED, "patched"))
def test_training_step_under_bf16_autocast(kind, mode, monkeypatch, tmp_path):
    hf = build(kind).train()
    if mode == "native":
        hf.save_pretrained(tmp_path)
        model = fastseq.from_pretrained(tmp_path).train()
    else:
        model = fastseq.patch(copy.deepcopy(hf))
    hf, model = hf.to(DEVICE), model.to(DEVICE)
    data = {k: v.to(DEVICE) for k, v in inputs(kind).items()}
    truth = _step(model, data, monkeypatch, "reference", autocast=False)
    hf_loss_err, hf_grad_err = _errors(_step(hf, data, monkeypatch, None, autocast=True), truth)
    assert hf_grad_err > 0.0  # autocast really ran in bf16
    for backend in ("reference", "triton"):
        loss_err, grad_err = _errors(_step(model, data, monkeypatch, backend, autocast=True), truth)
        assert loss_err <= max(2 * hf_loss_err, BF16_ROUNDING), (backend, loss_err, hf_loss_err)
        assert grad_err <= 2 * hf_grad_err, (backend, grad_err, hf_grad_err)
