"""Compile-only checks: build every kernel configuration for real GPU targets without a GPU.

`python -m fastseq.kernels._compile <op>` compiles each entry of `<op>.compile_specs()` for the
CUDA capability it targets (80, 86 or 90) and prints one JSON line per build: its name, the
capability, the shared memory it uses and the chip's limit. It
must run without `TRITON_INTERPRET` (the interpreter replaces `@triton.jit` functions at import).
"""

from __future__ import annotations

import importlib
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# Largest shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration: argument types by name, constexpr values, launch options, and the
    CUDA capability whose launcher picks it."""

    name: str
    kernel_name: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int] = field(default_factory=dict)
    capability: int = 90


def signature(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict[str, object]) -> dict:
    """Triton signature of `kernel`: pointer types by name, fp32 scalars, the rest int32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _build(op: str, spec: CompileSpec) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"fastseq.kernels.{op}")
    kernel = getattr(module, spec.kernel_name)
    source = ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", spec.capability, 32), options=spec.options)
    return {
        "name": spec.name,
        "capability": spec.capability,
        "shared": compiled.metadata.shared,
        "limit": SHARED_MEMORY_LIMIT[spec.capability],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fastseq.kernels._compile <op>", file=sys.stderr)
        return 2
    op = argv[0]
    specs = importlib.import_module(f"fastseq.kernels.{op}").compile_specs()
    with ProcessPoolExecutor() as pool:
        for result in pool.map(_build, [op] * len(specs), specs):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
