"""The run's metrics log: `metrics.jsonl` (and TensorBoard or Weights & Biases with `--report-to
tensorboard|wandb`), and the token counts whose rates its records carry."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fastseq.files import atomic_write
from fastseq.metrics import metric_keys

from .args import TrainArgs
from .data import Data
from .state import WANDB_RUN_ID, args_record


class MetricsLog:
    """`metrics.jsonl` on the first rank: one JSON object per line, never NaN or infinity (the schema
    is in the README). Every record gets the run's `epoch` (`Data.epoch`, None where unknown) and
    `elapsed` seconds since the run started, counting those before the checkpoint a run resumed
    from; with `--report-to tensorboard` its numbers also go to TensorBoard under OUTPUT/runs, tagged
    as HF's Trainer tags them: `eval/KEY` for evaluation's (`eval_loss` as `eval/loss`, each metric's
    scores, the best checkpoint's metric and the step --load-best-model-at-end took the model from),
    `train/KEY` for the rest. `evaluated` holds each evaluated
    step's record (this run's and, on resume, those kept from before)."""

    def __init__(self, out: Path, args: TrainArgs, data: Data, start: int, enabled: bool):
        self.path, self.data, self.enabled = out / "metrics.jsonl", data, enabled
        self.eval_keys = {"eval_loss", "best_metric", "best_model_step", *metric_keys(args.metrics)}
        self.writer, self.wandb = None, None
        history = self._history(args, start) if enabled else []
        self.history = history  # the records kept from before the checkpoint resumed
        if enabled and args.continues_in_output_dir:  # drop what came after the checkpoint
            kept = "".join(json.dumps(record, allow_nan=False) + "\n" for record in history)
            atomic_write(self.path, lambda tmp: tmp.write_text(kept))
        # A --load-best-model-at-end record holds the best checkpoint's scores, not its step's.
        evaluations = (r for r in history if "eval_loss" in r and "best_model_step" not in r)
        self.evaluated: dict[int, dict] = {r["step"]: r for r in evaluations}
        previous = [r["elapsed"] for r in history if isinstance(r.get("elapsed"), (int, float))]
        self.started = time.perf_counter() - (previous[-1] if previous else 0.0)
        if enabled and args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events an earlier attempt logged after the checkpoint.
            self.writer = SummaryWriter(str(out / "runs"), purge_step=start + 1 if start else None)
        if enabled and args.report_to == "wandb":
            self.wandb = start_wandb(out, args)

    def _history(self, args: TrainArgs, start: int) -> list[dict]:
        """The records up to step `start` of the run a resume continues (its metrics.jsonl beside the
        checkpoint); none for a fresh run."""
        if args.resume is None:
            return []
        source = self.path if args.continues_in_output_dir else Path(args.resume).parent / "metrics.jsonl"
        if not source.is_file():
            return []
        records = []
        for line in source.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start:
                records.append(record)
        return records

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "epoch": getattr(self.data, "epoch", None), "elapsed": time.perf_counter() - self.started}
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
        scalars = {self.tag(key): value for key, value in clean.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}  # fmt: skip
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, clean["step"])
            self.writer.flush()
        if self.wandb is not None:  # HF's WandbCallback's x axis: train/global_step
            self.wandb.log({**scalars, "train/global_step": clean["step"]})

    def tag(self, key: str) -> str:
        """The TensorBoard tag of a record's key: `eval/...` or `train/...`."""
        return f"eval/{key.removeprefix('eval_')}" if key in self.eval_keys else f"train/{key}"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(out: Path, args: TrainArgs):
    """The W&B run (`wandb.init`) of the run in `out`: its files under OUTPUT/wandb, the run's options
    as its config, its mode from WANDB_MODE (offline needs no network) and its project from
    WANDB_PROJECT, as `wandb` reads them. A --resume continues the W&B run recorded beside the
    checkpoint (OUTPUT/wandb_run_id.txt); a fresh run starts one and records its id. Its metrics are
    plotted against `train/global_step`, so a resumed run's steps follow the checkpoint's (HF's
    WandbCallback does the same)."""
    import wandb

    recorded = Path(args.resume).parent / WANDB_RUN_ID if args.resume not in (None, "latest") else out / WANDB_RUN_ID
    run_id = recorded.read_text().strip() if args.resume is not None and recorded.is_file() else None
    try:
        run = wandb.init(dir=str(out), id=run_id, resume="allow" if run_id else None, config=args_record(args))
    except Exception as err:  # wandb's own errors (no API key, no network) are plain Exceptions
        raise ValueError(f"--report-to wandb: wandb.init failed ({err}); log in with `wandb login`, or set "
                         "WANDB_MODE=offline to log without a network") from err  # fmt: skip
    atomic_write(out / WANDB_RUN_ID, lambda tmp: tmp.write_text(run.id + "\n"))
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    return run


class Tokens:
    """The tokens trained on, source and target sides together: the real ones (not padding) and all
    of them, padding included; since the last logged step (the window) and over the run."""

    def __init__(self):
        self.window_start = time.perf_counter()
        self.window = [0.0, 0.0]  # real, all
        self.run = [0.0, 0.0]

    def add(self, real: float, padded: float) -> None:
        for counts in (self.window, self.run):
            counts[0] += real
            counts[1] += padded

    @staticmethod
    def rates(real: float, padded: float, seconds: float) -> dict[str, float]:
        """`tokens_per_s`: real tokens a second; `real_token_fraction`: real tokens / all tokens."""
        return {"tokens_per_s": real / max(seconds, 1e-9), "real_token_fraction": real / max(padded, 1.0)}

    def end_window(self) -> dict[str, float]:
        """The window's rates; the next window starts."""
        now = time.perf_counter()
        rates = self.rates(*self.window, now - self.window_start)
        self.window, self.window_start = [0.0, 0.0], now
        return rates
