"""linear_cross_entropy against CrossEntropyLoss over full logits, in float64."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastseq.kernels import linear_cross_entropy
from tests.conftest import DEVICE, assert_close

# The package re-exports the function under the module's name; reach the module itself.
lce_module = importlib.import_module("fastseq.kernels.linear_cross_entropy")


def _chunk_elements(monkeypatch, elements: int) -> None:
    """Chunks whose logits stay below `elements`, however few rows that leaves."""
    monkeypatch.setattr(lce_module, "_CHUNK_ELEMENTS", elements)
    monkeypatch.setattr(lce_module, "_MIN_CHUNK_ROWS", 1)


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
    _chunk_elements(monkeypatch, chunk_elements)
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


def test_a_cuda_graph_capture_leaves_the_labels_on_the_device(monkeypatch, triton_backend):
    """Naming a bad label reads the labels back to the host, which a CUDA graph cannot capture: while a
    capture runs the loss reads nothing back, and an out-of-range label makes it NaN (as under
    torch.compile), where a valid batch gives the same loss as outside a capture."""
    module = importlib.import_module("fastseq.kernels.linear_cross_entropy")
    hidden, weight, _, labels = _case()
    hidden, weight = hidden.float(), weight.float()
    expected = linear_cross_entropy(hidden, weight, labels)
    monkeypatch.setattr(module, "capturing", lambda tensor: True)
    assert torch.equal(linear_cross_entropy(hidden, weight, labels), expected)
    labels[3] = 99
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels))


def _unfused(hidden, weight, labels, bias=None, smoothing=0.0, z_loss=0.0):
    """The definition over full logits, autograd included (float64 in these tests)."""
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    loss = F.cross_entropy(logits, labels, ignore_index=-100, label_smoothing=smoothing)
    if z_loss:
        ok = labels != -100
        loss = loss + z_loss * (torch.logsumexp(logits, -1) ** 2 * ok).sum() / ok.sum().clamp(min=1)
    return loss


@pytest.mark.parametrize("smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
def test_reference_label_smoothing_and_z_loss(smoothing, z_loss, monkeypatch):
    _chunk_elements(monkeypatch, 53 * 5)
    hidden, weight, bias, labels = _case()
    expected = _unfused(hidden, weight, labels, bias, smoothing, z_loss)
    got = linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=smoothing, z_loss=z_loss)
    assert torch.allclose(got, expected, atol=1e-12)
    leaves = (hidden, weight, bias)
    for a, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves), strict=True):
        assert torch.allclose(a, e, atol=1e-12)


def test_label_smoothing_is_nll_and_the_mean_logit():
    """The smoothed loss per row is (1 - eps) * NLL + eps * (logsumexp - mean logit), as CrossEntropyLoss
    computes it over the full vocabulary; eps = 1 leaves the uniform term alone."""
    hidden, weight, bias, labels = _case(N=9, V=31, ignore=(4,))
    logits = hidden @ weight.t() + bias
    ok = labels != -100
    lse = torch.logsumexp(logits, -1)
    nll = lse - logits.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    for eps in (0.0, 0.1, 0.45, 1.0):
        by_hand = (((1 - eps) * nll + eps * (lse - logits.mean(-1))) * ok).sum() / ok.sum()
        got = linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=eps)
        assert torch.allclose(got, by_hand, atol=1e-12), eps
        assert torch.allclose(got, F.cross_entropy(logits, labels, label_smoothing=eps), atol=1e-12), eps


# ---------------------------------------------------------------------------------------------
# The Triton kernel (on the GPU, or on the CPU through Triton's interpreter)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("N,V", [(1, 53), (3, 700), (129, 53), (5, 5000)])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, z_loss=1e-3)], ids=["plain", "smooth-z"])
def test_triton_fp32_against_float64(N, V, options, triton_backend, monkeypatch):
    _chunk_elements(monkeypatch, 2 * V)  # several chunks
    hidden, weight, bias, labels = _case(N=N, V=V, ignore=(0,) if N > 1 else ())
    leaves = [t.detach().float().to(DEVICE).requires_grad_() for t in (hidden, weight, bias)]
    got = linear_cross_entropy(leaves[0], leaves[1], labels.to(DEVICE), bias=leaves[2], **options)
    grads = torch.autograd.grad(got * 1.7, leaves)
    expected = _unfused(hidden, weight, labels, bias, options.get("label_smoothing", 0.0), options.get("z_loss", 0.0))
    exact = torch.autograd.grad(expected * 1.7, (hidden, weight, bias))
    assert got.dtype == torch.float32
    assert_close(got.detach().cpu(), expected.detach(), rel=1e-5, what="loss")
    for name, g, e in zip(("hidden", "weight", "bias"), grads, exact, strict=True):
        assert_close(g.cpu(), e, rel=1e-5, floor=1e-3, what=f"grad of {name}")


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
@pytest.mark.parametrize("N,V", [(7, 53), (4, 700)])
def test_triton_label_smoothing_against_cross_entropy_loss(N, V, smoothing, triton_backend, monkeypatch):
    """Label smoothing alone through the kernel, fp32, against torch.nn.CrossEntropyLoss(label_smoothing)
    in float64: the loss and every gradient, with an ignored row, a bias and several chunks."""
    _chunk_elements(monkeypatch, 3 * V)
    hidden, weight, bias, labels = _case(N=N, V=V, ignore=(1,))
    leaves = [t.detach().float().to(DEVICE).requires_grad_() for t in (hidden, weight, bias)]
    got = linear_cross_entropy(leaves[0], leaves[1], labels.to(DEVICE), bias=leaves[2], label_smoothing=smoothing)
    grads = torch.autograd.grad(got, leaves)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=smoothing)
    expected = loss_fn(hidden @ weight.t() + bias, labels)
    exact = torch.autograd.grad(expected, (hidden, weight, bias))
    plain = _unfused(hidden, weight, labels, bias)
    assert abs(expected.item() - plain.item()) > 1e-3  # smoothing changes the loss
    assert_close(got.detach().cpu(), expected.detach(), rel=1e-5, what="loss")
    for name, g, e in zip(("hidden", "weight", "bias"), grads, exact, strict=True):
        assert_close(g.cpu(), e, rel=1e-5, floor=1e-3, what=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_label_smoothing_half_precision_within_twice_torch_error(dtype, triton_backend):
    hidden, weight, _, labels = _case(N=40, d=32, V=600)
    h, w = (t.detach().to(DEVICE, dtype).requires_grad_() for t in (hidden, weight))
    got = linear_cross_entropy(h, w, labels.to(DEVICE), label_smoothing=0.1)
    grads = torch.autograd.grad(got, (h, w))
    h2, w2 = (t.detach().requires_grad_() for t in (h, w))
    theirs = F.cross_entropy((h2 @ w2.t()).float(), labels.to(DEVICE), ignore_index=-100, label_smoothing=0.1)
    their_grads = torch.autograd.grad(theirs, (h2, w2))
    h64, w64 = (t.detach().cpu().double().requires_grad_() for t in (h, w))
    exact = _unfused(h64, w64, labels, smoothing=0.1)
    exact_grads = torch.autograd.grad(exact, (h64, w64))
    for name, a, b, e in zip(("loss", "hidden", "weight"), (got, *grads), (theirs, *their_grads), (exact, *exact_grads),
                             strict=True):  # fmt: skip
        err = (a.detach().cpu().double() - e).abs().max().item()
        torch_err = (b.detach().cpu().double() - e).abs().max().item()
        slack = torch.finfo(dtype).eps * e.abs().max().item()
        assert err <= 2 * torch_err + slack, (name, err, torch_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision_within_twice_torch_error(dtype, triton_backend):
    hidden, weight, _, labels = _case(N=40, d=32, V=1000)
    h, w = (t.detach().to(DEVICE, dtype).requires_grad_() for t in (hidden, weight))
    got = linear_cross_entropy(h, w, labels.to(DEVICE))
    grads = torch.autograd.grad(got, (h, w))
    # PyTorch in that dtype: the LM head in half precision, the loss in fp32 (as transformers does).
    h2, w2 = (t.detach().requires_grad_() for t in (h, w))
    theirs = F.cross_entropy((h2 @ w2.t()).float(), labels.to(DEVICE), ignore_index=-100)
    their_grads = torch.autograd.grad(theirs, (h2, w2))
    h64, w64 = (t.detach().cpu().double().requires_grad_() for t in (h, w))
    exact = _unfused(h64, w64, labels)
    exact_grads = torch.autograd.grad(exact, (h64, w64))
    for name, a, b, e in zip(("loss", "hidden", "weight"), (got, *grads), (theirs, *their_grads), (exact, *exact_grads),
                             strict=True):  # fmt: skip
        err = (a.detach().cpu().double() - e).abs().max().item()
        torch_err = (b.detach().cpu().double() - e).abs().max().item()
        slack = torch.finfo(dtype).eps * e.abs().max().item()
        assert err <= 2 * torch_err + slack, (name, err, torch_err)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype


def test_triton_bf16_weight_gradient_is_summed_in_fp32_over_many_chunks(triton_backend, monkeypatch):
    """64 chunks of 8 rows whose shares of the weight gradient are large while their sum is small: a
    zero-initialised head (a uniform softmax, as muP's zero readout starts), every label equally often,
    and hidden states with a common offset, whose shares cancel across chunks. Rounding each chunk's
    share to bf16 before the sum leaves errors the size of the shares (9x PyTorch's here); summed in
    fp32, the bf16 gradient is within twice the error of PyTorch's own bf16 computation (one matmul
    over every row, rounded once), both against float64."""
    N, d, V, rows = 512, 32, 32, 8
    _chunk_elements(monkeypatch, rows * V)
    g = torch.Generator().manual_seed(0)
    h = (4.0 + 0.3 * torch.randn(N, d, generator=g)).to(DEVICE, torch.bfloat16)
    w = torch.zeros(V, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = (torch.arange(N) % V)[torch.randperm(N, generator=g)].to(DEVICE)
    (got,) = torch.autograd.grad(linear_cross_entropy(h, w, labels), (w,))
    w2 = w.detach().requires_grad_()
    (theirs,) = torch.autograd.grad(F.cross_entropy((h @ w2.t()).float(), labels), (w2,))
    w64 = w.detach().cpu().double().requires_grad_()
    (exact,) = torch.autograd.grad(_unfused(h.cpu().double(), w64, labels.cpu()), (w64,))
    err, torch_err = ((t.cpu().double() - exact).abs().max().item() for t in (got, theirs))
    assert got.dtype == torch.bfloat16
    assert 0 < torch_err and err <= 2 * torch_err, (err, torch_err)


def test_triton_all_ignored_and_ignored_rows(triton_backend):
    hidden, weight, _, labels = _case(N=9, V=70, ignore=(0,))
    h, w = (t.detach().float().to(DEVICE).requires_grad_() for t in (hidden, weight))
    everything_ignored = torch.full_like(labels, -100).to(DEVICE)
    loss = linear_cross_entropy(h, w, everything_ignored, label_smoothing=0.1, z_loss=1e-3)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
    labels[[2, 4]] = -100
    h.grad = None
    linear_cross_entropy(h, w, labels.to(DEVICE)).backward()
    assert h.grad[[0, 2, 4]].abs().max() == 0  # row 0 is ignored by _case
    assert (h.grad[[1, 3, 5, 6, 7, 8]].abs().amax(-1) > 0).all()


def test_triton_op_opcheck_and_torch_compile(triton_backend):
    hidden, weight, bias, labels = _case(N=7, V=60, ignore=(2,))
    h, w, b = (t.detach().float().to(DEVICE).requires_grad_() for t in (hidden, weight, bias))
    labels = labels.to(DEVICE)
    args = (h, w, b, labels, -100, 0.1, 1e-3, True, True, True)
    torch.library.opcheck(torch.ops.fastseq.linear_cross_entropy.default, args)
    compiled = torch.compile(lambda *t: linear_cross_entropy(*t, bias=b), backend="aot_eager", fullgraph=True)
    loss = compiled(h, w, labels)
    grads = torch.autograd.grad(loss, (h, w, b))
    eager = linear_cross_entropy(h, w, labels, bias=b)
    assert torch.equal(loss, eager)
    for g, e in zip(grads, torch.autograd.grad(eager, (h, w, b)), strict=True):
        assert torch.equal(g, e)


def test_triton_with_a_frozen_weight(triton_backend):
    hidden, weight, _, labels = _case(N=5, V=40, ignore=(1,))
    h = hidden.detach().float().to(DEVICE).requires_grad_()
    w = weight.detach().float().to(DEVICE)  # frozen
    loss = linear_cross_entropy(h, w, labels.to(DEVICE))
    (grad,) = torch.autograd.grad(loss, (h,))
    h64 = hidden.detach().requires_grad_()
    (expected,) = torch.autograd.grad(_unfused(h64, weight.detach(), labels), (h64,))
    assert_close(grad.cpu(), expected, rel=1e-5, floor=1e-3, what="grad of hidden")


# ---------------------------------------------------------------------------------------------
# The compiled kernel: PTX of every sm_80 and sm_90 build (compiled without a GPU)
# ---------------------------------------------------------------------------------------------

_PTX_OF_EVERY_BUILD = """
import importlib, json
from fastseq.kernels import _compile
for spec in importlib.import_module("fastseq.kernels.linear_cross_entropy").compile_specs():
    if spec.capability in (80, 90):
        print(json.dumps({"name": spec.name, "ptx": _compile.compile_spec("linear_cross_entropy", spec).asm["ptx"]}))
"""
_PTX_INSTRUCTION = re.compile(r"^(@!?%\w+\s+)?([a-z][\w.]*)\s*(.*);$")
_PTX_LABEL = re.compile(r"^(\$?[\w.$]+):$")
_PTX_REGISTER = re.compile(r"%\w+")
_PTX_BARRIERS = ("bar.sync", "barrier.sync", "bar.cta.sync", "barrier.cta.sync")  # a CTA barrier that waits


def _ptx_operands(text: str) -> list[str]:
    """Operands split at the commas outside `{...}` and `[...]`."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "{[") - (ch in "}]")
        if ch == "," and not depth:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()] * bool(current.strip())


def _ptx_program(ptx: str) -> tuple[list[tuple[bool, str, list[str]]], dict[str, int]]:
    """The kernel's instructions as (predicated, opcode, operands), and the instruction index of each label."""
    body = ptx[ptx.index("{", ptx.index(".entry")) + 1 :]
    instructions, labels = [], {}
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith(".") or line in ("{", "}"):
            continue
        if found := _PTX_LABEL.match(line):
            labels[found.group(1)] = len(instructions)
            continue
        found = _PTX_INSTRUCTION.match(line)
        assert found, f"unparsed PTX line {line!r}"
        instructions.append((bool(found.group(1)), found.group(2), _ptx_operands(found.group(3))))
    return instructions, labels


def _unordered_row_accesses(ptx: str, row_param: str) -> tuple[int, int, list[str]]:
    """The numbers of global loads and stores whose address derives from the pointer parameter
    `row_param`, and each load with the first such store that a path reaches from it without a CTA
    barrier: another thread's store may then land before the load. A load in the store's own loop is
    exempt (there a thread rewrites what it read)."""
    instructions, labels = _ptx_program(ptx)
    derived = {r for _, op, ops in instructions if op.startswith("ld.param") and ops[1] == f"[{row_param}]"
               for r in _PTX_REGISTER.findall(ops[0])}  # fmt: skip
    grown = True
    while grown:  # registers computed from the pointer (a store writes no register)
        grown = False
        for _, op, ops in instructions:
            if op.startswith(("st.", "bra", "bar.")) or not ops:
                continue
            written = set(_PTX_REGISTER.findall(ops[0]))
            if not written <= derived and any(derived & set(_PTX_REGISTER.findall(o)) for o in ops[1:]):
                derived |= written
                grown = True

    def of_row(ops):
        return any(derived & set(_PTX_REGISTER.findall(o)) for o in ops if o.startswith("["))

    loads = [i for i, (_, op, ops) in enumerate(instructions) if op.startswith("ld.global") and of_row(ops)]
    stores = {i for i, (_, op, ops) in enumerate(instructions) if op.startswith("st.global") and of_row(ops)}
    loops = [(labels[ops[0]], i) for i, (_, op, ops) in enumerate(instructions)
             if op.startswith("bra") and labels[ops[0]] <= i]  # fmt: skip

    def loop(i):  # the innermost loop around instruction i, by its backward branch
        return min(((a, b) for a, b in loops if a <= i <= b), key=lambda ab: ab[1] - ab[0], default=None)

    def successors(i):
        predicated, op, ops = instructions[i]
        if op.startswith("bra"):
            return [labels[ops[0]]] + [i + 1] * predicated
        return [i + 1] * (predicated or op not in ("ret", "exit"))

    unordered = []
    for load in loads:
        seen, todo = set(), successors(load)
        while todo:
            i = todo.pop()
            if i in seen or i >= len(instructions) or instructions[i][1].startswith(_PTX_BARRIERS):
                continue
            seen.add(i)
            if i in stores and (loop(i) is None or loop(i) != loop(load)):
                unordered.append(f"{instructions[load][1]} #{load} -> {instructions[i][1]} #{i}")
                break
            todo.extend(successors(i))
    return len(loads), len(stores), unordered


def test_ptx_label_logit_is_read_before_pass_two_overwrites_the_row():
    """Every thread reads logits[label] after pass 1; pass 2 then overwrites the row in place and
    logits[label] belongs to one thread's block. In the PTX of every sm_80 and sm_90 build, each load
    of the row is separated from every store to it by a bar.sync, except pass 2's own load and store
    of the same elements. Read from the compiled code: the interpreter runs one thread at a time."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_OF_EVERY_BUILD], capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    builds = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(builds) == 12, [b["name"] for b in builds]
    racy = {}
    for build in builds:
        # the Logits pointer is the kernel's first parameter
        loads, stores, unordered = _unordered_row_accesses(build["ptx"], "_cross_entropy_kernel_param_0")
        assert loads > 2 and stores > 1, (build["name"], loads, stores)  # pass 1, the label, pass 2; fills, pass 2
        if unordered:
            racy[build["name"]] = unordered
    assert not racy, f"a store to the row may overtake a load of it (PTX instruction numbers): {racy}"
