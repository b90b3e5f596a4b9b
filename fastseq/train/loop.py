"""The training loop, once for every engine: steps, accumulation, the schedule, evaluation,
checkpoints, resume and the summary line, and the one place that orders what the other modules do:
logging to `metrics.jsonl` (`metrics_log`), checkpoint rotation and keep-best (`rotation`), signals
(`signals`) and the loss plot (`plot`).

Checkpoints (`OUTPUT/checkpoint-STEP/`, every `--save-every` steps, on SIGINT/SIGTERM/SIGHUP, on an
error mid-run and at the end) hold the engine's state (a Hugging Face model directory and the
optimizer in safetensors for one process; DeepSpeed's files otherwise), the tokenizer,
`trainer_state.json` (step, data position, the run's identity, engine, ranks and optimizer) and
each rank's RNG. Each is written under a temporary name and
renamed into place once every rank has finished, so a crash never leaves a half-written one.
`--resume` continues from one exactly: on the CPU, 10 steps + resume + 10 steps give bit-for-bit
the losses of 20 steps, and so does a run stopped by a signal and resumed.

Once training has started, an error writes a checkpoint of the last completed step before the
error line (which says where it is); a full disk is said as such, with the space a checkpoint
needs. The output directory is locked for the run and released at its end, errors included."""

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

from fastseq.checkpoint import CheckpointError
from fastseq.files import (
    DirectoryLock,
    DiskFull,
    atomic_write,
    directory_size,
    disk_full,
    is_disk_full,
    publish_directory,
    reason,
    write_json,
)
from fastseq.metrics import compute
from fastseq.tokenizers import Tokenizer

from .args import TrainArgs
from .data import Data, build_data
from .engine import (
    Engine,
    LocalEngine,
    NonFiniteError,
    check_model_memory,
    check_precision,
    model_config,
    run_device,
    run_tokenizer,
)
from .metrics_log import MetricsLog, Tokens
from .plot import plot_losses
from .rotation import rotate, set_aside
from .signals import SIGNAL_NAMES, Interrupted, Signals, StopEvaluation, StoppableCollator
from .state import (
    PREDICT_RESULTS,
    STATE_FILE,
    TEST_PREDICTIONS,
    ResumeError,
    args_record,
    check_engine,
    check_identity,
    check_rank_files,
    check_rates,
    clear_output_dir,
    engine_record,
    find_checkpoint,
    instead,
    load_rng,
    prepare_output_dir,
    read_state,
    rng_states,
    run_identity,
    save_rng,
    write_prediction_settings,
    write_state,
)

log = logging.getLogger("fastseq.train")
_SHOWN_CHARS = 200  # the summary line shows held-out sources and outputs up to this length


@torch.no_grad()
def evaluate(model, tokenizer: Tokenizer, examples, collator, device, *, batch_size: int = 64, autocast=None,
             metrics: tuple[str, ...] = ("exact_match",), num_beams: int = 1,
             max_new_tokens: int = 128) -> tuple[dict[str, float], list[str]]:  # fmt: skip
    """The mean loss over target tokens (`eval_loss`) and the scores of `metrics` (`fastseq.metrics`)
    of the outputs generated for `examples` ((source, target) pairs; greedy for `num_beams` 1, at
    most `max_new_tokens` each, special tokens skipped); and the outputs. No metrics: the loss only,
    nothing generated (HF's evaluation without `--predict_with_generate`)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens, outputs = 0.0, 0, []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collator(chunk).items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(**batch, return_logits=False).loss
            tokens = int((batch["labels"] != -100).sum())
            total_loss += loss.item() * tokens
            total_tokens += tokens
            if metrics:
                generated = model.generate(batch["input_ids"], batch["attention_mask"],
                                           max_new_tokens=max_new_tokens, num_beams=num_beams)  # fmt: skip
        if metrics:
            outputs += tokenizer.batch_decode(generated[:, 1:], skip_special_tokens=True)
    model.train(was_training)
    scores = compute(metrics, outputs, [target for _, target in examples]) if metrics else {}
    return {"eval_loss": total_loss / max(total_tokens, 1), **scores}, outputs


def write_predictions(path: Path, examples: list[tuple[str, str]], outputs: list[str]) -> None:
    """One JSON object per held-out example, in order: its source, target and prediction."""
    rows = (json.dumps({"source": s, "target": t, "prediction": p}, ensure_ascii=False)
            for (s, t), p in zip(examples, outputs, strict=True))  # fmt: skip
    atomic_write(path, lambda tmp: tmp.write_text("".join(row + "\n" for row in rows), encoding="utf-8"))


def write_generated_predictions(path: Path, outputs: list[str]) -> None:
    """The outputs as `run_summarization.py`/`run_translation.py` write `generated_predictions.txt`:
    each stripped, joined by newlines."""
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(text.strip() for text in outputs), encoding="utf-8"))


def shorten(text: str, limit: int = _SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters, with "…" where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _format_score(key: str, value: float) -> str:
    if key == "exact_match":
        return f"exact match {value:.1%}"
    return f"{key} {value:.4f}" if key.endswith("loss") else f"{key} {value:.2f}"


def settings_line(args: TrainArgs, data_parallel: int) -> str:
    """The run's first printed line: its length, optimizer, effective schedule, batch (with accumulation
    and data-parallel ranks) and source and target lengths, as they are once the model and the data
    have set their defaults (--epochs' steps, the model's --max-source-length)."""
    lr = args.learning_rate()
    rate = "relative step size" if lr is None else f"lr {lr:g}"
    warmup = f", warm-up {args.warmup_steps} step(s)" if args.warmup_steps else ""
    batch = f"up to {args.max_tokens} tokens" if args.max_tokens else f"{args.batch_size} examples"
    per_step = f"{batch} x {args.grad_accum} accumulated x {data_parallel} data-parallel"
    if not args.max_tokens:
        per_step += f" = {args.batch_size * args.grad_accum * data_parallel} examples a step"
    return (f"fastseq train: {args.steps} steps; {args.optimizer}, {rate}, {args.schedule} schedule{warmup}; batch "
            f"{per_step}; source {args.max_source_length} tokens, target {args.max_target_length}")  # fmt: skip


def whole_epochs(data: Data) -> int:
    """The epochs of the training data done so far, whole ones (what --eval-strategy epoch counts)."""
    return math.floor((data.epoch or 0.0) + 1e-9)


def make_engine(args: TrainArgs, config) -> Engine:
    if args.deepspeed:
        from fastseq.distributed import deepspeed_engine

        return deepspeed_engine(args, config)
    return LocalEngine(args, run_device(args))


class _Run:
    """One run of the loop: the engine, the data and where everything is written."""

    def __init__(self, args: TrainArgs, engine: Engine, tokenizer: Tokenizer, data: Data, identity: dict, out: Path):
        self.args, self.engine, self.tokenizer, self.data, self.identity, self.out = (
            args, engine, tokenizer, data, identity, out)  # fmt: skip
        self.last_checkpoint: Path | None = None
        # The last completed step (its optimizer step applied): its number, and the data position and
        # RNG states right after it, which a checkpoint of it needs once the run has gone further.
        self.completed: tuple[int, dict, dict] | None = None
        self.pending: dict | None = None  # the completed step's record, until metrics.jsonl has it
        # What the run does now: an error while reading data ("data") or evaluating ("evaluate")
        # is met by every rank alike, so all of them can still write a checkpoint together.
        self.phase = "start"
        self.metrics: MetricsLog | None = None
        self.evaluating = bool(data.held_out) and engine.model is not None
        self.losses: list[tuple[int, float]] = []  # (step, loss)
        self.evals: list[tuple[int, float]] = []  # (step, eval loss)
        self.final: dict = {}  # the final held-out scores
        self.outputs: list[str] = []  # the generated outputs of the last evaluation
        self.best: tuple[Path, float] | None = None  # the best checkpoint by --metric-for-best-model, its score
        self.branch: int | None = None  # the step resumed in the output directory, until the first checkpoint
        self.tokens = Tokens()
        self.epochs_whole = 0  # whole epochs done before this step (--eval-strategy epoch)
        self.stopped_early: int | None = None  # the step --early-stopping-patience ended the run at
        self.best_model: Path | None = None  # the checkpoint --load-best-model-at-end took OUTPUT's model from
        self.test_scores: dict = {}  # --test-data's scores, under HF's predict_ names

    def resume(self) -> int:
        """Load the checkpoint `--resume` names, after checking that this run may continue it (its
        identity, engine, ranks and optimizer); returns its step."""
        path = self.engine.on_first_rank(find_checkpoint, self.args)
        state = self.engine.on_first_rank(read_state, path)
        check_identity(path, state["run"], self.identity)
        check_engine(path, state, self.engine, self.args)
        check_rank_files(path, state, self.engine)
        rates = check_rates(path, state, self.args)
        try:
            self.engine.load(path, state["engine"])
        except (ResumeError, OSError):
            raise
        except CheckpointError as err:  # its advice is for a downloaded model: here it is the checkpoint before
            cause = str(err).removesuffix(": re-download or re-save it")
            raise ResumeError(f"--resume: {cause}; {instead(path)}") from err
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
            raise ResumeError(f"--resume: {path} does not load ({type(err).__name__}: {err}); the checkpoint was "
                              f"edited or damaged: {instead(path)}") from err  # fmt: skip
        recorded = (state.get("args") or {}).get("grad_accum")  # the accumulation the checkpoint ran with
        accumulated = max(recorded, self.args.grad_accum) if isinstance(recorded, int) else self.args.grad_accum
        batches = state["step"] * accumulated * self.engine.data_parallel
        try:
            self.data.load_state_dict(state["data"], batches)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ResumeError(f"--resume: {path / STATE_FILE}: data holds no data position this run can restore "
                              f"({type(err).__name__}: {err}); {instead(path)}") from err  # fmt: skip
        load_rng(path, self.engine.rank)
        if rates is not None:
            self.engine.set_rates(*rates)
        self.last_checkpoint = path
        if self.args.continues_in_output_dir:
            self.branch = state["step"]
        return state["step"]

    def checkpoint(self, step: int, completed: tuple[int, dict, dict] | None = None) -> Path:
        """`OUTPUT/checkpoint-STEP`, written under a temporary name (removed again if writing fails)
        and renamed into place once every rank is done (by the first rank; on an output directory that
        is not shared, each node's first rank renames its node's ranks' files too). `completed`: the
        step's data position and RNG states, when the run has moved past the step (an error in the
        next one)."""
        engine, first = self.engine, self.engine.rank == 0
        final, tmp = self.out / f"checkpoint-{step}", self.out / f".checkpoint-{step}.tmp"
        data_state, rng = (completed[1], completed[2]) if completed else (self.data.state_dict(), None)
        self.phase = "checkpoint"
        try:
            if first and self.branch is not None:  # checkpoints past the one resumed are another branch's
                set_aside(self.out, self.branch)
                self.branch = None
            if first and tmp.exists():
                shutil.rmtree(tmp)
            engine.barrier()
            if first:
                tmp.mkdir()
            engine.barrier()
            meta = engine.save(tmp)
            save_rng(tmp, engine.rank, rng)
            engine.barrier()
            if first:
                self.tokenizer.save_pretrained(tmp)
                write_prediction_settings(tmp, self.args)
                write_state(tmp, {"step": step, "run": self.identity, "data": data_state, "engine": meta,
                                  "world_size": engine.world, "engine_kind": engine.kind,
                                  "optimizer": engine_record(self.args), "args": args_record(self.args)})  # fmt: skip
                publish_directory(tmp, final)
            engine.barrier()
            if engine.node_first and not first and tmp.is_dir():  # an output directory on this node's own disk
                publish_directory(tmp, final)
            engine.barrier()
        except BaseException as err:
            if first:  # never a half-written checkpoint left behind, even under its temporary name
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and is_disk_full(err):
                raise self.disk_full(err, final) from err
            raise
        self.last_checkpoint = final
        return final

    def disk_full(self, err: Exception, writing: Path) -> DiskFull:
        """The error line for a full disk (or quota, or file-size limit) while writing `writing`: the
        directory, the space a checkpoint needs (the last one's size, or the model's weights and two
        optimizer moments in fp32) and the space free there."""
        if self.last_checkpoint is not None and self.last_checkpoint.is_dir():
            needed = directory_size(self.last_checkpoint)
        else:
            params = self.engine.model.parameters() if self.engine.model is not None else []
            needed = 3 * 4 * sum(getattr(p, "ds_numel", p.numel()) for p in params)
        advice = (
            f"{_kept(self.last_checkpoint)}. Free space in {self.out} (or choose another --output-dir), then "
            "continue with --resume"
        )
        return disk_full(err, writing, "a checkpoint", needed, advice)

    def save_completed(self) -> Path | None:
        """After an error or a signal mid-step: the checkpoint of the last completed step (the one
        already written if it is that step's), with its record in metrics.jsonl; None when no step
        was completed in this run."""
        if self.pending is not None:
            self.metrics.write(self.pending)
            self.pending = None
        if self.completed is None:
            return None
        step = self.completed[0]
        if self.last_checkpoint is not None and self.last_checkpoint.name == f"checkpoint-{step}":
            return self.last_checkpoint
        return self.checkpoint(step, self.completed)

    def failed(self, err: Exception) -> None:
        """An error once training has started: the last completed step is saved where every rank met
        the error alike (all do in one process), and a note on the error says where it is."""
        if isinstance(err, NonFiniteError):
            return  # its line names the last checkpoint: nothing of the bad step, or after it, is kept
        phase, kept = self.phase, _kept(self.last_checkpoint)
        if phase == "checkpoint" or (self.engine.world > 1 and phase not in ("data", "evaluate")):
            err.add_note(f"nothing more was saved ({kept})")
            return
        try:
            path = self.save_completed()
        except Exception as again:  # the first error is the one to report
            err.add_note(f"saving step {self.completed[0]} failed too ({reason(again)}); {kept}")
            return
        if path is None:
            err.add_note(f"no step was completed ({kept})")
            return
        note = (f"the run's state after step {self.completed[0]} is saved in {path}: fix the cause, then continue "
                "with the same command and --resume")  # fmt: skip
        if phase == "data":  # a fixed file is other data, which the checkpoint refuses
            note += f" (if the fix changes the data file, start a new run from it with --model {path})"
        err.add_note(note)

    def step(self, done: int, signals: Signals) -> tuple[dict, bool]:
        """Step `done` (1-based): its record in metrics.jsonl, and whether a signal ends the run."""
        args, engine, data = self.args, self.engine, self.data
        self.phase = "data"
        micro = [data.micro_batch(engine.data_parallel, engine.data_rank) for _ in range(args.grad_accum)]
        position = data.state_dict()
        self.phase = "compute"
        loss = engine.forward_backward([batch for batch, _ in micro])
        # The step's only synchronisation: the loss, the tokens and any signal, summed over the ranks.
        signalled = float(signals.received is not None)
        real, padded = float(sum(r for _, (r, _) in micro)), float(sum(n for _, (_, n) in micro))
        loss_sum, real, padded, stop = engine.sum_over_ranks([float(loss), real, padded, signalled])
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
        self.completed, self.phase = (done, position, rng_states()), "evaluate"
        record = {"step": done, "loss": mean_loss, "lr": engine.learning_rate()}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        shared = engine.data_parallel / engine.world  # pipeline stages share batches
        self.tokens.add(real * shared, padded * shared)
        if done % args.log_every == 0 or done == args.steps:
            record.update(self.tokens.end_window())
            if engine.device.type == "cuda":
                record["peak_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
        self.losses.append((done, mean_loss))
        self.pending = record
        epoch_end = self.epoch_ended()
        if self.evaluating and (epoch_end or args.eval_every and done % args.eval_every == 0) and done != args.steps:
            record.update(self.evaluate(done))
            if self.patience_spent():
                self.stopped_early = done
        self.phase = "log"
        self.metrics.write(record)
        self.pending = None
        if stop and done != args.steps:
            return record, True
        if (epoch_end or args.save_every and done % args.save_every == 0) and done != args.steps:
            self.checkpoint(done)
            self.prune()
        return record, False

    def finish(self) -> Path:
        """The final checkpoint, evaluation (after the checkpoint, so a failing evaluation loses no
        training), the best checkpoint's model loaded and evaluated (--load-best-model-at-end) and the
        model directory; returns the checkpoint. The records go to metrics.jsonl once every evaluation
        is done: a signal during one leaves none of them, and the --resume that finishes the run
        writes each once."""
        steps = self.stopped_early or self.args.steps
        path = self.out / f"checkpoint-{steps}"
        if self.last_checkpoint != path:  # written already when a resume of the last step finishes the run
            path = self.checkpoint(steps)
        if self.evaluating:  # an early stop's step was evaluated: its scores are final
            self.final = self.metrics.evaluated[steps] if self.stopped_early else self.evaluate(steps)
        self.prune()
        records = []
        if self.evaluating:
            record = {"step": steps, "lr": self.engine.learning_rate(), **({} if self.stopped_early else self.final)}
            if self.best is not None:
                record.update(best_checkpoint=self.best[0].name, best_metric=self.best[1])
            records.append(record)
        self.best_model = self.load_best(path)
        if self.best_model is not None:
            records.append({"step": steps, "best_model_step": int(self.best_model.name[11:]),
                            "best_model_checkpoint": self.best_model.name, **self.final})  # fmt: skip
        self.predict()
        for record in records:
            self.metrics.write(record)
        if self.evaluating and self.engine.rank == 0 and self.args.metrics:
            write_generated_predictions(self.out / "generated_predictions.txt", self.outputs)
        if self.best_model not in (None, path):
            self.engine.save_model_of(self.best_model, self.out)
        else:
            self.engine.save_model(self.out, path)
        if self.engine.rank == 0:
            self.tokenizer.save_pretrained(self.out)
            write_prediction_settings(self.out, self.args)
            steps, losses = zip(*self.losses, strict=True)
            plot_losses(self.out / "loss.png", list(steps), list(losses), self.evals)
        return path

    def predict(self) -> None:
        """--test-data (HF's `--do_predict`): the engine's model (the best checkpoint's under
        --load-best-model-at-end) predicts and scores the test examples as evaluation does; the
        predictions go to OUTPUT/test_predictions.jsonl (as eval_predictions-STEP.jsonl; none under
        --metric none), the scores to OUTPUT/predict_results.json under HF's names (`predict_loss`,
        `predict_<score>`, `predict_samples`)."""
        if not self.data.test:
            return
        if self.engine.model is None:
            log.warning("--test-data: %s cannot predict; predict with `fastseq generate` on the trained model "
                        "directory", self.engine.name)  # fmt: skip
            return
        scores, outputs = self.score(self.data.test)
        self.test_scores = {f"predict_{key.removeprefix('eval_')}": value for key, value in scores.items()}
        self.test_scores["predict_samples"] = len(self.data.test)
        if self.engine.rank == 0:
            if self.args.metrics:
                write_predictions(self.out / TEST_PREDICTIONS, self.data.test, outputs)
            write_json(self.out / PREDICT_RESULTS, self.test_scores)

    def load_best(self, final: Path) -> Path | None:
        """--load-best-model-at-end: the best checkpoint by --metric-for-best-model (None without the
        option). Unless it is the `final` checkpoint, its model is loaded into the engine (with the
        loader --resume uses) and evaluated, and its scores and outputs become the run's final ones, as
        HF's Trainer evaluates after loading the best model."""
        if not self.args.load_best_model_at_end:
            return None
        if not self.evaluating:
            log.warning("--load-best-model-at-end: %s evaluates no checkpoint, so OUTPUT holds the last step's model",
                        self.engine.name)  # fmt: skip
            return None
        best = self.engine.on_first_rank(lambda: self.best[0])  # found on the first rank (`prune`)
        if best != final:
            state = self.engine.on_first_rank(read_state, best)
            self.engine.load(best, state["engine"])
            self.final, self.outputs = self.score(self.data.held_out)
        return best

    def summary(self, start: int, elapsed: float, path: Path, stopped_by: int | None) -> dict:
        """The summary line (and a few held-out outputs) on the first rank; the summary dict."""
        last_step, loss = self.losses[-1]
        interrupted = SIGNAL_NAMES[stopped_by] if stopped_by is not None else None
        best = {} if self.best is None else {"best_checkpoint": str(self.best[0]), "best_metric": self.best[1]}
        rates = self.tokens.rates(*self.tokens.run, elapsed)
        if self.engine.rank == 0:
            weights = "" if self.args.pretrained else ", random weights"
            line = f"fastseq train ({self.engine.name}{weights}): steps {start}-{last_step} in {elapsed:.1f}s"
            line += f", final loss {loss:.4f}"
            line += f", {rates['tokens_per_s']:,.0f} real tokens/s ({rates['real_token_fraction']:.1%} real)"
            if self.final:
                ordered = [key for key in self.final if key != "eval_loss"] + ["eval_loss"]
                scores = ", ".join(_format_score(key, self.final[key]) for key in ordered)
                line += f", held-out {scores} ({len(self.data.held_out)} examples)"
            if self.test_scores:
                ordered = [key for key in self.test_scores if key not in ("predict_loss", "predict_samples")]
                scores = [_format_score(key.removeprefix("predict_"), self.test_scores[key]) for key in ordered]
                scores.append(_format_score("predict_loss", self.test_scores["predict_loss"]))
                line += f", test {', '.join(scores)} ({len(self.data.test)} examples, {PREDICT_RESULTS})"
            line += f", checkpoint in {self.out} ({path.name})"
            if self.best is not None:
                line += f", best_checkpoint {self.best[0].name} ({self.args.best_model_key} {self.best[1]:.4g})"
            if self.best_model is not None:
                line += f", model of {self.best_model.name} (--load-best-model-at-end)"
            if self.stopped_early:
                line += (f", stopped early at step {self.stopped_early} (--early-stopping-patience "
                         f"{self.args.early_stopping_patience}: no better {self.args.best_model_key})")  # fmt: skip
            print(line)
            if interrupted:
                print(f"fastseq train: stopped by {interrupted} after step {last_step}; continue with the same "
                      "command and --resume")  # fmt: skip
            shown = min(self.args.examples_to_show, len(self.outputs))
            for (source, target), output in zip(self.data.held_out[:shown], self.outputs[:shown], strict=True):
                print(f"  {shorten(source)!r} -> {shorten(output)!r} (target {shorten(target)!r})")
        self.metrics.close()
        losses = [value for _, value in self.losses]
        summary = {"loss": loss, "losses": losses, "seconds": elapsed, "interrupted": interrupted,
                   "stopped_early": self.stopped_early, **rates}  # fmt: skip
        if self.best_model is not None:
            best["best_model_step"] = int(self.best_model.name[11:])
        return {**summary, **self.final, **best, **self.test_scores}

    def evaluate(self, step: int) -> dict:
        """Evaluate the held-out examples; their predictions go to OUTPUT/eval_predictions-STEP.jsonl."""
        scores, self.outputs = self.score(self.data.held_out)
        self.evals.append((step, scores["eval_loss"]))
        self.metrics.evaluated[step] = scores
        if self.engine.rank == 0 and self.args.metrics:  # --metric none generates nothing
            write_predictions(self.out / f"eval_predictions-{step}.jsonl", self.data.held_out, self.outputs)
        return scores

    def score(self, examples: list[tuple[str, str]]) -> tuple[dict[str, float], list[str]]:
        """The engine's model on `examples`: eval_loss and --metric's scores, and the outputs."""
        args, engine = self.args, self.engine
        return evaluate(engine.model, self.tokenizer, examples, self.data.eval_collator, engine.device,
                        autocast=engine.autocast, metrics=args.metrics, num_beams=args.num_beams,
                        max_new_tokens=args.eval_max_new_tokens)  # fmt: skip

    def epoch_ended(self) -> bool:
        """--eval-strategy epoch: whether the step just taken completed an epoch of the training data
        (the data position says so, and a checkpoint restores it, so a resumed run evaluates and saves
        at the same steps)."""
        if self.args.eval_strategy != "epoch":
            return False
        whole = whole_epochs(self.data)
        ended, self.epochs_whole = whole > self.epochs_whole, whole
        return ended

    def patience_spent(self) -> bool:
        """--early-stopping-patience N: whether the last N evaluations gave no better
        --metric-for-best-model than the best before them (HF's EarlyStoppingCallback), counted over
        every evaluation of the run, those before a resumed checkpoint included."""
        patience, key, greater = self.args.early_stopping_patience, self.args.best_model_key, self.args.best_is_greater
        if patience is None:
            return False
        best, waited = None, 0
        for step in sorted(self.metrics.evaluated):
            value = self.metrics.evaluated[step].get(key)
            if not isinstance(value, (int, float)):
                continue
            if best is None or (value > best if greater else value < best):
                best, waited = value, 0
            else:
                waited += 1
        return waited >= patience

    def prune(self) -> None:
        """After a checkpoint is published (first rank): find the best checkpoint by
        --metric-for-best-model among the evaluated ones, then apply --save-total-limit."""
        if self.engine.rank == 0:
            self.best = rotate(self.out, self.args, self.metrics.evaluated, self.last_checkpoint)


def _kept(last: Path | None) -> str:
    return f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written"


def train(args: TrainArgs) -> dict:
    """Run `fastseq train`; returns the summary (final loss, losses, seconds, held-out scores,
    and `interrupted`: the name of the signal that stopped the run, or None). The output directory
    is locked (on the first rank) from before anything is written there to the end of the run."""
    args.validate()
    with Signals() as signals:
        config = model_config(args)
        check_model_memory(args, config)
        check_precision(args, run_device(args))
        args.check_evaluation(config)
        args.check_lora(config)
        tokenizer = run_tokenizer(args, config)
        engine = make_engine(args, config)
        with DirectoryLock.scope():  # released however the run ends, even by a signal as it is taken
            out, _ = engine.on_first_rank(prepare_output_dir, args)
            return _train(args, config, tokenizer, engine, out, signals)


def _train(args: TrainArgs, config, tokenizer: Tokenizer, engine: Engine, out: Path, signals: Signals) -> dict:
    data = build_data(args, tokenizer, config, engine.data_parallel)  # also sets --epochs' steps
    identity = run_identity(args, config, tokenizer, data.fingerprint_path)
    torch.manual_seed(args.seed)
    engine.build(config)
    run = _Run(args, engine, tokenizer, data, identity, out)
    start = run.resume() if args.resume else 0
    run.epochs_whole = whole_epochs(data)
    if start > args.steps:
        raise ValueError(f"the checkpoint is at step {start}, already past --steps {args.steps}; raise --steps")
    engine.on_first_rank(clear_output_dir, args, out)  # every check has passed: --overwrite removes the old run
    if engine.rank == 0:
        print(settings_line(args, engine.data_parallel), flush=True)
    run.metrics = MetricsLog(out, args, data, start, engine.rank == 0)
    if start == args.steps:  # the last step's checkpoint (a signal stopped the final evaluation): the run ends
        log.info("--resume: %s is the run's last step; writing its final evaluation and model", run.last_checkpoint)
        run.losses = [(r["step"], r["loss"]) for r in run.metrics.history if "loss" in r] or [(start, math.nan)]
        run.evals = [(step, r["eval_loss"]) for step, r in sorted(run.metrics.evaluated.items())]
    if data.held_out and engine.model is None:
        log.warning("%s cannot evaluate held-out examples; evaluate the trained model directory instead", engine.name)
    if run.evaluating:
        data.eval_collator = StoppableCollator(data.eval_collator, signals, engine)
    progress = tqdm(range(start, args.steps), desc="train", unit="step", disable=args.quiet or engine.rank != 0,
                    file=sys.stderr)  # fmt: skip
    started = time.perf_counter()
    signals.training = True
    shown = {}  # the progress bar's loss, and real tokens/s and real-token fraction of the last logged step
    try:
        stopped_by = None
        for step in progress:
            record, stop = run.step(step + 1, signals)
            shown["loss"] = f"{record['loss']:.4f}"
            if "tokens_per_s" in record:
                shown.update(tok_s=f"{record['tokens_per_s']:,.0f}", real=f"{record['real_token_fraction']:.0%}")
            progress.set_postfix(shown)
            if stop:
                stopped_by = signals.received or signal.SIGTERM  # or another rank received it
                path = run.checkpoint(step + 1)
                break
            if run.stopped_early is not None:
                break
        if stopped_by is None:
            run.phase = "evaluate"
            path = run.finish()
            if signals.received is not None:
                log.warning("%s arrived as the run was finishing; it finished", SIGNAL_NAMES[signals.received])
    except StopEvaluation:
        stopped_by = signals.received or signal.SIGTERM
        path = run.save_completed()
    except Interrupted as err:
        err.add_note(f"stopped at once, without a checkpoint; {_kept(run.last_checkpoint)}")
        raise
    except DiskFull:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise run.disk_full(err, out) from err
        run.failed(err)
        raise
    finally:
        progress.close()
    summary = run.summary(start, time.perf_counter() - started, path, stopped_by)
    engine.close()
    return summary
