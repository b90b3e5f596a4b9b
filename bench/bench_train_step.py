"""One training step (forward + backward) of the native model, `transformers` (eager and SDPA) and
`transformers` patched by fastseq, side by side.

All models hold the same weights (the Hugging Face model is saved and loaded
through fastseq's loader) and see the same batch. Providers are interleaved
round by round so that machine noise hits them alike; the median is reported.
On a GPU the step runs under bf16 autocast, is timed with CUDA events, and the
peak memory of one step is measured per provider.

    python bench/bench_train_step.py --preset google/t5-v1_1-small --layers 4 --out bench/results/train_step_cpu.csv
    python bench/bench_train_step.py --preset google/t5-v1_1-base --layers 12 --batch 16 \
        --source-len 512 --target-len 128 --out bench/results/train_step_h100.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import fastseq
from fastseq import presets


def _hf_model(name: str, layers: int, attn: str):
    import transformers as tf

    config = presets.config(name, num_layers=layers, num_decoder_layers=layers, dropout_rate=0.0)
    hf_cls = {
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration),
        "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration),
        "longt5": (tf.LongT5Config, tf.LongT5ForConditionalGeneration),
    }[config.model_type]
    fields = {k: v for k, v in config.to_hf_dict().items() if k != "model_type"}
    hf_config = hf_cls[0](**fields)
    hf_config._attn_implementation = attn
    torch.manual_seed(0)
    return hf_cls[1](hf_config)


def _step(model, inputs, device: str) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(**inputs)
    out.loss.backward()


def _timed(model, inputs, device: str) -> float:
    """Seconds of one step (CUDA events on a GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(model, inputs, device)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    _step(model, inputs, device)
    return time.perf_counter() - start


def _peak_mib(model, inputs, device: str) -> float:
    if device != "cuda":
        return float("nan")
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _step(model, inputs, device)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="google/t5-v1_1-small")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source-len", type=int, default=128)
    parser.add_argument("--target-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    hf_eager = _hf_model(args.preset, args.layers, "eager").train()
    with tempfile.TemporaryDirectory() as tmp:
        hf_eager.save_pretrained(tmp)
        native = fastseq.from_pretrained(tmp).train()
    hf_sdpa = _hf_model(args.preset, args.layers, "sdpa").train()
    hf_sdpa.load_state_dict(hf_eager.state_dict())
    hf_patched = fastseq.patch(_hf_model(args.preset, args.layers, "sdpa").train())
    hf_patched.load_state_dict(hf_eager.state_dict())
    providers = {"fastseq": native, "hf_eager": hf_eager, "hf_sdpa": hf_sdpa, "hf_patched": hf_patched}
    for model in providers.values():
        model.to(device)
    vocab = native.config.vocab_size
    g = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(2, vocab, (args.batch, args.source_len), generator=g),
        "attention_mask": torch.ones(args.batch, args.source_len, dtype=torch.long),
        "labels": torch.randint(2, vocab, (args.batch, args.target_len), generator=g),
    }
    inputs["attention_mask"][0, -17:] = 0
    inputs = {k: v.to(device) for k, v in inputs.items()}
    losses = {name: model(**inputs).loss.item() for name, model in providers.items()}
    peaks = {}
    for name, model in providers.items():  # warm-up, then the peak of one step
        _step(model, inputs, device)
        peaks[name] = _peak_mib(model, inputs, device)
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(args.rounds):
        for name, model in providers.items():
            times[name].append(_timed(model, inputs, device))
    rows = []
    base = statistics.median(times["hf_eager"])
    sdpa = statistics.median(times["hf_sdpa"])
    for name in providers:
        median = statistics.median(times[name])
        tokens = args.batch * (args.source_len + args.target_len)
        rows.append(
            {
                "provider": name,
                "preset": args.preset,
                "layers": args.layers,
                "batch": args.batch,
                "source_len": args.source_len,
                "target_len": args.target_len,
                "median_s": f"{median:.4f}",
                "tokens_per_s": f"{tokens / median:.0f}",
                "speedup_vs_hf_eager": f"{base / median:.3f}",
                "speedup_vs_hf_sdpa": f"{sdpa / median:.3f}",
                "peak_mib": f"{peaks[name]:.0f}",
                "peak_vs_hf_sdpa": f"{peaks[name] / peaks['hf_sdpa']:.3f}" if device == "cuda" else "nan",
                "precision": "bf16 autocast" if device == "cuda" else "fp32",
                "loss": f"{losses[name]:.6f}",
                "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "date": datetime.date.today().isoformat(),
            }
        )
    for row in rows:
        print(
            f"{row['provider']:>10}: {row['median_s']} s/step  {row['tokens_per_s']} tok/s  "
            f"x{row['speedup_vs_hf_eager']} vs hf_eager  x{row['speedup_vs_hf_sdpa']} vs hf_sdpa  "
            f"peak {row['peak_mib']} MiB  loss {row['loss']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
