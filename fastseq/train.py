"""`fastseq train`: the training loop and its command line.

With no arguments it runs the embedded default: a small T5 v1.1 with the ByT5 tokenizer, trained
on a synthetic text-to-text task generated in memory (reverse a word), on whatever device is
there. With `--model PRESET_OR_DIR --data FILE --task seq2seq|denoise` it fine-tunes a model on a
JSONL/CSV/TSV file (seq2seq) or on plain text with T5's span corruption (denoise).

The loop: Adafactor (the default, T5's optimizer) or AdamW, a learning-rate schedule, gradient
accumulation, clipping, bf16 autocast on a GPU (fp16 refused for T5-family models unless
forced), gradient checkpointing, evaluation (loss and exact match from greedy decoding),
metrics to `metrics.jsonl` and the console, a progress bar, a loss curve (`loss.png`) and a
final summary line.

Checkpoints (`OUTPUT/checkpoint-STEP/`, every `--save-every` steps and at the end) hold the model
and tokenizer in the Hugging Face format plus `trainer_state.json` (step, data position, RNG of
the data) and `trainer_state.safetensors` (optimizer and RNG tensors; no pickle anywhere). Each is
written to a temporary directory and renamed into place. `--resume` continues from the latest one
exactly: on the CPU, 10 steps + resume + 10 steps give bit-for-bit the losses of 20 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import presets
from .checkpoint import atomic_write, from_pretrained
from .data import (
    Seq2SeqCollator,
    SpanCorruptionCollator,
    bucketed_batches,
    read_examples,
    read_text,
    rng_state,
    set_rng_state,
)
from .models import T5Config, T5ForConditionalGeneration
from .optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule
from .tokenizers import ByT5Tokenizer, Tokenizer, check_vocabulary, load_tokenizer

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_T5_FAMILY = ("t5", "mt5", "longt5", "umt5")


@dataclass
class TrainArgs:
    model: str | None = None  # preset name or checkpoint directory; None: the embedded default model
    tokenizer: str | None = None  # directory; default: the model's directory (ByT5 for the default)
    data: str | None = None  # training file; None: the synthetic default task
    eval_data: str | None = None
    task: str = "seq2seq"  # or "denoise"
    source_field: str = "source"
    target_field: str = "target"
    output_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 64
    max_tokens: int | None = None  # token budget per batch instead of batch_size (file data)
    buffer_size: int = 100_000  # examples read, length-bucketed and shuffled at a time (file data)
    grad_accum: int = 1
    optimizer: str = "adafactor"  # T5's optimizer
    lr: float | None = None  # None with adafactor: relative step from scratch, 1e-3 for a pretrained directory
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0
    max_source_length: int = 512
    max_target_length: int = 128
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    force_fp16: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 0
    eval_examples: int = 256
    save_every: int = 0
    log_every: int = 20
    seed: int = 0
    device: str | None = None
    resume: str | None = None  # "latest" or a checkpoint directory
    deepspeed: str | None = None  # a DeepSpeed JSON config: train under the `deepspeed` launcher
    quiet: bool = False
    examples_to_show: int = 3
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Data streams: the next batch of examples, and a position that a checkpoint can restore
# --------------------------------------------------------------------------------------------


def make_examples(n: int, rng: random.Random, min_len: int = 3, max_len: int = 8) -> list[tuple[str, str]]:
    """The default task: reverse a random lower-case word."""
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]
    return [(f"reverse: {w}", w[::-1]) for w in words]


class SyntheticStream:
    def __init__(self, batch_size: int, seed: int):
        self.batch_size = batch_size
        self.rng = random.Random(seed)

    def next_batch(self) -> list[tuple[str, str]]:
        return make_examples(self.batch_size, self.rng)

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])


class FileStream:
    """The examples of a file, read as a stream: `buffer_size` examples at a time are cut into
    length-bucketed batches and shuffled (seeded by epoch and buffer), so memory holds one buffer,
    never the file. Its position is (epoch, buffer, batch); resuming re-reads up to that buffer."""

    def __init__(self, open_reader, length, *, batch_size: int, max_tokens: int | None, seed: int,
                 buffer_size: int = 100_000):  # fmt: skip
        self.open_reader, self.length = open_reader, length
        self.batch_size, self.max_tokens, self.seed, self.buffer_size = batch_size, max_tokens, seed, buffer_size
        self.epoch, self.buffer, self.index = 0, 0, 0
        self._reader = open_reader()
        self._fill()
        if not self._examples:
            raise ValueError("the training data has no examples")

    def _fill(self) -> None:
        """Read the next buffer and batch it."""
        self._examples = [x for _, x in zip(range(self.buffer_size), self._reader, strict=False)]
        lengths = [self.length(x) for x in self._examples]
        sizes = dict(max_tokens=self.max_tokens) if self.max_tokens else dict(batch_size=self.batch_size)
        seed = (self.seed * 100003 + self.epoch) * 100003 + self.buffer
        self._batches = bucketed_batches(self._examples, lengths, seed=seed, **sizes) if self._examples else []

    def next_batch(self) -> list:
        while self.index >= len(self._batches):
            self.buffer, self.index = self.buffer + 1, 0
            self._fill()
            if not self._examples:  # the file is done: the next epoch starts over
                self.epoch, self.buffer = self.epoch + 1, 0
                self._reader = self.open_reader()
                self._fill()
        batch = [self._examples[i] for i in self._batches[self.index]]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": self.buffer, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.buffer, self.index = state["epoch"], state["buffer"], state["index"]
        self._reader = self.open_reader()
        for _ in zip(range(self.buffer * self.buffer_size), self._reader, strict=False):
            pass
        self._fill()


# --------------------------------------------------------------------------------------------
# Model, tokenizer, precision
# --------------------------------------------------------------------------------------------


def default_config() -> T5Config:
    """A small T5 v1.1 with the ByT5 vocabulary."""
    return T5Config(
        vocab_size=384,
        d_model=128,
        d_kv=32,
        d_ff=384,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )


def _model_and_tokenizer(args: TrainArgs, device: torch.device):
    if args.model is None:
        model = T5ForConditionalGeneration(default_config())
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else ByT5Tokenizer()
    elif Path(args.model).is_dir():
        model = from_pretrained(args.model)
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    elif args.model in presets.PRESETS:
        if not args.tokenizer and "byt5" not in args.model:
            raise ValueError(
                f"preset {args.model!r} is built with random weights and needs a tokenizer: pass "
                "--tokenizer DIR (a directory with spiece.model or vocab.json + merges.txt)"
            )
        model = presets.build(args.model)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else ByT5Tokenizer()
    else:
        raise ValueError(f"--model {args.model!r} is neither a directory nor a preset; known presets: "
                         f"{', '.join(presets.PRESETS)}")  # fmt: skip
    check_vocabulary(tokenizer, model.config.vocab_size)
    return model.to(device), tokenizer


def _autocast_dtype(args: TrainArgs, model, device: torch.device) -> torch.dtype | None:
    """None for fp32; bf16/fp16 autocast otherwise."""
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if getattr(model.config, "model_type", "") in _T5_FAMILY and not args.force_fp16:
            raise ValueError(
                "fp16 is refused for T5-family models: their activations (the FFN output in particular) "
                "overflow fp16's range of 65504 in pretrained checkpoints and the loss turns to NaN. Use "
                "--precision bf16 (Ampere or newer), fp32, or pass --force-fp16 to train in fp16 anyway"
            )
        return torch.float16
    raise ValueError(f"--precision must be auto, fp32, bf16 or fp16; got {precision!r}")


# --------------------------------------------------------------------------------------------
# Checkpoints (no pickle: tensors in safetensors, the rest in JSON)
# --------------------------------------------------------------------------------------------


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _atomic_directory(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(path: Path, *, model, tokenizer, optimizer, scheduler, stream, collator, step, args) -> None:
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tensors, optimizer_meta = _optimizer_tensors(optimizer)
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda/{i}"] = s
        save_file(tensors, str(tmp / "trainer_state.safetensors"))
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {
            "step": step,
            "optimizer": optimizer_meta,
            "scheduler": scheduler_state,
            "data": stream.state_dict(),
            "collator": collator.state_dict() if hasattr(collator, "state_dict") else None,
            "args": {k: v for k, v in dataclasses.asdict(args).items() if k != "extra"},
        }
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1) + "\n")

    _atomic_directory(path, write)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = []
    for p in output_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if match and (p / "trainer_state.json").is_file():
            found.append((int(match[1]), p))
    return max(found)[1] if found else None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, stream, collator) -> int:
    meta = json.loads((path / "trainer_state.json").read_text())
    tensors = load_file(str(path / "trainer_state.safetensors"))
    state = from_pretrained(path).state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value.copy_(state[name])
    _load_optimizer(optimizer, tensors, meta["optimizer"])
    scheduler_state = dict(meta["scheduler"])
    if "base_lrs" in scheduler_state:  # a LambdaLR: its functions are rebuilt, not stored
        scheduler_state["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(scheduler_state)
    stream.load_state_dict(meta["data"])
    if meta.get("collator") is not None and hasattr(collator, "load_state_dict"):
        collator.load_state_dict(meta["collator"])
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return int(meta["step"])


# --------------------------------------------------------------------------------------------
# Evaluation and reporting
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, tokenizer: Tokenizer, examples, collator, device, *, batch_size: int = 64, autocast=None):
    """Mean loss over target tokens and exact match of greedy outputs (special tokens skipped)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens, hits, outputs = 0.0, 0, 0, []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(**batch, return_logits=False).loss
            tokens = int((batch["labels"] != -100).sum())
            total_loss += loss.item() * tokens
            total_tokens += tokens
            generated = model.generate(
                batch["input_ids"], batch["attention_mask"], max_new_tokens=batch["labels"].shape[1] + 2
            )
        texts = tokenizer.batch_decode(generated[:, 1:], skip_special_tokens=True)
        for text, (_, target) in zip(texts, chunk, strict=True):
            hits += text.strip() == target.strip()
            outputs.append(text)
    model.train(was_training)
    return {"eval_loss": total_loss / max(total_tokens, 1), "exact_match": hits / max(len(examples), 1)}, outputs


def plot_losses(path: Path, steps: list[int], losses: list[float], evals: list[tuple[int, float]]) -> None:
    """The training loss (and eval loss) against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, label="train loss", linewidth=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _data(args: TrainArgs, tokenizer: Tokenizer):
    """The training stream, the collator and the held-out examples."""
    if args.task not in ("seq2seq", "denoise"):
        raise ValueError(f"--task must be seq2seq or denoise; got {args.task!r}")
    if args.data is None:
        stream = SyntheticStream(args.batch_size, args.seed)
        held_out = make_examples(args.eval_examples, random.Random(args.seed + 1))
        return stream, Seq2SeqCollator(tokenizer), held_out, Seq2SeqCollator(tokenizer)
    sizes = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed,
                 buffer_size=args.buffer_size)  # fmt: skip
    if args.task == "denoise":
        collator = SpanCorruptionCollator(tokenizer, input_length=args.max_source_length, seed=args.seed)
        stream = FileStream(lambda: read_text(args.data), len, **sizes)
        return stream, collator, [], None
    collator = Seq2SeqCollator(tokenizer, max_source_length=args.max_source_length,
                               max_target_length=args.max_target_length)  # fmt: skip
    stream = FileStream(lambda: read_examples(args.data, args.source_field, args.target_field),
                        lambda pair: len(pair[0]) + len(pair[1]), **sizes)  # fmt: skip
    held_out = []
    if args.eval_data:
        held_out = list(read_examples(args.eval_data, args.source_field, args.target_field))[: args.eval_examples]
    return stream, collator, held_out, collator


def train(args: TrainArgs) -> dict:
    if args.deepspeed:
        from .distributed.engine import train_deepspeed

        return train_deepspeed(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    model, tokenizer = _model_and_tokenizer(args, device)
    autocast = _autocast_dtype(args, model, device)
    model.gradient_checkpointing_enable(args.gradient_checkpointing)
    stream, collator, held_out, eval_collator = _data(args, tokenizer)
    if args.grad_accum < 1 or args.steps < 1:
        raise ValueError("--steps and --grad-accum must be >= 1")
    lr = args.lr
    if lr is None and args.optimizer == "adafactor" and args.model is not None and Path(args.model).is_dir():
        lr = 1e-3  # fine-tuning a pretrained model: a fixed rate, not the relative step of training from scratch
    optimizer = make_optimizer(args.optimizer, model.parameters(), lr=lr, weight_decay=args.weight_decay)
    scheduler = make_schedule(optimizer, args.schedule, warmup_steps=args.warmup, total_steps=args.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast is torch.float16)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start_step = 0
    if args.resume:
        path = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
        if path is None or not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from in {path or out}")
        start_step = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, stream=stream,
                                     collator=collator)  # fmt: skip
    if start_step >= args.steps:
        raise ValueError(f"the checkpoint is at step {start_step}, already past --steps {args.steps}")
    log_path = out / "metrics.jsonl"
    if not args.resume and log_path.exists():
        log_path.unlink()
    logged_steps, logged_losses, evals = [], [], []
    model.train()
    started = time.perf_counter()
    window_tokens, window_start = 0, time.perf_counter()
    progress = tqdm(range(start_step, args.steps), desc="train", unit="step", disable=args.quiet, file=sys.stderr)

    def checkpoint(step: int) -> Path:
        path = out / f"checkpoint-{step}"
        save_checkpoint(path, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                        stream=stream, collator=collator, step=step, args=args)  # fmt: skip
        return path

    with log_path.open("a") as log:
        for step in progress:
            loss_sum = 0.0
            for _ in range(args.grad_accum):
                batch = {k: v.to(device) for k, v in collator(stream.next_batch()).items()}
                window_tokens += int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    loss = model(**batch).loss / args.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.item()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else math.inf)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"the loss is {loss_sum} at step {done}; lower --lr or use --precision fp32")
            record = {"step": done, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
            if done % args.log_every == 0 or done == args.steps:
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                window_tokens, window_start = 0, time.perf_counter()
                progress.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            logged_steps.append(done)
            logged_losses.append(loss_sum)
            if held_out and args.eval_every and done % args.eval_every == 0 and done != args.steps:
                scores, _ = evaluate(model, tokenizer, held_out, eval_collator, device, autocast=autocast)
                record.update(scores)
                evals.append((done, scores["eval_loss"]))
            log.write(json.dumps(record) + "\n")
            log.flush()
            if args.save_every and done % args.save_every == 0 and done != args.steps:
                checkpoint(done)
        progress.close()
        final = {"step": args.steps}
        outputs = []
        if held_out:
            scores, outputs = evaluate(model, tokenizer, held_out, eval_collator, device, autocast=autocast)
            final.update(scores)
            evals.append((args.steps, scores["eval_loss"]))
            log.write(json.dumps(final) + "\n")
    path = checkpoint(args.steps)
    model.save_pretrained(out)  # the final model also at the top of the output directory
    tokenizer.save_pretrained(out)
    if logged_steps:
        plot_losses(out / "loss.png", logged_steps, logged_losses, evals)
    elapsed = time.perf_counter() - started
    summary = {"loss": logged_losses[-1] if logged_losses else float("nan"), "seconds": elapsed, **final}
    line = f"fastseq train: steps {start_step}-{args.steps} on {device} in {elapsed:.1f}s"
    line += f", final loss {summary['loss']:.4f}"
    if "exact_match" in final:
        line += f", held-out exact match {final['exact_match']:.1%} ({len(held_out)} examples)"
    print(line + f", checkpoint in {out} ({path.name})")
    shown = min(args.examples_to_show, len(outputs))
    for (source, target), output in zip(held_out[:shown], outputs[:shown], strict=True):
        print(f"  {source!r} -> {output!r} (target {target!r})")
    return summary


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainArgs()
    parser.add_argument("--config", default=None, help="a YAML file of these options (command-line flags win)")
    parser.add_argument("--model", default=None, help="preset name or checkpoint directory (default: a small T5 v1.1)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument("--data", default=None, help=".jsonl/.csv/.tsv (seq2seq) or .txt (denoise); default: synthetic")
    parser.add_argument("--eval-data", default=None)
    parser.add_argument("--task", default=None, choices=["seq2seq", "denoise"])
    parser.add_argument("--source-field", default=None)
    parser.add_argument("--target-field", default=None)
    parser.add_argument("--output-dir", "--output", dest="output_dir", default=None, help=f"default {d.output_dir}")
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per batch instead of --batch-size")
    parser.add_argument("--buffer-size", type=int, default=None, help="examples shuffled and bucketed at a time")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate; adafactor's default: its relative step from scratch, 1e-3 for a "
                             "pretrained directory (0: relative step); adamw needs one")  # fmt: skip
    parser.add_argument("--schedule", default=None, choices=SCHEDULES)
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--clip", type=float, default=None, help="gradient-norm clipping (0: none)")
    parser.add_argument("--max-source-length", type=int, default=None)
    parser.add_argument("--max-target-length", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--force-fp16", action="store_true", default=None, help="allow fp16 for T5-family models")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-examples", type=int, default=None, help="held-out examples for exact match")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint in --output-dir (or from the one given)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    parser.add_argument("--deepspeed", default=None,
                        help="a DeepSpeed JSON config (configs/deepspeed/*.json); start with `deepspeed`")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    values: dict = {}
    if getattr(ns, "config", None):
        import yaml

        loaded = yaml.safe_load(Path(ns.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{ns.config}: expected a mapping of options")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    skipped = ("config", "func", "command", "local_rank")  # the launcher's --local_rank: LOCAL_RANK says the same
    values.update({k: v for k, v in vars(ns).items() if v is not None and k not in skipped})
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; see `fastseq train --help`")
    if values.get("lr") == 0:
        values["lr"] = None
    return TrainArgs(**values)


def run(ns: argparse.Namespace) -> dict:
    return train(args_from_namespace(ns))


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
