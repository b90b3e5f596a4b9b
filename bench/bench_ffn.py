"""T5 v1.1's gated-GELU FFN block: fastseq's `gated_ffn` (kernels; backward recomputes the d_ff
activation) against `transformers`' `T5DenseGatedActDense` in eager mode and `torch.compile` of the
same composition, forward / backward / full in TFLOP/s of the three matmuls, and peak memory.
Also the elementwise `gated_gelu` alone in GB/s.

    python bench/bench_ffn.py --out bench/results/ffn_h100.csv

`--smoke` runs tiny sizes on the CPU (kernels through the Triton interpreter) to check the script
itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import add_common_args, fwd_bwd_full, provenance, smoke_setup, write_csv

SIZES = {"base": (768, 2048), "large": (1024, 2816), "xl": (2048, 5120)}  # T5 v1.1 (d_model, d_ff)


def _ffn_providers(device: str) -> dict:
    """name -> factory(wi_0, wi_1, wo) -> ffn(x)."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    from fastseq.kernels import gated_ffn
    from fastseq.kernels.gated_gelu import gated_ffn_reference

    def hf(wi_0, wi_1, wo):
        config = T5Config(d_model=wi_0.shape[1], d_ff=wi_0.shape[0], dropout_rate=0.0, feed_forward_proj="gated-gelu")
        module = T5DenseGatedActDense(config).to(device=wi_0.device, dtype=wi_0.dtype)
        module.wi_0.weight, module.wi_1.weight, module.wo.weight = wi_0, wi_1, wo
        return module

    compiled = torch.compile(gated_ffn_reference) if device == "cuda" else gated_ffn_reference
    return {
        "fastseq": lambda *w: lambda x: gated_ffn(x, *w),
        "hf_eager": hf,
        "torch_compile": lambda *w: lambda x: compiled(x, *w),
    }


def _gelu_providers(device: str) -> dict:
    from transformers.activations import ACT2FN

    from fastseq.kernels import gated_gelu
    from fastseq.kernels.gated_gelu import gated_gelu_reference

    compiled = torch.compile(gated_gelu_reference) if device == "cuda" else gated_gelu_reference
    return {"fastseq": gated_gelu, "hf_eager": lambda g, u: ACT2FN["gelu_new"](g) * u, "torch_compile": compiled}


def measure_ffn(name, make, tokens, d_model, d_ff, dtype, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, device=device, generator=g).to(dtype) * shape[-1] ** -0.5)

    wi_0, wi_1, wo = param(d_ff, d_model), param(d_ff, d_model), param(d_model, d_ff)
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, generator=g).requires_grad_()
    dy = torch.randn(tokens, d_model, device=device, dtype=dtype, generator=g)
    ffn = make(wi_0, wi_1, wo)
    fwd, bwd, full, peak = fwd_bwd_full(lambda: ffn(x), [x, wi_0, wi_1, wo], dy, device)
    flops = 6 * tokens * d_model * d_ff
    return {
        "op": "ffn", "provider": name, "tokens": tokens, "d_model": d_model, "d_ff": d_ff,
        "dtype": str(dtype).replace("torch.", ""), "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4),
        "full_ms": round(full, 4), "fwd_tflops": round(flops / fwd / 1e9, 1),
        "bwd_tflops": round(2 * flops / bwd / 1e9, 1), "full_tflops": round(3 * flops / full / 1e9, 1),
        "peak_mem_mib": round(peak, 1),
    }  # fmt: skip


def measure_gelu(name, fn, tokens, d_ff, dtype, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    gate, up = (torch.randn(tokens, d_ff, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(2))
    dy = torch.randn(tokens, d_ff, device=device, dtype=dtype, generator=g)
    fwd, bwd, full, peak = fwd_bwd_full(lambda: fn(gate, up), [gate, up], dy, device)
    size = tokens * d_ff * dtype.itemsize
    return {
        "op": "gated_gelu", "provider": name, "tokens": tokens, "d_ff": d_ff, "dtype": str(dtype).replace("torch.", ""),
        "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4), "full_ms": round(full, 4),
        "fwd_gbps": round(3 * size / fwd / 1e6, 1), "bwd_gbps": round(5 * size / bwd / 1e6, 1),
        "full_gbps": round(8 * size / full / 1e6, 1), "peak_mem_mib": round(peak, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = smoke_setup(args.smoke)
    sizes = {name: SIZES[name] for name in args.sizes}
    if args.smoke:
        args.tokens, sizes, args.dtype = 8, {"tiny": (16, 40)}, "float32"
    dtype = getattr(torch, args.dtype)
    meta = provenance(device, "ffn: fwd 6*N*d_model*d_ff FLOPs, bwd 2x, full 3x; gated_gelu: GB/s of "
                      "fwd 3*N*d_ff, bwd 5*N*d_ff, full 8*N*d_ff elements")  # fmt: skip
    rows = []
    for d_model, d_ff in sizes.values():
        for name, make in _ffn_providers(device).items():
            rows.append(dict(measure_ffn(name, make, args.tokens, d_model, d_ff, dtype, device), **meta))
            print(", ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in meta), flush=True)
        for name, fn in _gelu_providers(device).items():
            rows.append(dict(measure_gelu(name, fn, args.tokens, d_ff, dtype, device), **meta))
            print(", ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in meta), flush=True)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
