"""End-to-end training steps (forward + backward + AdamW step): fastseq's native model, `transformers`
eager, `transformers` SDPA, `transformers` patched by fastseq, and `torch.compile` of each (with
`--compile`), on the same weights and the same random batch, all in one process.

Metrics per provider and workload: time per step (CUDA events on a GPU; p20/p50/p80 of `--steps`
timed steps after `--warmup`), tokens/s (input + target tokens), model FLOP utilization against the
GPU's dense bf16 peak, peak memory of one step. bf16 autocast on a GPU, fp32 on the CPU.

    python bench/bench_train.py --out bench/results/train_h100.csv             # the full list, on a GPU
    python bench/bench_train.py --quick --out bench/results/train_cpu.csv      # tiny models, CPU
    python bench/bench_train.py --default-run --out bench/results/default_run_cpu.csv  # the main job
    python bench/bench_train.py --packing --out bench/results/packing_h100.csv      # batchings, on a GPU
    python bench/bench_train.py --packing --quick --steps 8 --warmup 2 --passes 5 --out bench/results/packing_cpu.csv

`--default-run` times the main job itself (`fastseq train` with no arguments: 1000 Adafactor steps of
the embedded default, then the held-out evaluation and the checkpoint) on whatever device is there,
and records its held-out exact match next to the time.

`--packing` trains one model on a FLAN-like mixture (log-normal lengths, drawn with a fixed seed:
sources of median 150 tokens with a tail to the 2,048 of --max-source-length, targets of median 24
up to 256; --quick scales every length by 1/4) batched three ways on the same token budget (rows x
2,048 tokens a side): padded random batches of rows examples, as `transformers`'
DataCollatorForSeq2Seq gives them; fastseq's length-bucketed batches (`bucketed_batches`, at most
the budget in padded tokens); packed rows (`packed_batches`, best-fit decreasing, and the
`PackingCollator`). It reports, for each, the real-token fraction of the whole mixture (real
tokens / padded tokens, both sides) and real tokens/s over the same number of timed batches, and
the same for `transformers`' SDPA model on the padded batches.

Model FLOPs per step (written next to the numbers): 6 x (encoder parameters x input tokens +
decoder parameters x target tokens + vocab x d_model x target tokens) + the attention scores:
12 x layers x H x D x (L_q x L_k) for each attention (encoder self, decoder self, cross); LongT5's
encoder attends to 3 blocks of (radius + 1) keys plus its global tokens instead of L keys.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time

import torch
from _common import Timing, provenance, write_csv

import fastseq
from fastseq import presets

# preset -> (input tokens, target tokens, batch) on a GPU
WORKLOADS = {
    "t5-small": (512, 128, 32),
    "t5-base": (512, 128, 16),
    "t5-large": (512, 128, 8),
    "google/t5-v1_1-small": (512, 128, 32),
    "google/t5-v1_1-base": (512, 128, 16),
    "google/t5-v1_1-large": (512, 128, 8),
    "google/mt5-base": (512, 128, 16),
    "google/byt5-small": (1024, 256, 8),
    "google/long-t5-tglobal-base@4k": (4096, 128, 4),
    "google/long-t5-tglobal-base@16k": (16384, 128, 1),
    "facebook/blenderbot_small-90M": (128, 64, 32),
}
# Tiny versions of each family for --quick (CPU, fp32): what runs is the code path, not the size.
QUICK = {
    "t5-small": (64, 16, 2),
    "google/t5-v1_1-small": (64, 16, 2),
    "google/long-t5-tglobal-base@4k": (96, 16, 2),
    "facebook/blenderbot_small-90M": (64, 16, 2),
}
_TINY = dict(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=128, vocab_size=512)
_TINY_BB = dict(encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=512)  # fmt: skip
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, per the vendors' data sheets


def _config(name: str, quick: bool):
    preset = name.split("@")[0]
    overrides = {}
    if "blenderbot" in preset:
        overrides = dict(_TINY_BB) if quick else {}
        overrides.update(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    else:
        overrides = dict(_TINY) if quick else {}
        overrides["dropout_rate"] = 0.0
        if "long-t5" in preset and quick:
            overrides.update(local_radius=7, global_block_size=4)
    return presets.config(preset, **overrides)


def _hf_model(config, attn: str):
    import transformers as tf

    classes = {
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration),
        "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration),
        "longt5": (tf.LongT5Config, tf.LongT5ForConditionalGeneration),
        "blenderbot-small": (tf.BlenderbotSmallConfig, tf.BlenderbotSmallForConditionalGeneration),
    }
    config_cls, model_cls = classes[config.model_type]
    hf_config = config_cls(**{k: v for k, v in config.to_hf_dict().items() if k != "model_type"})
    hf_config._attn_implementation = attn
    return model_cls(hf_config)


def providers(config, device: str, compile_too: bool) -> dict:
    """name -> model, all with one set of weights."""
    torch.manual_seed(0)
    eager = _hf_model(config, "eager").train()
    with tempfile.TemporaryDirectory() as tmp:
        eager.save_pretrained(tmp)
        native = fastseq.from_pretrained(tmp).train()
    out = {"fastseq": native, "hf_eager": eager}
    try:
        sdpa = _hf_model(config, "sdpa").train()
        sdpa.load_state_dict(eager.state_dict())
        out["hf_sdpa"] = sdpa
    except (ValueError, NotImplementedError) as err:  # LongT5 has no SDPA attention in transformers
        print(f"  hf_sdpa skipped: {str(err).splitlines()[0]}", file=sys.stderr)
    base = out.get("hf_sdpa", eager)
    out["hf_patched"] = fastseq.patch(copy.deepcopy(base))
    for model in out.values():
        model.to(device)
    if compile_too:
        for name in list(out):
            out[f"{name}+compile"] = torch.compile(copy.deepcopy(out[name]))  # weights of its own to update
    return out


def model_flops(config, batch: int, source: int, target: int, params: dict[str, int]) -> float:
    """Training FLOPs of one step (the formula in the module docstring)."""
    dense = 6 * batch * (params["encoder"] * source + params["decoder"] * target + params["head"] * target)
    if config.model_type == "blenderbot-small":
        enc, dec, hd = config.encoder_layers, config.decoder_layers, config.d_model
    else:
        enc, dec, hd = config.num_layers, config.num_decoder_layers, config.num_heads * config.d_kv
    keys = source
    if config.model_type == "longt5":
        keys = min(source, 3 * (config.local_radius + 1)) + source // config.global_block_size
    attention = 12 * batch * hd * (enc * source * keys + dec * (target * target + target * source))
    return float(dense + attention)


def _param_groups(model) -> dict[str, int]:
    encoder = sum(p.numel() for n, p in model.named_parameters() if ".encoder." in f".{n}" and "embed_tokens" not in n)
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".decoder." in f".{n}" and "embed_tokens" not in n)
    return {"encoder": encoder, "decoder": decoder, "head": model.config.vocab_size * model.config.d_model}


def _step(model, optimizer, batch, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _timed(model, optimizer, batch, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(model, optimizer, batch, device)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    _step(model, optimizer, batch, device)
    return (time.perf_counter() - start) * 1e3


def measure(name: str, quick: bool, device: str, *, steps: int, warmup: int, compile_too: bool) -> list[dict]:
    source, target, batch_size = (QUICK if quick else WORKLOADS)[name]
    config = _config(name, quick)
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(3, config.vocab_size, (batch_size, source), generator=g),
        "attention_mask": torch.ones(batch_size, source, dtype=torch.long),
        "labels": torch.randint(3, config.vocab_size, (batch_size, target), generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    models = providers(config, device, compile_too)
    params = _param_groups(models["fastseq"])
    flops = model_flops(config, batch_size, source, target, params)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    meta = provenance(device, f"tokens/s = batch x (input + target) / step; MFU = model FLOPs / step / GPU bf16 "
                              f"peak; model FLOPs/step = {flops:.4g} (see bench_train.py)")  # fmt: skip
    rows = []
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-5) for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    peaks, losses = {}, {}
    for n, m in models.items():  # warm-up (and compilation), then one step's peak memory
        for _ in range(warmup):
            _step(m, optimizers[n], batch, device)
        with torch.no_grad():
            losses[n] = float(m(**batch).loss)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            _step(m, optimizers[n], batch, device)
            torch.cuda.synchronize()
            peaks[n] = torch.cuda.max_memory_allocated() / 2**20
        else:
            peaks[n] = float("nan")
        print(f"{name:>34} {n:>22}: warmed up, loss {losses[n]:.5f}, peak {peaks[n]:.1f} MiB", flush=True)
    for i in range(steps):  # interleaved, so that machine noise hits every provider alike
        for n, m in models.items():
            times[n].append(_timed(m, optimizers[n], batch, device))
        # Each round as it is timed: a run cut short still says what it measured.
        print(f"  step {i + 1}/{steps}: " + ", ".join(f"{n} {t[-1]:.2f} ms" for n, t in times.items()), flush=True)
    tokens = batch_size * (source + target)
    for n in models:
        t = Timing.of(times[n])
        row = {"provider": n, "model": name, "batch": batch_size, "input": source, "target": target,
               "precision": "bf16" if device == "cuda" else "fp32", "step_ms": round(t, 3),
               "step_tokens_per_s": round(tokens / float(t) * 1e3, 1), "step_peak_mib": round(peaks[n], 1),
               "loss": round(losses[n], 5)}  # fmt: skip
        if peak_tflops:
            row["step_mfu_pct"] = round(100 * flops / (float(t) / 1e3) / (peak_tflops * 1e12), 2)
        rows.append(row | meta)
        print(f"{name:>34} {n:>22}: {float(t):9.2f} ms/step  {row['step_tokens_per_s']:>10} tok/s  "
              f"peak {row['step_peak_mib']} MiB  loss {row['loss']}", flush=True)  # fmt: skip
    return rows


# --packing: the mixture at GPU sizes (--quick divides every length by 4), the token budget in rows of
# --max-source-length tokens, and the model of the CPU check.
MIXTURE = dict(source_median=150, source_sigma=1.0, max_source=2048, target_median=24, target_sigma=0.8, max_target=256)
PACKING_ROWS = {False: 16, True: 8}
PACKING_EXAMPLES = {False: 10_000, True: 3_000}
_PACKING_TINY = dict(num_layers=2, num_decoder_layers=2, d_model=256, d_kv=64, num_heads=4, d_ff=1024, vocab_size=384)


def mixture(n: int, scale: float, seed: int = 0) -> list[tuple[int, int]]:
    """(source, target) tokens of `n` FLAN-like examples: log-normal, eos included, cut to the maxima."""
    import math
    import random

    rng = random.Random(seed)

    def draw(median: float, sigma: float, most: int) -> int:
        return max(2, min(most, round(rng.lognormvariate(math.log(median * scale), sigma))))

    m = MIXTURE
    sources = (m["source_median"], m["source_sigma"], round(m["max_source"] * scale))
    targets = (m["target_median"], m["target_sigma"], round(m["max_target"] * scale))
    return [(draw(*sources), draw(*targets)) for _ in range(n)]


def _texts(lengths: list[tuple[int, int]], seed: int = 0) -> list[tuple[str, str]]:
    """Byte-level texts with those token counts (ByT5: a token per byte, and eos)."""
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz ,."
    return [("".join(rng.choices(letters, k=s - 1)), "".join(rng.choices(letters, k=t - 1))) for s, t in lengths]


def batchings(lengths: list[tuple[int, int]], capacity: tuple[int, int], rows: int) -> dict[str, list]:
    """The three batchings of the examples on one budget (`rows` x the source capacity, a side): index
    batches (padded random, bucketed), or batches of rows of indices (packed)."""
    import random

    from fastseq.data import bucketed_batches, packed_batches

    order = list(range(len(lengths)))
    random.Random(1).shuffle(order)
    budget = rows * capacity[0]
    longer = [max(n) for n in lengths]
    return {
        "padded": [order[i : i + rows] for i in range(0, len(order), rows)],
        "bucketed": bucketed_batches(longer, longer, max_tokens=budget, seed=1),
        "packed": packed_batches(lengths, capacity, max_tokens=budget, seed=1),
    }


def real_fraction(lengths: list[tuple[int, int]], batches: list, packed: bool) -> float:
    """Real tokens over padded tokens (both sides) of every batch, each padded to its longest row."""
    real = padded = 0
    for batch in batches:
        rows = [[lengths[i] for i in row] for row in batch] if packed else [[lengths[i]] for i in batch]
        sizes = [(sum(s for s, _ in row), sum(t for _, t in row)) for row in rows]
        real += sum(s + t for s, t in sizes)
        padded += len(sizes) * (max(s for s, _ in sizes) + max(t for _, t in sizes))
    return real / padded


def _real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum() + (batch["labels"] != -100).sum())


def packing(quick: bool, device: str, *, steps: int, warmup: int, passes: int) -> list[dict]:
    """The packing comparison of the module docstring; `steps` timed batches per batching, `passes`
    times over (interleaved), after `warmup` batches each."""
    import transformers as tf

    from fastseq.data import PackingCollator, Seq2SeqCollator
    from fastseq.tokenizers import ByT5Tokenizer

    scale = 0.25 if quick else 1.0
    capacity = (round(MIXTURE["max_source"] * scale), round(MIXTURE["max_target"] * scale))
    rows = PACKING_ROWS[quick]
    lengths = mixture(PACKING_EXAMPLES[quick], scale)
    examples = _texts(lengths)
    name = "google/t5-v1_1-base"
    config = presets.config(name, dropout_rate=0.0, **(_PACKING_TINY if quick else {}))
    collator = Seq2SeqCollator(ByT5Tokenizer(), max_source_length=capacity[0], max_target_length=capacity[1])
    hf_collator = tf.DataCollatorForSeq2Seq(tf.ByT5Tokenizer(), padding="longest", label_pad_token_id=-100)

    def hf_padded(batch):
        encoded = [collator.encode(examples[i]) for i in batch]
        return hf_collator([{"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in encoded])

    collate = {
        "padded": hf_padded,
        "bucketed": lambda batch: collator([examples[i] for i in batch]),
        "packed": lambda batch: PackingCollator(collator)([[examples[i] for i in row] for row in batch]),
    }
    plans = batchings(lengths, capacity, rows)
    fractions = {k: real_fraction(lengths, v, k == "packed") for k, v in plans.items()}
    # provider -> (model, batching); the timed batches are the first `steps` of each (shuffled) list.
    models = providers(config, device, compile_too=False)
    runs = {"fastseq_padded": ("fastseq", "padded"), "fastseq_bucketed": ("fastseq", "bucketed"),
            "fastseq_packed": ("fastseq", "packed")}  # fmt: skip
    if "hf_sdpa" in models:
        runs["hf_sdpa_padded"] = ("hf_sdpa", "padded")
    optimizers = {n: torch.optim.AdamW(models[n].parameters(), lr=1e-5) for n in {m for m, _ in runs.values()}}

    def on_device(batch):
        return {k: v.to(device) for k, v in batch.items()}

    data = {b: [on_device(collate[b](x)) for x in plans[b][: steps + warmup]] for b in plans}
    real = {b: sum(_real_tokens(x) for x in data[b][warmup:]) for b in data}
    for model, batching in runs.values():
        for batch in data[batching][:warmup]:
            _step(models[model], optimizers[model], batch, device)
    rates: dict[str, list[float]] = {p: [] for p in runs}
    peaks = dict.fromkeys(runs, float("nan"))
    for _ in range(passes):
        for provider, (model, batching) in runs.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            elapsed = sum(_timed(models[model], optimizers[model], batch, device) for batch in data[batching][warmup:])
            rates[provider].append(real[batching] / elapsed * 1e3)
            last = rates[provider][-1]
            print(f"  pass {len(rates[provider])}/{passes} {provider}: {last:.1f} real tokens/s", flush=True)
            if device == "cuda":
                peaks[provider] = torch.cuda.max_memory_allocated() / 2**20
    meta = provenance(device, f"real tokens/s = real (not padding) input + target tokens of {steps} batches / their "
                              f"step time; budget {rows} x {capacity[0]} tokens a side; real fraction over "
                              f"{len(lengths)} examples")  # fmt: skip
    out = []
    for provider, (_, batching) in runs.items():
        rate = Timing.of(rates[provider])
        row = {"provider": provider, "model": name + (" (tiny)" if quick else ""), "rows": rows,
               "max_source": capacity[0], "max_target": capacity[1],
               "precision": "bf16" if device == "cuda" else "fp32", "step_real_tokens_per_s": round(rate, 1),
               "real_fraction": round(fractions[batching], 4), "step_peak_mib": round(peaks[provider], 1)}  # fmt: skip
        out.append(row | meta)
        print(f"{provider:>18}: {fractions[batching]:6.1%} real, {float(rate):10.1f} real tokens/s "
              f"(p20 {rate.p20:.1f}, p80 {rate.p80:.1f}), peak {row['step_peak_mib']} MiB", flush=True)  # fmt: skip
    return out


def default_run(runs: int) -> list[dict]:
    """The main job end to end, `runs` times: wall seconds (p20/p50/p80), seconds per step, exact match."""
    from fastseq.train import TrainArgs, train

    seconds, scores = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            summary = train(TrainArgs(quiet=True, output_dir=tmp, examples_to_show=0))
        seconds.append(summary["seconds"] * 1e3)
        scores.append(summary["exact_match"])
        print(f"default run: {summary['seconds']:.1f} s, exact match {summary['exact_match']:.1%}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = Timing.of(seconds)
    steps = TrainArgs().steps
    row = {"provider": "fastseq train (default)", "model": "default", "steps": steps, "run_ms": round(t, 1),
           "step_ms": round(Timing(float(t) / steps, t.p20 / steps, t.p80 / steps), 3),
           "exact_match": round(min(scores), 4)}  # fmt: skip
    return [row | provenance(device, "wall time of `fastseq train` with no arguments, evaluation and save included")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: all of {list(WORKLOADS)}")
    parser.add_argument("--quick", "--smoke", dest="quick", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per provider (default 20; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick 1)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile each provider")
    parser.add_argument("--out", type=__import__("pathlib").Path, default=None)
    parser.add_argument(
        "--default-run",
        type=int,
        nargs="?",
        const=3,
        default=0,
        metavar="RUNS",
        help="time the main job (`fastseq train` with no arguments) RUNS times (default 3) instead",
    )
    parser.add_argument("--packing", action="store_true", help="padded, bucketed and packed batches instead")
    parser.add_argument("--passes", type=int, default=None, help="--packing: timed passes over the batches "
                        "(default 3; quick 1)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.default_run:
        write_csv(default_run(args.default_run), args.out, benchmark="default_run")
        return 0
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.quick:
        raise SystemExit("no CUDA device: run with --quick for the CPU check")
    steps = args.steps or (3 if args.quick else 20)
    warmup = args.warmup or (1 if args.quick else 3)
    if args.packing:
        passes = args.passes or (1 if args.quick else 3)
        write_csv(packing(args.quick, device, steps=steps, warmup=warmup, passes=passes), args.out,
                  benchmark="packing")  # fmt: skip
        return 0
    names = args.models or list(QUICK if args.quick else WORKLOADS)
    rows = []
    for name in names:
        rows += measure(name, args.quick, device, steps=steps, warmup=warmup, compile_too=args.compile)
    write_csv(rows, args.out, benchmark="train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
