"""LongT5 encoder attention layers (local and transient-global): fastseq's layer against
`transformers`' `LongT5LocalAttention` / `LongT5TransientGlobalAttention` (eager) holding the same
weights, and fastseq's attention op alone (`fastseq_op`: q, k, v, globals and tables given, no
projections): forward / backward / full time, TFLOP/s and peak memory.

FLOPs: the op counts the attention each query computes, 4 * B * H * L * (2 * radius + 1 + G) * D
forward (G = L // 16 global tokens for tglobal, 0 for local), 2.5x that backward, 3.5x full.
The layers add their projections: 8 * B * L * d^2 forward for q, k, v and o (d = H * D), plus
4 * B * G * d^2 for the global keys and values. Defaults: L in {2k, 4k, 8k, 16k}, 16k tokens per
batch, H = 12, D = 64, radius 127, bf16.

    python bench/bench_local_attention.py --out bench/results/local_attention_h100.csv

`--smoke` runs tiny sizes on the CPU (the kernels through the Triton interpreter) to check the
script itself; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import add_common_args, fwd_bwd_full, provenance, smoke_setup, write_csv


def _layers(kind: str, heads: int, head_dim: int, radius: int, device: str, dtype: torch.dtype):
    """The `transformers` layer and fastseq's, with the same weights."""
    from transformers import LongT5Config as HFConfig
    from transformers.models.longt5 import modeling_longt5 as hf

    from fastseq.models import longt5

    fields = dict(d_model=heads * head_dim, d_kv=head_dim, num_heads=heads, local_radius=radius, global_block_size=16,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                  encoder_attention_type=kind)  # fmt: skip
    hf_cls = hf.LongT5LocalAttention if kind == "local" else hf.LongT5TransientGlobalAttention
    theirs = hf_cls(HFConfig(**fields), has_relative_attention_bias=True).to(device=device, dtype=dtype)
    ours_cls = longt5.LongT5LocalAttention if kind == "local" else longt5.LongT5TransientGlobalAttention
    ours = ours_cls(longt5.LongT5Config(**fields), has_relative_attention_bias=True).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    tables = {"bias_table": ours.relative_attention_bias.weight}
    if kind != "local":
        tables["global_bias_table"] = ours.global_relative_attention_bias.weight
    masks = {}

    def hf_mask(x):
        """The mask the LongT5 encoder hands this layer (no padding): blocked for local attention,
        (B, L) for transient-global. Built once per shape, as the encoder builds it once per step."""
        if x.shape not in masks:
            ones = torch.ones(x.shape[:2], device=x.device, dtype=x.dtype)
            masks[x.shape] = hf._get_local_attention_mask(ones, radius + 1, x.device) if kind == "local" else ones
        return masks[x.shape]

    return {
        "fastseq": lambda x: ours(x, tables=tables, key_padding_mask=None),
        "hf_eager": lambda x: theirs(x, mask=hf_mask(x))[0],
    }


def _attention_flops(B, L, heads, head_dim, radius, kind) -> int:
    keys = 2 * radius + 1 + (L // 16 if kind != "local" else 0)
    return 4 * B * heads * L * keys * head_dim


def _op_call(B, L, heads, head_dim, radius, kind, dtype, device):
    """fastseq's attention op on inputs laid out as the layer makes them ((B, L, H, D) memory)."""
    from fastseq.kernels import local_attention

    g = torch.Generator(device=device).manual_seed(0)
    G = L // 16

    def heads_of(n):
        x = torch.randn(B, n, heads, head_dim, device=device, dtype=dtype, generator=g)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = heads_of(L), heads_of(L), heads_of(L)
    table = torch.randn(32, heads, device=device, generator=g).requires_grad_()
    leaves = [q, k, v, table]
    extra = {}
    if kind != "local":
        gk, gv = heads_of(G), heads_of(G)
        gtable = torch.randn(32, heads, device=device, generator=g).requires_grad_()
        leaves += [gk, gv, gtable]
        extra = dict(global_k=gk, global_v=gv, global_bias_table=gtable, global_block_size=16)

    def call():
        return local_attention(q, k, v, table, radius=radius, max_distance=128, **extra)

    return call, leaves, torch.randn(B, heads, L, head_dim, device=device, dtype=dtype, generator=g)


def measure(name, layer, B, L, heads, head_dim, radius, kind, dtype, device) -> dict:
    flops = _attention_flops(B, L, heads, head_dim, radius, kind)
    if layer is None:  # the op alone
        call, leaves, dy = _op_call(B, L, heads, head_dim, radius, kind, dtype, device)
        fwd, bwd, full, peak = fwd_bwd_full(call, leaves, dy, device)
    else:
        g = torch.Generator(device=device).manual_seed(0)
        d = heads * head_dim
        x = torch.randn(B, L, d, device=device, dtype=dtype, generator=g).requires_grad_()
        dy = torch.randn(B, L, d, device=device, dtype=dtype, generator=g)
        fwd, bwd, full, peak = fwd_bwd_full(lambda: layer(x), [x], dy, device)
        flops += 8 * B * L * d * d + (4 * B * (L // 16) * d * d if kind != "local" else 0)
    return {
        "provider": name, "kind": kind, "B": B, "L": L, "H": heads, "D": head_dim, "radius": radius,
        "dtype": str(dtype).replace("torch.", ""), "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4),
        "full_ms": round(full, 4), "fwd_tflops": round(flops / fwd / 1e9, 1),
        "bwd_tflops": round(2.5 * flops / bwd / 1e9, 1), "full_tflops": round(3.5 * flops / full / 1e9, 1),
        "peak_mem_mib": round(peak, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="B * L")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--radius", type=int, default=127)
    parser.add_argument("--kinds", nargs="+", default=["local", "transient-global"])
    add_common_args(parser)
    args = parser.parse_args(argv)
    device = smoke_setup(args.smoke)
    if args.smoke:
        args.tokens, args.lengths, args.heads, args.head_dim, args.radius, args.dtype = 40, [40], 2, 8, 7, "float32"
    dtype = getattr(torch, args.dtype)
    meta = provenance(
        device,
        "op: 4*B*H*L*(2*radius+1+G)*D forward, 2.5x backward, 3.5x full; layers add 8*B*L*d^2 (+4*B*G*d^2 tglobal)",
    )
    rows = []
    for kind in args.kinds:
        for L in args.lengths:
            B = max(1, args.tokens // L)
            layers = _layers(kind, args.heads, args.head_dim, args.radius, device, dtype)
            probe = torch.randn(1, L, args.heads * args.head_dim, device=device, dtype=dtype)
            with torch.no_grad():
                reference = layers["hf_eager"](probe).float()
                diffs = {n: ((f(probe).float() - reference).abs().max() / reference.abs().max()).item()
                         for n, f in layers.items()}  # fmt: skip
            for name, layer in [*layers.items(), ("fastseq_op", None)]:
                try:
                    row = measure(name, layer, B, L, args.heads, args.head_dim, args.radius, kind, dtype, device)
                except torch.OutOfMemoryError:
                    row = {"provider": name, "kind": kind, "B": B, "L": L, "fwd_ms": "OOM"}
                    torch.cuda.empty_cache()
                diff = f"{diffs[name]:.2e}" if name in diffs else ""
                rows.append(dict(row, max_rel_diff_vs_hf=diff, **meta))
                print(", ".join(f"{k}={v}" for k, v in rows[-1].items() if k not in meta), flush=True)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
