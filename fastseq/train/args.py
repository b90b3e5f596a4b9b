"""`TrainArgs`: the typed configuration of a training run, checked before any work starts."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from fastseq.optim import OPTIMIZERS, SCHEDULES

TASKS = ("seq2seq", "denoise")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainArgs:
    model: str | None = None  # preset name or checkpoint directory; None: the embedded default model
    tokenizer: str | None = None  # directory; default: the model's directory (ByT5 for the default)
    data: str | None = None  # training file, pipe or `datasets` directory; None: the synthetic default task
    eval_data: str | None = None  # held-out file, pipe or `datasets` directory
    dataset_name: str | None = None  # a dataset `datasets.load_dataset` resolves (hub id, cache, local directory)
    dataset_config_name: str | None = None  # its configuration
    train_split: str = "train"  # the split trained on (--dataset-name, or a DatasetDict directory)
    eval_split: str | None = None  # the held-out split (--dataset-name; a DatasetDict --eval-data: validation)
    task: str = "seq2seq"  # or "denoise"
    source_field: str = "source"
    target_field: str = "target"
    source_prefix: str = ""  # put before every source text ("summarize: ")
    output_dir: str = "runs/default"
    overwrite: bool = False  # a fresh run may replace the files of an earlier run in output_dir
    steps: int = 1000
    epochs: float | None = None  # passes over the data instead of --steps (which it then sets)
    batch_size: int = 64
    max_tokens: int | None = None  # token budget per batch instead of batch_size (file data)
    buffer_size: int = 100_000  # examples read, length-bucketed and shuffled at a time (file data)
    grad_accum: int = 1
    optimizer: str = "adafactor"  # T5's optimizer
    lr: float | None = None  # None with adafactor: relative step from scratch, 1e-3 for a pretrained directory
    schedule: str = "constant"
    warmup: int = 0
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping; 0: none
    max_source_length: int | None = None  # None: the model's (a LongT5 config's n_positions), else 512
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

    @classmethod
    def from_dict(cls, values: dict) -> TrainArgs:
        """Options from a YAML file and the command line, each converted to its field's type: YAML
        reads `1e-3` as a string, so a number written as text is accepted where a number is meant."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; see `fastseq train --help`")
        if values.get("epochs") is not None and values.get("steps") is not None:
            raise ValueError("--steps and --epochs both say how long to train; pass one")
        return cls(**{name: _convert(name, value, hints[name]) for name, value in values.items()})

    @property
    def pretrained(self) -> bool:
        return self.model is not None and Path(self.model).is_dir()

    @property
    def continues_in_output_dir(self) -> bool:
        """Whether --resume continues a run in --output-dir (rather than from a checkpoint elsewhere
        into a new directory, which must then be empty like a fresh run's)."""
        if self.resume is None:
            return False
        return self.resume == "latest" or Path(self.resume).resolve().parent == Path(self.output_dir).resolve()

    def learning_rate(self) -> float | None:
        """The rate the optimizer gets: Adafactor's relative step (None) from scratch, 1e-3 when
        fine-tuning a pretrained directory, else --lr."""
        if self.lr is None and self.optimizer == "adafactor" and self.pretrained:
            return 1e-3
        return self.lr

    def validate(self) -> None:
        """Every count, size and rate, before anything is read, built or written."""
        at_least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "buffer_size": 1, "max_target_length": 1,
                    "log_every": 1, "warmup": 0, "eval_every": 0, "eval_examples": 0,
                    "save_every": 0, "examples_to_show": 0, "seed": 0}  # fmt: skip
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"--{_flag(name)} must be at least {low}; got {getattr(self, name)}")
        for name in ("max_tokens", "max_source_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be at least 1; got {getattr(self, name)}")
        self._validate_data()
        for name in ("lr", "weight_decay", "clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{_flag(name)} must be a finite number >= 0; got {value}")
        if self.optimizer == "adamw" and self.lr is None:
            raise ValueError("--optimizer adamw needs a learning rate: pass --lr (e.g. --lr 1e-4)")
        choices = {"task": TASKS, "precision": PRECISIONS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("deepspeed",):
            path = getattr(self, name)
            if path is not None and Path(path).is_dir():
                raise ValueError(f"--{_flag(name)} {path} is a directory; pass a file")
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--{_flag(name)} {path} does not exist; pass the path of a file")
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise FileNotFoundError(f"--tokenizer {self.tokenizer} is not a directory; pass a tokenizer directory")
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            raise FileNotFoundError(
                f"--resume {self.resume} is not a checkpoint directory; pass OUTPUT/checkpoint-STEP, or --resume "
                "alone for the latest one in --output-dir"
            )
        if self.continues_in_output_dir and self.overwrite:
            raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it; pass one")

    def _validate_data(self) -> None:
        """The data options: where the examples come from, how many passes, how they are batched."""
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--epochs must be a finite number > 0; got {self.epochs}")
        if self.task == "denoise" and self.data is None:
            raise ValueError("--task denoise needs a text corpus: pass --data FILE.txt")
        if self.data is not None and self.dataset_name is not None:
            raise ValueError("--data and --dataset-name both name the training data; pass one")
        if self.dataset_name is not None and self.task == "denoise":
            raise ValueError("--task denoise reads a text file (--data FILE.txt), not --dataset-name")
        if self.epochs is not None and self.data is None and self.dataset_name is None:
            raise ValueError("--epochs counts passes over --data or --dataset-name; the synthetic task has no end: "
                             "pass --steps")  # fmt: skip
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(
                    f"--{_flag(name)} {path} does not exist; pass the path of a data file, a pipe or a `datasets` "
                    "directory"
                )
        reads_data = self.data is not None or self.dataset_name is not None
        if reads_data and self.max_tokens is None and self.buffer_size < self.batch_size:
            raise ValueError(
                f"--buffer-size {self.buffer_size} is smaller than --batch-size {self.batch_size}, so no batch could "
                f"hold more than {self.buffer_size} examples; raise --buffer-size to at least {self.batch_size}"
            )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _convert(name: str, value, hint):
    """`value` as the type `hint` names (int, float, bool, str, or one of those | None)."""
    if value is None and type(None) in typing.get_args(hint):
        return None
    kinds = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
    kind = kinds[0]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
    elif kind in (int, float):
        numbers = (int,) if kind is int else (int, float)  # an int option takes no float
        if isinstance(value, numbers) and not isinstance(value, bool):
            return kind(value)
        if isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"option {_flag(name)}: {value!r} is not a {kind.__name__}; write it as one (e.g. in YAML)")
