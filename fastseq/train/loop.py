"""The training loop, once for every engine: steps, accumulation, the schedule, logging to
`metrics.jsonl`, evaluation, checkpoints, resume, signals and the summary line.

Checkpoints (`OUTPUT/checkpoint-STEP/`, every `--save-every` steps, on SIGINT/SIGTERM and at the
end) hold the engine's state (a Hugging Face model directory and the optimizer in safetensors for
one process; DeepSpeed's files otherwise), the tokenizer, `trainer_state.json` (step, data
position, the run's identity) and each rank's RNG. Each is written under a temporary name and
renamed into place once every rank has finished, so a crash never leaves a half-written one.
`--resume` continues from one exactly: on the CPU, 10 steps + resume + 10 steps give bit-for-bit
the losses of 20 steps, and so does a run stopped by a signal and resumed."""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastseq.files import atomic_write, publish_directory
from fastseq.tokenizers import Tokenizer

from .args import TrainArgs
from .data import Data, build_data
from .engine import Engine, LocalEngine, NonFiniteError, model_config, run_device, run_tokenizer
from .state import (
    args_record,
    check_identity,
    find_checkpoint,
    load_rng,
    prepare_output_dir,
    read_state,
    run_identity,
    save_rng,
    write_state,
)

log = logging.getLogger("fastseq.train")
_SIGNALS = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


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


def make_engine(args: TrainArgs, config) -> Engine:
    if args.deepspeed:
        from fastseq.distributed import deepspeed_engine

        return deepspeed_engine(args, config)
    return LocalEngine(args, run_device(args))


class _Signals:
    """SIGINT and SIGTERM (a scheduler's notice before preemption) end the run after the current
    step, with a checkpoint. The handlers are this run's only while it runs."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for number in _SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        self.received = number

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class _Metrics:
    """`metrics.jsonl` on the first rank: one JSON object per line, never NaN or infinity."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():  # drop what came after the checkpoint
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except ValueError:
        return math.inf


class _Run:
    """One run of the loop: the engine, the data and where everything is written."""

    def __init__(self, args: TrainArgs, engine: Engine, tokenizer: Tokenizer, data: Data, identity: dict, out: Path):
        self.args, self.engine, self.tokenizer, self.data, self.identity, self.out = (
            args, engine, tokenizer, data, identity, out)  # fmt: skip
        self.last_checkpoint: Path | None = None
        self.metrics: _Metrics | None = None
        self.evaluating = bool(data.held_out) and engine.model is not None
        self.losses: list[tuple[int, float]] = []  # (step, loss)
        self.evals: list[tuple[int, float]] = []  # (step, eval loss)
        self.final: dict = {}  # the final held-out scores
        self.outputs: list[str] = []  # the greedy outputs of the last evaluation
        self.window, self.window_tokens = time.perf_counter(), 0.0  # tokens/s since the last logged step

    def resume(self) -> int:
        path = find_checkpoint(self.args)
        state = read_state(path)
        check_identity(path, state.get("run"), self.identity)
        if state.get("world_size", 1) != self.engine.world:
            log.warning("resuming a %s-rank checkpoint on %s ranks", state.get("world_size"), self.engine.world)
        self.engine.load(path, state["engine"])
        self.data.load_state_dict(state["data"])
        load_rng(path, self.engine.rank)
        self.last_checkpoint = path
        return int(state["step"])

    def checkpoint(self, step: int) -> Path:
        engine, first = self.engine, self.engine.rank == 0
        final, tmp = self.out / f"checkpoint-{step}", self.out / f".checkpoint-{step}.tmp"
        if first and tmp.exists():
            shutil.rmtree(tmp)
        engine.barrier()
        if first:
            tmp.mkdir()
        engine.barrier()
        meta = engine.save(tmp)
        save_rng(tmp, engine.rank)
        engine.barrier()
        if first:
            self.tokenizer.save_pretrained(tmp)
            write_state(tmp, {"step": step, "run": self.identity, "data": self.data.state_dict(), "engine": meta,
                              "world_size": engine.world, "args": args_record(self.args)})  # fmt: skip
            publish_directory(tmp, final)
        engine.barrier()
        self.last_checkpoint = final
        return final

    def step(self, done: int, signals: _Signals) -> tuple[dict, bool]:
        """Step `done` (1-based): its record in metrics.jsonl, and whether a signal ends the run."""
        args, engine, data = self.args, self.engine, self.data
        micro = [data.micro_batch(engine.data_parallel, engine.data_rank) for _ in range(args.grad_accum)]
        loss = engine.forward_backward([batch for batch, _ in micro])
        # The step's only synchronisation: the loss, the tokens and any signal, summed over the ranks.
        signalled = float(signals.received is not None)
        loss_sum, tokens, stop = engine.sum_over_ranks([float(loss), float(sum(n for _, n in micro)), signalled])
        mean_loss = loss_sum / engine.world
        try:
            if not math.isfinite(mean_loss):
                raise NonFiniteError(f"the loss is {mean_loss}")
            grad_norm = engine.step()
        except NonFiniteError as err:
            last = self.last_checkpoint
            where = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written"
            raise NonFiniteError(
                f"step {done}: {err}, so the run stopped before saving anything of it ({where}); lower --lr, "
                "then start again or --resume"
            ) from None
        record = {"step": done, "loss": mean_loss, "lr": engine.learning_rate()}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        self.window_tokens += tokens * engine.data_parallel / engine.world  # pipeline stages share batches
        if done % args.log_every == 0 or done == args.steps:
            now = time.perf_counter()
            record["tokens_per_s"] = self.window_tokens / max(now - self.window, 1e-9)
            self.window_tokens, self.window = 0, now
            if engine.device.type == "cuda":
                record["peak_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
        self.losses.append((done, mean_loss))
        if self.evaluating and args.eval_every and done % args.eval_every == 0 and done != args.steps:
            record.update(self.evaluate(done))
        self.metrics.write(record)
        if stop and done != args.steps:
            return record, True
        if args.save_every and done % args.save_every == 0 and done != args.steps:
            self.checkpoint(done)
        return record, False

    def finish(self) -> Path:
        """The final evaluation, checkpoint and model directory; returns the checkpoint."""
        if self.evaluating:
            self.final = self.evaluate(self.args.steps)
            self.metrics.write({"step": self.args.steps, **self.final})
        path = self.checkpoint(self.args.steps)
        self.engine.save_model(self.out, path)
        if self.engine.rank == 0:
            self.tokenizer.save_pretrained(self.out)
            steps, losses = zip(*self.losses, strict=True)
            plot_losses(self.out / "loss.png", list(steps), list(losses), self.evals)
        return path

    def summary(self, start: int, elapsed: float, path: Path, stopped_by: int | None) -> dict:
        """The summary line (and a few held-out outputs) on the first rank; the summary dict."""
        last_step, loss = self.losses[-1]
        interrupted = _SIGNALS[stopped_by] if stopped_by is not None else None
        if self.engine.rank == 0:
            line = f"fastseq train ({self.engine.name}): steps {start}-{last_step} in {elapsed:.1f}s"
            line += f", final loss {loss:.4f}"
            if "exact_match" in self.final:
                line += f", held-out exact match {self.final['exact_match']:.1%} ({len(self.data.held_out)} examples)"
            print(line + f", checkpoint in {self.out} ({path.name})")
            if interrupted:
                print(f"fastseq train: stopped by {interrupted} after step {last_step}; continue with the same "
                      "command and --resume")  # fmt: skip
            shown = min(self.args.examples_to_show, len(self.outputs))
            for (source, target), output in zip(self.data.held_out[:shown], self.outputs[:shown], strict=True):
                print(f"  {source!r} -> {output!r} (target {target!r})")
        losses = [value for _, value in self.losses]
        return {"loss": loss, "losses": losses, "seconds": elapsed, "interrupted": interrupted, **self.final}

    def evaluate(self, step: int) -> dict:
        engine = self.engine
        scores, self.outputs = evaluate(engine.model, self.tokenizer, self.data.held_out, self.data.eval_collator,
                                        engine.device, autocast=engine.autocast)  # fmt: skip
        self.evals.append((step, scores["eval_loss"]))
        return scores


def train(args: TrainArgs) -> dict:
    """Run `fastseq train`; returns the summary (final loss, losses, seconds, held-out scores,
    and `interrupted`: the name of the signal that stopped the run, or None)."""
    args.validate()
    config = model_config(args)
    tokenizer = run_tokenizer(args, config)
    engine = make_engine(args, config)
    out = engine.on_first_rank(prepare_output_dir, args)
    data = build_data(args, tokenizer, config, engine.data_parallel)  # also sets --epochs' steps
    identity = run_identity(args, config, tokenizer, data.fingerprint_path)
    torch.manual_seed(args.seed)
    engine.build(config)
    run = _Run(args, engine, tokenizer, data, identity, out)
    start = run.resume() if args.resume else 0
    if start >= args.steps:
        raise ValueError(f"the checkpoint is at step {start}, already past --steps {args.steps}; raise --steps")
    run.metrics = _Metrics(out / "metrics.jsonl", start if args.continues_in_output_dir else None, engine.rank == 0)
    if data.held_out and engine.model is None:
        log.warning("%s cannot evaluate held-out examples; evaluate the trained model directory instead", engine.name)
    progress = tqdm(range(start, args.steps), desc="train", unit="step", disable=args.quiet or engine.rank != 0,
                    file=sys.stderr)  # fmt: skip
    started = time.perf_counter()
    with _Signals() as signals:
        for step in progress:
            record, stop = run.step(step + 1, signals)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            if stop:
                stopped_by = signals.received or signal.SIGTERM  # or another rank received it
                path = run.checkpoint(step + 1)
                break
        else:
            stopped_by = None
            path = run.finish()
        progress.close()
    summary = run.summary(start, time.perf_counter() - started, path, stopped_by)
    engine.close()
    return summary
