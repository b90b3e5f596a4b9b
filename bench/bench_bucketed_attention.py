"""T5 attention with a learnable bucketed relative-position bias: fastseq against the alternatives.

Providers, all measured in one run on the same inputs (q, k, v and a `(32, H)` bias table that
receives its gradient):
- `fastseq`: `fastseq.kernels.bucketed_attention` (bias and its gradient inside the kernel);
- `hf_eager`, `hf_sdpa`: `transformers`' own T5 attention functions, with the `(1, H, L, L)`
  position bias built by `transformers`' `T5Attention.compute_bias` from the same table;
- `flex`: `torch.nn.attention.flex_attention` (compiled) with a `score_mod` that adds the bias of
  a learnable per-distance table gathered from the same bucket table.

Forward, backward and full (forward + backward) times are medians of `triton.testing.do_bench`
after warm-up. FLOPs: forward 4*B*H*L*L*D, backward 2.5x that, full 3.5x. Peak memory is the
CUDA allocator's peak during one forward + backward, above what the inputs already hold.

    python bench/bench_bucketed_attention.py --out bench/results/bucketed_attention_h100.csv

`--smoke` runs tiny sizes on the CPU (fastseq through the Triton interpreter, no FlexAttention:
it has no CPU backward) to check the script itself; its numbers mean nothing.

`--host` times what a call costs the host, forward + backward, on the CPU: Python, dispatch,
autograd and the launchers' set-up, with the kernel launches replaced by ones that do nothing; for
T5's training call (bias, padding, causal, dropout 0.1), alone and in a stack of layers sharing one
prepared table, its evaluation call, and the floors (`host_time`).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import torch
from _common import Timing, add_common_args, fwd_bwd_full, provenance, smoke_setup, write_csv

NUM_BUCKETS, MAX_DISTANCE = 32, 128


def _providers() -> dict:
    """name -> factory(table) -> attend(q, k, v); set-up (modules, index tensors) stays out of the timing."""
    from transformers import T5Config
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.t5.modeling_t5 import T5Attention, eager_attention_forward

    from fastseq.kernels import bucketed_attention

    def hf(interface):
        def make(table: torch.nn.Parameter):
            H = table.shape[1]
            config = T5Config(
                num_heads=H,
                d_kv=8,
                d_model=8 * H,
                relative_attention_num_buckets=NUM_BUCKETS,
                relative_attention_max_distance=MAX_DISTANCE,
                is_decoder=False,
            )
            module = T5Attention(config, has_relative_attention_bias=True).to(table.device)
            module.relative_attention_bias.weight = table  # the same learnable table

            def attend(q, k, v):
                L = q.shape[2]
                position_bias = module.compute_bias(L, L, device=q.device).to(q.dtype)  # (1, H, L, L)
                out, _ = interface(module, q, k, v, None, dropout=0.0, scaling=1.0, position_bias=position_bias)
                return out.transpose(1, 2)  # transformers returns (B, L, H, D)

            return attend

        return make

    def fastseq_attention(table):
        return lambda q, k, v: bucketed_attention(q, k, v, table, bidirectional=True, max_distance=MAX_DISTANCE)

    return {
        "fastseq": fastseq_attention,
        "hf_eager": hf(eager_attention_forward),
        "hf_sdpa": hf(sdpa_attention_forward),
    }


def _flex_provider(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    from fastseq.kernels import relative_position_bucket

    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def make(table):
        def attend(q, k, v):
            L = q.shape[2]
            distances = torch.arange(-(L - 1), L, device=q.device)
            buckets = relative_position_bucket(
                distances, bidirectional=True, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE
            )
            per_distance = table[buckets].t().to(q.dtype)  # (H, 2L - 1), learnable through the gather

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + per_distance[h, kv_idx - q_idx + L - 1]

            return flex(q, k, v, score_mod=score_mod, scale=1.0)

        return attend

    return make


def _inputs(B, H, L, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    table = torch.nn.Parameter((torch.randn(NUM_BUCKETS, H, device=device, generator=g) * 0.5).to(dtype))
    return q, k, v, table


def measure(name, make, B, H, L, D, dtype, device) -> dict:
    q, k, v, table = _inputs(B, H, L, D, dtype, device)
    leaves = [q, k, v, table]
    grad = torch.randn(B, H, L, D, device=device, dtype=dtype)
    attend = make(table)
    fwd, bwd, total, peak = fwd_bwd_full(lambda: attend(q, k, v), leaves, grad, device)
    flops = 4 * B * H * L * L * D
    return {
        "provider": name, "B": B, "H": H, "L": L, "D": D, "dtype": str(dtype).replace("torch.", ""),
        "fwd_ms": round(fwd, 4), "bwd_ms": round(bwd, 4), "full_ms": round(total, 4),
        "fwd_tflops": round(flops / fwd / 1e9, 1), "bwd_tflops": round(2.5 * flops / bwd / 1e9, 1),
        "full_tflops": round(3.5 * flops / total / 1e9, 1), "peak_mem_mib": round(peak, 1),
    }  # fmt: skip


def check_agreement(fns, B, H, L, D, dtype, device) -> dict[str, float]:
    """Largest difference of each provider from hf_eager (outputs and every gradient), relative to its size."""
    results = {}
    for name, make in fns.items():
        q, k, v, table = _inputs(B, H, L, D, dtype, device)
        out = make(table)(q, k, v)
        out.float().square().sum().backward()
        results[name] = [out.detach().float()] + [t.grad.float() for t in (q, k, v, table)]
    ref = results["hf_eager"]
    worst = {}
    for name, tensors in results.items():
        pairs = zip(tensors, ref, strict=True)
        worst[name] = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item() for a, b in pairs)
    return worst


class _NoLaunch:
    """A kernel whose launches do nothing (`--host`), recorded (kernel, grid, arguments) into `launches`
    while that is a list."""

    launches: list | None = None

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if _NoLaunch.launches is not None:
                _NoLaunch.launches.append((self.kernel, grid, args, kwargs))

        return launch


class _Compiled:
    """What Triton's launch finds in its cache for `_triton_launches`: a compiled kernel whose C launcher
    does nothing."""

    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


def _triton_launches(launches: list, through_run: bool = False):
    """A call that makes each recorded launch as the launchers make it (`launch_kernel`: Triton's own
    `JITFunction.run` once per configuration, then the compiled kernel's C launcher directly) or, with
    `through_run`, through `JITFunction.run` every time, for sm_90 on a stand-in driver (`StandInDriver`, made
    the process's active driver: without a GPU Triton has none to go back to, and `--host` launches
    nothing else) and with `_Compiled` in the kernel cache: the Python of a launch (binding the arguments
    or keying them, finding the compiled kernel, reading the grid) without the device and stream queries
    of a real driver and the C launcher that packs the arguments (on a GPU the launch hooks' check too:
    `_Compiled.launch_metadata`)."""
    from triton.runtime import driver

    from fastseq.kernels._compile import StandInDriver, jit_function
    from fastseq.kernels._launch import launch_kernel

    driver.set_active(StandInDriver())
    jits: dict = {}
    runs = []
    for kernel, grid, args, kwargs in launches:
        jit = jits.get(kernel.fn)
        if jit is None:
            jit = jit_function(kernel)
            jit.device_caches[0]  # its binder, for sm_90; this sets `jit.compile`, so it comes first
            jit.compile = lambda *args, **kwargs: _Compiled()
            jits[kernel.fn] = jit
        if through_run:
            runs.append(functools.partial(jit[grid], *args, **kwargs))
        else:
            runs.append(functools.partial(launch_kernel, jit, grid, args, kwargs))
        runs[-1]()  # a kernel's first launch "compiles" it into the cache

    def call():
        for run in runs:
            run()

    return call


class _NoOp(torch.autograd.Function):
    """An autograd op that allocates its output and its three input gradients and does nothing else: the
    floor of any attention written as a Python `autograd.Function` (`--host`)."""

    @staticmethod
    def forward(ctx, q, k, v, table):
        B, H, L, D = q.shape
        return torch.empty(B, L, H, D).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad):
        B, H, L, D = grad.shape
        return (*(torch.empty(B, L, H, D).transpose(1, 2) for _ in range(3)), None)


HOST_LAYERS = 12  # T5-base's layers per stack


def host_time(calls: int = 50, reps: int = 9) -> list[dict]:
    """Microseconds of host work per attention call, forward + backward (`--host`): the CPU time of the
    calling thread (`time.thread_time`), so that other processes on a shared machine do not count.

    The kernels' launches are replaced by ones that do nothing, so what is timed is Python, dispatch,
    autograd and the launchers' set-up, on tiny CPU tensors (their own work stays small). The leaves are
    laid out as a model's projections lay q, k and v out (`(B, L, H, D)` with the heads moved), and
    their gradients are cleared before each call, so autograd takes each gradient as it comes instead
    of adding it to the last one. Cases:
    - `fastseq_train` / `fastseq_eval`: one call with the `(32, H)` table and a long padding mask,
      forward and `backward()` (T5's training call: bias, padding, causal, dropout 0.1; its evaluation
      call: bias and padding), autograd's start of a backward included;
    - `fastseq_train_layer`: a stack of HOST_LAYERS such calls, each layer's output the next one's
      queries, one `backward()`, per call: the bias table (`PositionBias`) and the mask (bool) made once
      per forward, as the models make them;
    - `noop_function_layer`: the same stack of an `autograd.Function` that only allocates its output
      and gradients, the floor of a Python autograd op; `torch_mul`, `torch_mul_layer`: a plain op;
    - `bias_grad_sum`: the one reduction of the backward that is arithmetic on the CPU here (the bias
      gradient's partial rows summed per head) and one reduction launch on a GPU;
    - `triton_launch_layer`: what the replaced launches leave out, the launch up to Triton's C launcher
      as the launchers make it (`launch_kernel`), for the launches of `fastseq_train_layer`'s stack;
      `triton_run_layer`: the same launches through Triton's `JITFunction.run` every time (both made
      by `_triton_launches`).
    """
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the launchers; the kernels never run
    os.environ["FASTSEQ_BACKEND"] = "triton"
    # One intra-op thread: the tensors are tiny, and on a loaded machine the calling thread's CPU time
    # counted the time it spent waiting on the others.
    torch.set_num_threads(1)
    from fastseq.kernels.bucketed_attention import PositionBias, bucketed_attention, launch

    for name in [n for n in vars(launch) if n.startswith("_bucketed_attention_") and n.endswith("_kernel")]:
        setattr(launch, name, _NoLaunch(getattr(launch, name)))
    B, H, L, D = 2, 4, 64, 32  # tiny: the tensor work left on the CPU (allocations, small ops) stays small
    g = torch.Generator().manual_seed(0)

    def leaf():
        return torch.randn(B, L, H, D, generator=g).transpose(1, 2).requires_grad_()  # (B, H, L, D)

    q = leaf()
    kv = [(leaf(), leaf()) for _ in range(HOST_LAYERS)]
    table = torch.nn.Parameter(torch.randn(NUM_BUCKETS, H, generator=g) * 0.5)
    mask = torch.ones(B, L, dtype=torch.long)
    grad = torch.ones(B, L, H, D).transpose(1, 2)
    leaves = [q, table, *(t for pair in kv for t in pair)]
    train = dict(causal=True, dropout_p=0.1, bidirectional=False)

    def clear():
        for t in leaves:
            t.grad = None

    def one_call(**kwargs):
        def call():
            clear()
            out = bucketed_attention(q, *kv[0], table, key_padding_mask=mask, max_distance=MAX_DISTANCE, **kwargs)
            out.backward(grad)

        return call

    def stack(attend):
        def call():
            clear()
            x = q
            for k, v in kv:
                x = attend(x, k, v)
            x.backward(grad)

        return call

    def fastseq_layers():
        clear()
        bias = PositionBias(table, bidirectional=False, max_distance=MAX_DISTANCE)
        bool_mask = mask != 0
        x = q
        for k, v in kv:
            x = bucketed_attention(x, k, v, bias, key_padding_mask=bool_mask, max_distance=MAX_DISTANCE, **train)
        x.backward(grad)

    def plain():
        clear()
        q.mul(2.0).backward(grad)

    cut = PositionBias(table, bidirectional=False, max_distance=MAX_DISTANCE).cut
    # One row per dQ program (16-row tiles here), head-major as the dQ kernel writes them.
    partials = torch.zeros(H, B * -(-L // 16), 2 * cut + 1)

    _NoLaunch.launches = []
    fastseq_layers()
    recorded, _NoLaunch.launches = _NoLaunch.launches, None
    triton_launches, triton_runs = _triton_launches(recorded), _triton_launches(recorded, through_run=True)
    cases = (
        ("fastseq_train", one_call(**train), 1),
        ("fastseq_eval", one_call(), 1),
        ("fastseq_train_layer", fastseq_layers, HOST_LAYERS),
        ("noop_function_layer", stack(lambda x, k, v: _NoOp.apply(x, k, v, table)), HOST_LAYERS),
        ("torch_mul", plain, 1),
        ("torch_mul_layer", stack(lambda x, k, v: x.mul(2.0)), HOST_LAYERS),
        ("bias_grad_sum", lambda: partials.sum(1), 1),
        ("triton_launch_layer", triton_launches, HOST_LAYERS),
        ("triton_run_layer", triton_runs, HOST_LAYERS),
    )
    rows = []
    for name, call, per in cases:
        for _ in range(10):
            call()
        samples = []
        for _ in range(reps):
            start = time.thread_time()
            for _ in range(calls):
                call()
            samples.append((time.thread_time() - start) / (calls * per) * 1e6)
        row = {"provider": name, "B": B, "H": H, "L": L, "D": D, "host_us": Timing.of(samples)}
        rows.append(row)
        print(f"{name}: {float(row['host_us']):.1f} us of host work per forward + backward", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="B * L")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--providers", nargs="+", default=["fastseq", "hf_eager", "hf_sdpa", "flex"])
    parser.add_argument("--host", action="store_true", help="host time per call on the CPU, kernels not launched")
    parser.add_argument("--label", default="", help="--host: what code was timed (a commit), kept in the rows")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.host:
        what = "host time per forward + backward (thread CPU time)" + (f"; {args.label}" if args.label else "")
        write_csv([row | provenance("cpu", what) for row in host_time()], args.out)
        return 0

    device = smoke_setup(args.smoke)
    if args.smoke:
        args.tokens, args.lengths, args.heads, args.head_dim, args.dtype = 64, [16, 32], 2, 16, "float32"
    dtype = getattr(torch, args.dtype)
    fns = {k: v for k, v in _providers().items() if k in args.providers}
    if "flex" in args.providers and device == "cuda":  # FlexAttention has no backward on the CPU
        fns["flex"] = _flex_provider(compiled=True)

    meta = provenance(device, "fwd 4*B*H*L*L*D; bwd 2.5x; full 3.5x")
    # At the first timed shape: FlexAttention, compiled for each shape it meets, compiles nothing more for it.
    first = args.lengths[0]
    agreement = check_agreement(fns, max(1, args.tokens // first), args.heads, first, args.head_dim, dtype, device)
    print("largest relative difference from hf_eager (out and all grads): "
          + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))  # fmt: skip
    rows = []
    for L in args.lengths:
        B = max(1, args.tokens // L)
        for name, make in fns.items():
            try:
                row = measure(name, make, B, args.heads, L, args.head_dim, dtype, device)
            except torch.OutOfMemoryError:
                row = {"provider": name, "B": B, "H": args.heads, "L": L, "D": args.head_dim, "fwd_ms": "OOM"}
                torch.cuda.empty_cache()
            row.update(meta, max_rel_diff_vs_eager=f"{agreement[name]:.2e}")
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items() if k not in meta), flush=True)
    by = {(r["provider"], r["L"]): r for r in rows}
    for L in args.lengths:
        ours = by.get(("fastseq", L))
        if ours is None or not isinstance(ours.get("full_ms"), float):
            continue
        ratios = [f"{p} {r['full_ms'] / ours['full_ms']:.2f}x" for (p, length), r in by.items()
                  if length == L and p != "fastseq" and isinstance(r.get("full_ms"), float)]  # fmt: skip
        print(f"L={L}: fastseq full {ours['full_tflops']} TFLOP/s; speed-up over " + ", ".join(ratios))
    write_csv(rows, args.out)
    return 0 if math.isfinite(max(agreement.values())) else 1


if __name__ == "__main__":
    sys.exit(main())
