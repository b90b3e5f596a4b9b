"""T5LayerNorm (RMSNorm): fastseq's kernel against `transformers`' module in eager mode and against
`torch.compile` of fastseq's reference, forward / backward / full, in GB/s of the bytes each pass
must move at least (forward: read x, write y; backward: read x and dy, write dx) and peak memory.

    python bench/bench_rms_norm.py --out bench/results/rms_norm_h100.csv

`--smoke` runs tiny sizes on the CPU (the kernel through the Triton interpreter) to check the
script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import add_common_args, fwd_bwd_full, provenance, smoke_setup, write_csv


def _providers(device: str) -> dict:
    """name -> factory(weight) -> norm(x)."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from fastseq.kernels import rms_norm
    from fastseq.kernels.rms_norm import rms_norm_reference

    def hf(weight):
        module = T5LayerNorm(weight.shape[0], eps=1e-6).to(device=weight.device, dtype=weight.dtype)
        module.weight = weight
        return module

    compiled = torch.compile(rms_norm_reference) if device == "cuda" else rms_norm_reference
    return {
        "fastseq": lambda w: lambda x: rms_norm(x, w, 1e-6),
        "hf_eager": hf,
        "torch_compile": lambda w: lambda x: compiled(x, w, 1e-6),
    }


def measure(name, make, tokens, width, dtype, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, width, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = torch.nn.Parameter(torch.rand(width, device=device, generator=g).to(dtype) + 0.5)
    dy = torch.randn(tokens, width, device=device, dtype=dtype, generator=g)
    norm = make(weight)
    fwd, bwd, full, peak = fwd_bwd_full(lambda: norm(x), [x, weight], dy, device)
    size = tokens * width * dtype.itemsize
    return {
        "provider": name, "tokens": tokens, "width": width, "dtype": str(dtype).replace("torch.", ""),
        "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4), "full_ms": round(full, 4),
        "fwd_gbps": round(2 * size / fwd / 1e6, 1), "bwd_gbps": round(3 * size / bwd / 1e6, 1),
        "full_gbps": round(5 * size / full / 1e6, 1), "peak_mem_mib": round(peak, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 768, 1024, 2048, 4096])
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = smoke_setup(args.smoke)
    if args.smoke:
        args.tokens, args.widths, args.dtype = 6, [37, 64], "float32"
    dtype = getattr(torch, args.dtype)
    meta = provenance(device, "GB/s = bytes moved at least / time: fwd 2*N*d, bwd 3*N*d, full 5*N*d elements")
    rows = []
    for width in args.widths:
        for name, make in _providers(device).items():
            row = dict(measure(name, make, args.tokens, width, dtype, device), **meta)
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items() if k not in meta), flush=True)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
