"""linear_cross_entropy against CrossEntropyLoss over full logits, in float64."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from fastseq.kernels import linear_cross_entropy

# The package re-exports the function under the module's name; reach the module itself.
lce_module = importlib.import_module("fastseq.kernels.linear_cross_entropy")


def _case(N=37, d=16, V=53, seed=0, ignore=(0, 5, 36)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignore)] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("chunk_elements", [1 << 25, 53 * 4, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_loss_and_gradients(chunk_elements, with_bias, monkeypatch):
    monkeypatch.setattr(lce_module, "_CHUNK_ELEMENTS", chunk_elements)
    hidden, weight, bias, labels = _case()
    b = bias if with_bias else None
    logits = hidden @ weight.t() + (bias if with_bias else 0)
    expected = F.cross_entropy(logits, labels, ignore_index=-100)
    got = linear_cross_entropy(hidden, weight, labels, bias=b)
    assert torch.allclose(got, expected, atol=1e-12)
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    g_exp = torch.autograd.grad(expected * 1.7, leaves)
    g_got = torch.autograd.grad(got * 1.7, leaves)
    for a, e in zip(g_got, g_exp, strict=True):
        assert torch.allclose(a, e, atol=1e-12)


def test_three_dimensional_inputs_and_fp32():
    hidden, weight, _, labels = _case(N=12, ignore=(0, 7))
    h = hidden.detach().float().view(3, 4, 16)
    w = weight.detach().float()
    expected = F.cross_entropy((h @ w.t()).view(12, -1), labels, ignore_index=-100)
    assert torch.allclose(linear_cross_entropy(h, w, labels.view(3, 4)), expected, rtol=1e-5)


def test_all_ignored_is_zero_without_nan():
    hidden, weight, _, labels = _case()
    labels[:] = -100
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_half_precision_inputs_keep_their_dtype_in_gradients():
    hidden, weight, _, labels = _case()
    h = hidden.detach().bfloat16().requires_grad_()
    w = weight.detach().bfloat16().requires_grad_()
    loss = linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    expected = F.cross_entropy(h.double() @ w.double().t(), labels)
    assert abs(loss.item() - expected.item()) < 1e-5


def test_out_of_range_label_is_named():
    hidden, weight, _, labels = _case()
    labels[3] = 99
    with pytest.raises(ValueError, match="label 99 is outside the vocabulary"):
        linear_cross_entropy(hidden, weight, labels)
