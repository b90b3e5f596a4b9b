"""Kernels with known compiled shapes, for tests/kernels/test_compile_targets.py: one that must
spill (a 128 x 256 fp32 tile, 256 values a thread with 128 threads, kept live across a loop), one
plain bf16 dot (tensor-core instructions, no spill), one fp32 dot with exact products (CUDA cores),
one that adds into global memory atomically (its result used: ATOMG; unused: RED).
Prints the static stats of each as JSON lines. Run without TRITON_INTERPRET."""

from __future__ import annotations

import json

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastseq.kernels._compile import cubin_stats, dot_stats


@triton.jit
def _spilling_kernel(X, Y, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc = tl.load(X + offs)
    for i in range(n):
        acc = acc * tl.load(X + offs + i) + 1.0
    tl.store(Y + offs, acc)


@triton.jit
def _dot_kernel(A, B, C, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    offs = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(C + offs, tl.dot(tl.load(A + offs), tl.load(B + offs), input_precision=PRECISION))


@triton.jit
def _atomic_kernel(X, Y, Z, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    old = tl.atomic_add(Y + offs, tl.load(X + offs))
    tl.store(Z + offs, old)
    tl.atomic_add(Y + BLOCK + offs, tl.load(X + offs))


def main() -> None:
    builds = [
        (_spilling_kernel, {"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
         {"BLOCK_M": 128, "BLOCK_N": 256}),
        (_dot_kernel, {"A": "*bf16", "B": "*bf16", "C": "*fp32", "BLOCK": "constexpr", "PRECISION": "constexpr"},
         {"BLOCK": 64, "PRECISION": "ieee"}),
        (_dot_kernel, {"A": "*fp32", "B": "*fp32", "C": "*fp32", "BLOCK": "constexpr", "PRECISION": "constexpr"},
         {"BLOCK": 64, "PRECISION": "ieee"}),
        (_atomic_kernel, {"X": "*fp32", "Y": "*fp32", "Z": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128}),
    ]  # fmt: skip
    # The 16-bit dot again, for sm_80: mma.sync (HMMA) where sm_90 has wgmma (HGMMA).
    builds = [(*build, 90) for build in builds] + [(*builds[1], 80)]
    for kernel, sig, constexprs, capability in builds:
        source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
        print(json.dumps(cubin_stats(compiled.asm["cubin"]) | dot_stats(compiled.asm["ttgir"])), flush=True)


if __name__ == "__main__":
    main()
