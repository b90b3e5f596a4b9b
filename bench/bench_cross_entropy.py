"""The LM head plus cross-entropy: fastseq's chunked `linear_cross_entropy` (kernel) against the
unfused computation `transformers` does (`lm_head` matmul, then `CrossEntropyLoss` on fp32 logits)
in eager mode and under `torch.compile`; forward / backward / full time, TFLOP/s of the three
matmuls, and peak memory. Default: mT5's vocabulary (250,112), hidden 768, 4,096 tokens, bf16.

    python bench/bench_cross_entropy.py --out bench/results/cross_entropy_h100.csv

`--smoke` runs tiny sizes on the CPU (the kernel through the Triton interpreter) to check the
script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import add_common_args, fwd_bwd_full, provenance, smoke_setup, write_csv


def _unfused(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100)


def _providers(device: str) -> dict:
    from fastseq.kernels import linear_cross_entropy

    return {
        "fastseq": linear_cross_entropy,
        "hf_eager": _unfused,
        "torch_compile": torch.compile(_unfused) if device == "cuda" else _unfused,
    }


def measure(name, fn, tokens, hidden_size, vocab, dtype, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = torch.nn.Parameter(torch.randn(vocab, hidden_size, device=device, generator=g).to(dtype) * 0.02)
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    labels[::7] = -100  # padding
    fwd, bwd, full, peak = fwd_bwd_full(lambda: fn(hidden, weight, labels), [hidden, weight], None, device)
    flops = 2 * tokens * hidden_size * vocab
    return {
        "provider": name, "tokens": tokens, "hidden": hidden_size, "vocab": vocab,
        "dtype": str(dtype).replace("torch.", ""), "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4),
        "full_ms": round(full, 4), "full_tflops": round(3 * flops / full / 1e9, 1), "peak_mem_mib": round(peak, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32128, 250112])
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = smoke_setup(args.smoke)
    if args.smoke:
        args.tokens, args.hidden, args.vocabs, args.dtype = 6, 16, [53, 300], "float32"
    dtype = getattr(torch, args.dtype)
    meta = provenance(device, "full TFLOP/s = 3 * 2*N*d*V FLOPs (logits, dhidden, dweight) / full time")
    rows = []
    for vocab in args.vocabs:
        for name, fn in _providers(device).items():
            try:
                row = measure(name, fn, args.tokens, args.hidden, vocab, dtype, device)
            except torch.OutOfMemoryError:
                row = {"provider": name, "tokens": args.tokens, "vocab": vocab, "fwd_ms": "OOM"}
                torch.cuda.empty_cache()
            rows.append(dict(row, **meta))
            print(", ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in meta), flush=True)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
