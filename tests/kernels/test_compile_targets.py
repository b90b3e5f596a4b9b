"""Compile-only: the Triton kernel configurations build for sm_80 and sm_90 without a GPU (the full
matrix), and the committed static report shows every configuration, sm_86's too, built from these
sources (the quick run). Every build fits the chip's shared memory and is lean: no 16-bit build that
a launcher can pick on sm_80 or sm_90 spills a register, every attention `tl.dot` becomes tensor-core
instructions, and the T5 bias, its gradient, dropout and LongT5's global tokens cost at most the
instruction ratios of `PRICES` over the same tile without them, in the whole kernel and in its key
loop. Read from the cubin with the tools inside the
Triton wheel (`_compile`). Runs without the interpreter (it replaces the kernels)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastseq.kernels import _compile

OPS = list(_compile.OPS)
# Kernels whose matrix products are `tl.dot`s (the other ops' matmuls are PyTorch's).
DOT_KERNELS = {"_bucketed_attention_fwd_kernel", "_bucketed_attention_bwd_dq_kernel",
               "_bucketed_attention_bwd_dkdv_kernel"}  # fmt: skip


# The heaviest build of every attention kernel (forward, LongT5's forward, the backward's
# preprocessing, dK/dV, LongT5's global dK/dV, dQ, LongT5's two dQ launches) on sm_80 and sm_90.
EVERY_ATTENTION_KERNEL = (r"^(fwd-t5|fwd_global-longt5|pre-none|dkdv-t5|dkdv_global-longt5|dq-t5|dq_local-longt5"
                          r"|dq_global-longt5)-sm(80|90)-D128-bf16$")  # fmt: skip


def _build(op: str, only: str | None = None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastseq.kernels._compile", op] + (["--only", only] if only else [])
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


# What the compile test builds (minutes on two cores): every op's builds for sm_80 and sm_90, and of
# the attention those at D = 64 and 128 in bf16 (the tiles `PRICES` and `SHUFFLE_BOUNDS` compare). The
# other configurations (sm_86's tiles; D = 16, 32 and 256; fp16; fp32) are compiled by `--report`,
# whose committed rows `test_the_static_report_is_of_these_kernels` holds to the same bounds.
BUILT = {"bucketed_attention": r"-sm(80|90)-D(64|128)-bf16$"}
BUILT_OTHERWISE = r"-sm(80|90)-"
REPORT = Path(__file__).resolve().parents[2] / "bench" / "results"


def _specs(op: str) -> list:
    return importlib.import_module(f"fastseq.kernels.{op}").compile_specs()


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_the_shipped_tiles_compile_lean(op):
    only = BUILT.get(op, BUILT_OTHERWISE)
    results = _build(op, only)
    assert sorted(r["name"] for r in results) == sorted(s.name for s in _specs(op) if re.search(only, s.name))
    assert {r["capability"] for r in results} == {80, 90}
    _check_lean(op, results)


def test_the_static_report_is_of_these_kernels():
    """The committed static report (`python -m fastseq.kernels._compile --report`) was built from these
    kernel sources, holds every configuration of every op for sm_80, sm_86 and sm_90, and every row
    meets the compile test's bounds. A change to the kernels fails here until the report is rebuilt,
    so the builds the compile test leaves out are checked whenever the kernels change."""
    record = json.loads((REPORT / _compile.SOURCES_FILE).read_text())
    assert record["kernels_sha256"] == _compile.source_fingerprint(), (
        "the kernels changed since bench/results/static_sm*.csv were built: run python -m fastseq.kernels._compile "
        "--report and commit what it writes"
    )
    results = _compile.read_csvs(REPORT)
    assert len(results) == record["builds"]
    for op in OPS:
        rows = [r for r in results if r["op"] == op]
        assert sorted(r["name"] for r in rows) == sorted(s.name for s in _specs(op)), op
        assert {r["capability"] for r in rows} == {80, 86, 90}, op
        _check_lean(op, rows)


def test_the_report_check_sees_a_spill_and_a_stale_report(tmp_path, monkeypatch):
    """The report test can fail: a spilling row, an atomic in the attention, shared memory over the
    chip's and a changed kernel module are caught; the dispatch code around the kernels is not a build."""
    rows = _compile.read_csvs(REPORT)
    attention = [r for r in rows if r["op"] == "bucketed_attention"]
    _check_lean("bucketed_attention", attention)
    shipped = next(r for r in attention if r["name"] == "fwd-t5-sm80-D128-bf16")
    priced = next(r for r in attention if r["name"] == "fwd-bias-pad-sm90-D64-bf16")
    for row, key, value in ((shipped, "spill_bytes", 8), (shipped, "atomics", 1),
                            (shipped, "shared", shipped["limit"] + 1),
                            (priced, "loop_instructions", 2 * priced["loop_instructions"]),
                            (priced, "loop_barriers", priced["loop_barriers"] + 1)):  # fmt: skip
        broken = [dict(r, **{key: value}) if r is row else r for r in attention]
        with pytest.raises(AssertionError):
            _check_lean("bucketed_attention", broken)
    copy = tmp_path / "kernels"
    shutil.copytree(Path(_compile.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_compile, "__file__", str(copy / "_compile.py"))
    committed = json.loads((REPORT / _compile.SOURCES_FILE).read_text())["kernels_sha256"]
    assert _compile.source_fingerprint() == committed

    def touch(name: str) -> None:
        (copy / name).write_bytes((copy / name).read_bytes() + b"\n")

    for dispatch in ("_backend.py", "bucketed_attention/op.py", "bucketed_attention/launch.py"):  # not a build
        touch(dispatch)
        assert _compile.source_fingerprint() == committed, dispatch
    for built in ("rms_norm.py", "bucketed_attention/jit.py", "bucketed_attention/kernels.py"):
        touch(built)
        assert _compile.source_fingerprint() != committed, built
        committed = _compile.source_fingerprint()


def test_the_dearest_loop_is_the_longest_with_tensor_cores():
    """`dearest_loop` reads SASS: the range from a label to a backward branch to it, among those that hold
    an HGMMA or HMMA, with its barriers; a longer loop without tensor-core instructions does not count."""
    sass = """
.L_x_1:
        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR12], RZ, !UPT ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/              @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0030*/                   FADD R1, R1, R2 ;
        /*0040*/                   FADD R1, R1, R2 ;
        /*0050*/                   FADD R1, R1, R2 ;
        /*0060*/                   FADD R1, R1, R2 ;
        /*0070*/              @P0 BRA `(.L_x_2) ;
.L_x_3:
        /*0080*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0090*/                   FFMA R1, R1, R2, R3 ;
        /*00a0*/                   FFMA R1, R1, R2, R3 ;
        /*00b0*/                   BRA `(.L_x_3) ;
        /*00c0*/                   BRA `(.L_x_4) ;
.L_x_4:
        /*00d0*/                   EXIT ;
"""
    assert _compile.dearest_loop(sass) == (4, 0)
    assert _compile.dearest_loop(sass.split(".L_x_2")[0]) == (3, 1)
    assert _compile.dearest_loop("") == (0, 0)


def _check_lean(op: str, results: list[dict]) -> None:
    """The bounds of a compiled build: shared memory within the chip's, no spill in a 16-bit build a
    launcher picks on sm_80 or sm_90, tensor cores for every attention `tl.dot`, 64-bit batch offsets,
    pipelined key loops, no atomics in the attention (its bias gradient's sums are ordered, packed rows
    too) and the attention's feature prices."""
    over = [(r["name"], r["shared"], r["limit"]) for r in results if r["shared"] > r["limit"]]
    assert not over, over
    baselines = importlib.import_module(f"fastseq.kernels.{op}").__dict__.get("BASELINES_ONLY", ())
    shipped = [r for r in results if r["capability"] in (80, 90) and _compile.SIXTEEN_BIT.search(r["name"])
               and not r["name"].startswith(baselines)]  # fmt: skip
    assert shipped
    spilling = [(r["name"], r["spill_bytes"], r["registers"]) for r in shipped if r["spill_bytes"] or r["local_stores"]]
    assert not spilling, spilling
    attention = [r for r in shipped if r["kernel"] in DOT_KERNELS]
    no_mma = [(r["name"], r["dots"], r["fma_dots"], r["tensor_core"]) for r in attention
              if r["dots"] == 0 or r["fma_dots"] or r["tensor_core"] == 0]  # fmt: skip
    assert not no_mma, no_mma
    if op == "bucketed_attention":
        warp_level = [(r["name"], r["mma_sync"]) for r in attention if r["capability"] == 90 and r["mma_sync"]]
        assert not warp_level, f"mma.sync (HMMA) on sm_90, where wgmma does more a cycle: {warp_level}"
    narrow = [(r["name"], r["narrow_offsets"]) for r in results if r["narrow_offsets"]]
    assert not narrow, narrow
    unpipelined = [r["name"] for r in attention if r["num_stages"] > 1 and not r["async_copies"]]
    assert not unpipelined, unpipelined
    if op == "bucketed_attention":
        atomic = [(r["name"], r["atomics"]) for r in results if r["atomics"]]
        assert not atomic, atomic
        _check_prices(results)


def _check_prices(results: list[dict]) -> None:
    from fastseq.kernels.bucketed_attention import BARRIER_BOUNDS, OCCUPANCY_BOUNDS, PRICES, SHUFFLE_BOUNDS

    by_name = {r["name"]: r for r in results}

    def total(names: str, tail: str, key: str) -> int:
        return sum(by_name[f"{name}{tail}"][key] for name in names.split("+"))

    checked = 0
    for arch in (80, 90):
        for d in (64, 128):
            tail = f"-sm{arch}-D{d}-bf16"
            for priced, baseline, *bounds in PRICES:
                for key, bound in zip(("instructions", "loop_instructions"), bounds, strict=True):
                    ratio = total(priced, tail, key) / total(baseline, tail, key)
                    assert ratio <= bound, f"{priced}{tail}: {ratio:.2f}x the {key} of {baseline}, bound {bound}x"
                checked += 1
            for bounded, key in ((SHUFFLE_BOUNDS, "shuffles"), (BARRIER_BOUNDS, "loop_barriers")):
                for build, baseline in bounded:
                    got, base = total(build, tail, key), total(baseline, tail, key)
                    assert got <= base, f"{build}{tail}: {got} {key} against {base} in {baseline}"
            for build, baseline in OCCUPANCY_BOUNDS:
                got, base = (_compile.ctas_per_sm(by_name[f"{name}{tail}"]) for name in (build, baseline))
                assert got >= base, f"{build}{tail}: {got} CTAs per SM against {base} for {baseline}"
    assert checked == 4 * len(PRICES)


@pytest.mark.slow
def test_attention_batch_offsets_are_64_bit():
    """`b * stride_b` in 32 bits wraps once (B - 1) * L * H * D >= 2**31: t5-11b (H * D = 16,384) at
    L = 4096 from B = 33. Only a GPU would show it, so the PTX of every attention kernel for sm_80 and
    sm_90 is read: no batch stride enters a 32-bit product (`mul.lo.s32`, `mad.lo.s32`)."""
    results = _build("bucketed_attention", EVERY_ATTENTION_KERNEL)
    assert len(results) == 16
    narrow = [(r["name"], r["narrow_offsets"]) for r in results if r["narrow_offsets"]]
    assert not narrow, narrow


@pytest.mark.slow
def test_dq_key_loop_is_pipelined_with_a_bias():
    """The dQ key loop with T5's bias or LongT5's global bias loads its keys and values with `cp.async`
    on sm_80 and sm_90 (software-pipelined): a `tl.debug_barrier` in the loop (the bias gradient's
    scratch tile) kept Triton's pipeliner off it."""
    results = _build("bucketed_attention", r"^dq(-t5|-bias-pad|_local-longt5|_global-longt5)-sm(80|90)-D(64|128)-bf16$")
    assert len(results) == 16 and all(r["num_stages"] > 1 for r in results)
    unpipelined = [r["name"] for r in results if not r["async_copies"]]
    assert not unpipelined, unpipelined


def test_ptx_stats_read_narrow_products_and_async_copies():
    """The PTX reader follows a parameter through moves and conversions into 32-bit products, not
    64-bit ones, and counts the asynchronous copies to shared memory, not the other cp.async lines."""
    ptx = """
\tld.param.b32 \t%r5, [k_param_3];
\tmov.u32 \t%r6, %ctaid.z;
\tcvt.u32.u32 \t%r8, %r5;
\tmad.lo.s32 \t%r7, %r6, %r8, %r1;
\tld.param.s32 \t%rd2, [k_param_4];
\tmul.lo.s64 \t%rd3, %rd2, %rd1;
\tld.param.b32 \t%r9, [k_param_5];
\tmul.wide.s32 \t%rd4, %r9, %r6;
\tld.param.b32 \t%r10, [k_param_6];
\tmul.lo.s32 \t%r11, %r10, %r6;
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd4 + 0 ], 0x10, %r2;
\tcp.async.ca.shared.global [ %r1 + 0 ], [ %rd4 + 0 ], 0x4, %r2;
\tcp.async.ca.shared.global [ %r1 + 0 ], [ %rd4 + 0 ], 0x8, %r2;
\tcp.async.commit_group;
\tcp.async.wait_group 0;
"""
    assert _compile.ptx_stats(ptx, {3, 4, 5}) == {"async_copies": 3, "narrow_offsets": 1}
    assert _compile.ptx_stats(ptx, {3, 4, 5, 6})["narrow_offsets"] == 2
    assert _compile.ptx_stats(ptx, {4, 5})["narrow_offsets"] == 0


@pytest.mark.slow
def test_cubin_stats_read_a_real_spill():
    """The reader sees a spill and a tensor-core instruction where the compiler put them: a kernel
    that holds more than 255 registers' worth of values live, a plain 16-bit dot, and an fp32 dot
    with exact products (which stays on the CUDA cores); atomics where a kernel adds atomically."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.spill_probe"], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    spill, dot, fma, atomic, dot80 = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    assert spill["spill_bytes"] > 0 and spill["local_stores"] > 0 and spill["local_loads"] > 0, spill
    assert dot["spill_bytes"] == 0 and dot["tensor_core"] > 0 and dot["instructions"] > dot["tensor_core"], dot
    assert (dot["dots"], dot["fma_dots"]) == (1, 0), dot
    assert (fma["dots"], fma["fma_dots"], fma["tensor_core"]) == (1, 1, 0), fma  # fp32, exact products
    assert atomic["atomics"] >= 2 and spill["atomics"] == dot["atomics"] == fma["atomics"] == 0, atomic
    assert dot["mma_sync"] == 0 and dot80["mma_sync"] == dot80["tensor_core"] > 0, (dot, dot80)  # wgmma on sm_90


def test_ctas_per_sm_follow_the_occupancy_rules():
    """Registers by the warp in units of 256, 1 KiB of shared memory reserved per CTA, and the SM's
    warp and CTA limits."""
    row = dict(capability=90, num_warps=8, registers=128, shared=64 * 1024)
    assert _compile.ctas_per_sm(row) == 2  # 128 x 32 x 8 = 32,768 registers a CTA
    assert _compile.ctas_per_sm(dict(row, registers=129)) == 1  # 136 a thread: 34,816
    assert _compile.ctas_per_sm(dict(row, registers=32, shared=113 * 1024)) == 2  # 228 KiB / 114 KiB
    assert _compile.ctas_per_sm(dict(row, registers=32, shared=114 * 1024)) == 1
    assert _compile.ctas_per_sm(dict(row, registers=16, shared=0, num_warps=1)) == 32  # the CTA limit
    assert _compile.ctas_per_sm(dict(row, capability=86, registers=16, shared=0, num_warps=4)) == 12  # 48 warps


# Ops whose Triton kernels live in another op's module (and are compile-checked there).
KERNELS_OF = {"local_attention": "bucketed_attention"}  # the attention kernels with a key window


def test_every_op_with_a_kernel_is_compile_checked():
    kernels = importlib.import_module("fastseq.kernels")
    with_kernel = {
        KERNELS_OF.get(name, name)
        for name in ("bucketed_attention", "local_attention", "global_aggregate", "gated_gelu", "rms_norm",
                     "linear_cross_entropy")
        if importlib.import_module(f"{kernels.__name__}.{name}").HAS_TRITON_KERNEL
    }  # fmt: skip
    assert with_kernel == set(OPS)


def record_launches(monkeypatch, module, calls) -> list:
    """(kernel, grid, args, meta) of every launch that `calls` make of `module`'s kernels: recorded, not run."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors reach the launchers
    launches = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.kernel, grid, args, meta))

    for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
        monkeypatch.setattr(module, name, Recorded(getattr(module, name)))
    with torch.no_grad():
        calls()
    return launches


def _launch_specializations(monkeypatch, module, calls) -> dict:
    """What Triton specializes at launch (its own argument binder, for sm_90) for every launch that
    `calls` make of `module`'s kernels, by kernel and meta-parameters: the launches are recorded, not run."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    found: dict = {}
    for kernel, _, args, kwargs in record_launches(monkeypatch, module, calls):
        kernel = _compile.jit_function(kernel)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        _, specialization, options = binder(*args, **kwargs)
        key = (kernel.fn.__name__, repr(sorted(options.items())))
        found.setdefault(key, set()).add(repr(specialization))
    return found


def _attention_calls():
    """T5's training call, forward and backward, with the lengths and the decoding position each at 1, at a
    multiple of 16 and otherwise (and the seed, which the kernels read from a tensor)."""
    import torch

    from fastseq.kernels.bucketed_attention import launch

    B, H, D = 2, 2, 16
    table = torch.randn(H, 9)
    for Lq, Lk, q_offset, seed in ((32, 32, 0, 32), (17, 1, 1, 1), (33, 48, 7, 5), (1, 48, 47, 5)):
        q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
        mask = torch.ones(B, Lk, dtype=torch.bool)
        seed = torch.tensor([seed], dtype=torch.int32)
        out, lse = launch.attention_forward(q, k, v, table, mask, seed, True, q_offset, 1.0, 0.1)
        launch.attention_backward(torch.randn_like(out), q, k, v, out, lse, table, mask, seed, True, q_offset, 1.0,
                                  0.1)  # fmt: skip


def _ffn_calls():
    """The FFN's activation forward and backward with seeds 32, 1 and 5 (read from a tensor)."""
    import torch

    gated_gelu = importlib.import_module("fastseq.kernels.gated_gelu")
    gate, up = torch.randn(4, 64), torch.randn(4, 64)
    for seed in (torch.tensor([s], dtype=torch.int32) for s in (32, 1, 5)):
        gated_gelu._forward(gate, up, seed, 0.1)
        gated_gelu._backward(gate, gate, up, seed, 0.1, True)


def _rms_norm_calls():
    """The norm's backward over 1, 33 and 128 rows (1, 5 and 16 rows a program)."""
    import torch

    rms_norm = importlib.import_module("fastseq.kernels.rms_norm")
    weight = torch.randn(32)
    for rows in (1, 33, 128):
        x = torch.randn(rows, 32)
        rms_norm._backward(torch.randn_like(x), x, weight, torch.rand(rows))


def _global_aggregate_calls():
    """LongT5's global-token sums, forward and backward, over 16, 33 and 48 tokens in blocks of 16."""
    import torch

    global_aggregate = importlib.import_module("fastseq.kernels.global_aggregate")
    for L in (16, 33, 48):
        x, mask, caps = torch.randn(2, L, 32), torch.ones(2, L, dtype=torch.bool), torch.tensor([L // 16 - 1] * 2)
        out = global_aggregate._fwd_op(x, mask, caps.int(), 16)
        global_aggregate._bwd_op(torch.randn_like(out), mask, caps.int(), L, 16)


# The kernels that a training step launches with sizes or scalars that change from call to call, and the
# calls that launch them.
CALLS = {
    "fastseq.kernels.bucketed_attention.launch": (_attention_calls, 4),
    "fastseq.kernels.gated_gelu": (_ffn_calls, 2),
    "fastseq.kernels.rms_norm": (_rms_norm_calls, 1),
    "fastseq.kernels.global_aggregate": (_global_aggregate_calls, 2),
}


@pytest.mark.parametrize("module", list(CALLS))
def test_a_configuration_compiles_once_whatever_the_batch(monkeypatch, module):
    """Triton compiles a kernel per specialization of its integer arguments (1: a constant; a multiple
    of 16: a divisibility hint). Launches of one configuration (kernel and meta-parameters) whose
    lengths, decoding position or rows take each of those kinds of value get one specialization: batches
    of other lengths compiled the attention, the norm's backward and LongT5's sums again. (The dropout
    seed, once an integer argument that compiled the attention and the FFN again at its first multiple of
    16, is a tensor the kernels read.)"""
    calls, kernels = CALLS[module]
    found = _launch_specializations(monkeypatch, importlib.import_module(module), calls)
    assert len({name for name, _ in found}) == kernels, found
    assert all(len(specializations) == 1 for specializations in found.values()), found


def test_the_report_builds_the_attention_that_launches():
    """The integer arguments that the static report builds plain (no divisibility hint, not a constant)
    are the ones Triton does not specialize at launch, and those it builds as multiples of 16 the ones
    it does: the report's build is the one a launch of the usual inputs compiles."""
    for spec in _specs("bucketed_attention"):
        kernel = _compile.jit_function(getattr(importlib.import_module(spec.module), spec.kernel_name))
        plain = {name for name, kind in spec.signature.items() if kind == "i32" and name not in spec.aligned}
        specialized = {param.name for param in kernel.params if not param.do_not_specialize}
        assert not plain & specialized, (spec.name, sorted(plain & specialized))
        assert set(spec.aligned) <= specialized, (spec.name, sorted(set(spec.aligned) - specialized))
