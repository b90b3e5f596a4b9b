"""`TrainArgs`: the typed configuration of a training run, checked before any work starts."""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from fastseq.files import check_apart, utf8_problem
from fastseq.hub import is_repo_id
from fastseq.metrics import check_available, greater_is_better, metric_keys, parse_metrics
from fastseq.optim import OPTIMIZERS, SCHEDULES

TASKS = ("seq2seq", "denoise")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard", "wandb")
EVAL_STRATEGIES = ("steps", "epoch", "no")  # HF's --eval_strategy values
# --data's name for the built-in task (reverse a random word), generated without end: what a run without
# --model trains on by default, and a pretrained model only when asked for.
SYNTHETIC = "synthetic"


# The largest count a flag takes (steps, intervals, sizes): far past any run, and within the 64-bit
# integers that ranges, progress bars and tensors index with (10**30 steps raised OverflowError).
MAX_COUNT = 2**40


@dataclass
class TrainArgs:
    model: str | None = None  # model directory, hub id or (with random_init) preset; None: the embedded default
    random_init: bool = False  # train `model`'s config (a preset or a directory) from random weights
    tokenizer: str | None = None  # directory or hub id; default: the model's (ByT5 for the default)
    data: str | None = None  # training file, pipe or `datasets` directory; "synthetic" (None, no --model): built-in
    eval_data: str | None = None  # held-out file, pipe or `datasets` directory
    test_data: str | None = None  # predicted and scored at the end (HF's --do_predict --test_file)
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
    pack: bool = False  # several examples a row (segment ids, per-segment positions); evaluation stays unpacked
    grad_accum: int = 1
    optimizer: str = "adafactor"  # T5's optimizer
    lr: float | None = None  # adafactor: None = relative step from scratch, 1e-3 pretrained; 0 = relative step
    schedule: str = "constant"
    warmup: int = 0
    warmup_ratio: float = 0.0  # warm-up as a fraction of --steps (HF's --warmup_ratio), rounded up
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient-norm clipping; 0: none
    label_smoothing: float = 0.0  # eps of the label-smoothed training loss (HF's --label_smoothing_factor)
    max_source_length: int | None = None  # None: the model's (a LongT5 config's n_positions), else 512
    max_target_length: int = 128
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
    force_fp16: bool = False
    gradient_checkpointing: bool = False
    eval_every: int = 0
    eval_strategy: str = "steps"  # HF's name: steps (--eval-every, --save-every), epoch (both at each epoch's end), no
    early_stopping_patience: int | None = None  # stop after N evaluations without a better --metric-for-best-model
    max_eval_samples: int | None = None  # held-out examples evaluated (HF's --max_eval_samples); None: all
    max_train_samples: int | None = None  # train on the first N examples of the data (HF's name)
    max_predict_samples: int | None = None  # --test-data's examples predicted (HF's name); None: all
    save_every: int = 0
    log_every: int = 20
    seed: int = 0
    device: str | None = None
    resume: str | None = None  # "latest" or a checkpoint directory
    deepspeed: str | None = None  # a DeepSpeed JSON config: train under the `deepspeed` launcher
    quiet: bool = False
    examples_to_show: int = 3
    metric: str = "exact_match"  # held-out metrics, comma separated: exact_match, rouge, bleu, chrf
    num_beams: int = 1  # evaluation's decoding: 1 is greedy
    max_new_tokens: int | None = None  # evaluation's generation limit; None: max_target_length
    metric_for_best_model: str | None = None  # a score (eval_loss, rougeL, bleu ...) that picks the best checkpoint
    greater_is_better: bool | None = None  # None: lower for a loss, higher for the other scores
    save_total_limit: int | None = None  # keep at most N checkpoints (never the best or the latest)
    load_best_model_at_end: bool = False  # the top of OUTPUT is the best checkpoint's model, evaluated again
    report_to: str = "none"  # or "tensorboard" (under OUTPUT/runs), "wandb": metrics.jsonl's scalars also there
    lora_r: int = 0  # LoRA adapters' rank (through peft; the base frozen); 0: every weight trains
    lora_alpha: float | None = None  # the adapters' scale is alpha / r; None: 2 x lora_r
    lora_dropout: float | None = None  # dropout on the adapters' input; None: 0.05
    lora_targets: str | None = None  # comma-separated layer names that get adapters; None: q,v (T5's)

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
        return self.model is not None and not self.random_init and Path(self.model).is_dir()

    @property
    def synthetic(self) -> bool:
        """Whether the run trains on the built-in task (`--data synthetic`, or no data option)."""
        return self.data in (None, SYNTHETIC) and self.dataset_name is None

    @property
    def continues_in_output_dir(self) -> bool:
        """Whether --resume continues a run in --output-dir (rather than from a checkpoint elsewhere
        into a new directory, which must then be empty like a fresh run's)."""
        if self.resume is None:
            return False
        return self.resume == "latest" or Path(self.resume).resolve().parent == Path(self.output_dir).resolve()

    @property
    def lora(self):
        """The LoRA settings (`fastseq.lora.LoraSettings`), or None for full fine-tuning."""
        if not self.lora_r:
            return None
        from fastseq.lora import DEFAULT_DROPOUT, DEFAULT_TARGETS, LoraSettings

        targets = DEFAULT_TARGETS
        if self.lora_targets is not None:
            targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r
        dropout = self.lora_dropout if self.lora_dropout is not None else DEFAULT_DROPOUT
        return LoraSettings(r=self.lora_r, alpha=alpha, dropout=dropout, targets=targets)

    def check_lora(self, model_config, pretrained: bool | None = None, *, needs_peft: bool = True) -> None:
        """The LoRA options against the model: its family's layers, and a base worth adapting (`pretrained`:
        whether its weights are, default `self.pretrained`); with `needs_peft`, peft installed (a plan
        estimates without it)."""
        if not self.lora_r:
            return
        from fastseq.lora import check_targets, peft_module

        if needs_peft:
            peft_module()
        if not (self.pretrained if pretrained is None else pretrained):
            raise ValueError(
                "--lora-r trains adapters on a pretrained model's frozen weights, and this run's model has random "
                "weights; pass --model DIR (or a hub id) without --random-init, or drop --lora-r"
            )
        check_targets(model_config.model_type, self.lora.targets)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric names of --metric."""
        return parse_metrics(self.metric)

    @property
    def evaluates(self) -> bool:
        """Whether the run has held-out examples to evaluate: the synthetic task's, --eval-data's or
        --dataset-name's --eval-split (a denoising corpus has none)."""
        if self.task == "denoise" or self.max_eval_samples == 0:
            return False
        if self.synthetic:
            return True
        return self.eval_data is not None or (self.dataset_name is not None and self.eval_split is not None)

    def check_evaluation(self, model_config) -> None:
        """Evaluation's generation settings against the model (its learned positions) and the KV cache's
        bound, at start rather than at the first evaluation."""
        if not self.evaluates:
            return
        from fastseq.generation import check_settings

        try:
            check_settings(model_config, max_new_tokens=self.eval_max_new_tokens, num_beams=self.num_beams)
        except ValueError as err:
            flag = "--max-new-tokens"
            if self.max_new_tokens is None:
                flag = "--max-target-length (the default of --max-new-tokens), or pass --max-new-tokens"
            raise ValueError(f"evaluation's {err}: lower {flag}") from None

    @property
    def eval_max_new_tokens(self) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else self.max_target_length

    @property
    def best_model_key(self) -> str | None:
        """--metric-for-best-model as the key of a metrics.jsonl record ("loss" means "eval_loss", and
        an "eval_" prefix is accepted before any score, as HF's Trainer takes it)."""
        name = self.metric_for_best_model
        if name is None:
            return None
        name = name.removeprefix("eval_")
        return "eval_loss" if name == "loss" else name

    @property
    def best_is_greater(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return greater_is_better(self.best_model_key or "eval_loss")

    def learning_rate(self) -> float | None:
        """The rate the optimizer gets: Adafactor's relative step (None) with `--lr 0` or from scratch
        without --lr, 1e-3 when fine-tuning a pretrained model without --lr, else --lr."""
        if self.optimizer == "adafactor" and self.lr == 0:
            return None
        if self.lr is None and self.optimizer == "adafactor" and self.pretrained:
            return 1e-3
        return self.lr

    @property
    def warmup_steps(self) -> int:
        """The warm-up in optimizer steps: --warmup, or --warmup-ratio of --steps rounded up (as HF's
        Trainer rounds it)."""
        return self.warmup or math.ceil(self.warmup_ratio * self.steps)

    def validate(self) -> None:
        """Every count, size and rate, before anything is read, built or written."""
        at_least = {"steps": 1, "batch_size": 1, "grad_accum": 1, "buffer_size": 1, "max_target_length": 1,
                    "log_every": 1, "warmup": 0, "eval_every": 0, "max_eval_samples": 0,
                    "save_every": 0, "examples_to_show": 0, "seed": 0}  # fmt: skip
        optional = {"max_tokens": 1, "max_source_length": 1, "max_train_samples": 1, "max_predict_samples": 1}
        for name, low in {**at_least, **optional}.items():
            value = getattr(self, name)
            if value is None:  # the optional ones, and max_eval_samples
                continue
            if value < low:
                raise ValueError(f"--{_flag(name)} must be at least {low}; got {value}")
            if name != "seed" and value > MAX_COUNT:  # the seed has its own bound, 2**64
                raise ValueError(f"--{_flag(name)} must be at most 2**40 ({MAX_COUNT}); got {value}")
        self._validate_data()
        for name in ("lr", "weight_decay", "clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{_flag(name)} must be a finite number >= 0; got {value}")
        if self.seed >= 2**64:
            raise ValueError(f"--seed must be below 2**64 (torch's seeds are 64-bit); got {self.seed}")
        if not 0.0 <= self.warmup_ratio <= 1.0:  # NaN fails here too
            raise ValueError(f"--warmup-ratio must be in [0, 1] (a fraction of --steps); got {self.warmup_ratio}")
        if self.warmup and self.warmup_ratio:
            raise ValueError("--warmup and --warmup-ratio both set the warm-up; pass one")
        if not 0.0 <= self.label_smoothing < 1.0:  # NaN fails here too
            raise ValueError(f"--label-smoothing must be in [0, 1) (0: none; 0.1 is usual); got {self.label_smoothing}")
        if self.optimizer == "adamw" and not self.lr:
            raise ValueError(
                f"--optimizer adamw needs a learning rate above 0: pass --lr (e.g. --lr 1e-4); got {self.lr}"
            )
        choices = {"task": TASKS, "precision": PRECISIONS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{_flag(name)} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.deepspeed is not None:
            from fastseq.distributed.config import find

            find(self.deepspeed)  # a file, or the name of a shipped config
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir() and not is_repo_id(self.tokenizer):
            raise FileNotFoundError(
                f"--tokenizer {self.tokenizer} is not a directory, nor a hub id; pass a tokenizer directory or ORG/NAME"
            )
        # Rank 0 alone: on a node whose disk lacks the checkpoint another rank would stop here, before the
        # process group exists, and leave the others waiting; the ranks refuse it together once they can
        # (`check_rank_files`).
        first_rank = int(os.environ.get("RANK", "0")) == 0
        if self.resume is not None and not str(self.resume).strip():
            raise ValueError("--resume is given an empty path; pass OUTPUT/checkpoint-STEP, or --resume alone for the "
                             "latest checkpoint in --output-dir")  # fmt: skip
        if self.resume not in (None, "latest") and first_rank and not Path(self.resume).is_dir():
            raise FileNotFoundError(
                f"--resume {self.resume} is not a checkpoint directory; pass OUTPUT/checkpoint-STEP, or --resume "
                "alone for the latest one in --output-dir"
            )
        if self.continues_in_output_dir and self.overwrite:
            raise ValueError("--resume continues the run in --output-dir and --overwrite replaces it; pass one")
        if problem := utf8_problem(self.output_dir):  # its checkpoints would be written, never read back
            raise ValueError(f"--output-dir: {problem} (no checkpoint written there could be resumed); choose a "
                             "UTF-8 name")  # fmt: skip
        self._validate_evaluation()
        self._validate_lora()
        self._check_output_dir_apart()

    def _validate_lora(self) -> None:
        if not 0 <= self.lora_r <= MAX_COUNT:
            raise ValueError(f"--lora-r must be between 0 (no LoRA) and 2**40; got {self.lora_r}")
        options = ("lora_alpha", "lora_dropout", "lora_targets")
        given = [f"--{_flag(n)}" for n in options if getattr(self, n) is not None]
        if given and not self.lora_r:
            raise ValueError(f"{', '.join(given)} set(s) LoRA adapters, which --lora-r turns on; pass --lora-r R (8 or "
                             "16 is usual)")  # fmt: skip
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"--lora-alpha must be a finite number > 0; got {self.lora_alpha}")
        if self.lora_dropout is not None and not 0.0 <= self.lora_dropout < 1.0:  # NaN fails here too
            raise ValueError(f"--lora-dropout must be in [0, 1); got {self.lora_dropout}")

    def _validate_evaluation(self) -> None:
        """Evaluation's metrics, decoding, best checkpoint and logging options."""
        check_available(self.metrics)
        if self.eval_strategy not in EVAL_STRATEGIES:
            raise ValueError(f"--eval-strategy must be one of {', '.join(EVAL_STRATEGIES)}; got {self.eval_strategy!r}")
        if self.eval_strategy != "steps" and (self.eval_every or self.save_every):
            given = "--eval-every" if self.eval_every else "--save-every"
            does = (
                "evaluates and saves at each epoch's end" if self.eval_strategy == "epoch" else "evaluates at the end"
            )
            raise ValueError(f"{given} counts steps for --eval-strategy steps; --eval-strategy {self.eval_strategy} "
                             f"{does}: pass one of them")  # fmt: skip
        if self.eval_strategy == "epoch" and self.synthetic:
            raise ValueError("--eval-strategy epoch needs epochs: the synthetic task has none; pass --data FILE (or "
                             "--dataset-name), or --eval-strategy steps with --eval-every N")  # fmt: skip
        for name in ("num_beams", "max_new_tokens", "save_total_limit", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{_flag(name)} must be at least 1; got {value}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}; got {self.report_to!r}")
        if self.report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ValueError(
                    "--report-to tensorboard needs the tensorboard package, which is not installed; pip install "
                    '"fastseq[finetune]"'
                ) from None
        if self.report_to == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ValueError("--report-to wandb needs the wandb package, which is not installed; pip install "
                                 "wandb (or --report-to tensorboard)") from None  # fmt: skip
        key = self.best_model_key
        if key is None:
            if self.early_stopping_patience is not None:
                raise ValueError("--early-stopping-patience counts evaluations without a better "
                                 "--metric-for-best-model: pass --metric-for-best-model (e.g. eval_loss)")  # fmt: skip
            if self.load_best_model_at_end:
                raise ValueError("--load-best-model-at-end loads the best checkpoint by --metric-for-best-model: pass "
                                 "--metric-for-best-model (e.g. eval_loss)")  # fmt: skip
            return
        known = ("eval_loss", *metric_keys(self.metrics))
        if key not in known:
            raise ValueError(
                f"--metric-for-best-model {self.metric_for_best_model!r} is not a score this run computes; use one "
                f"of {', '.join(known)} (or add its metric to --metric)"
            )
        if not self.evaluates:
            raise ValueError("--metric-for-best-model needs held-out examples: pass --eval-data FILE (seq2seq)")
        if self.early_stopping_patience is not None and self.eval_strategy == "no":
            raise ValueError("--early-stopping-patience needs evaluations during training: --eval-strategy steps "
                             "with --eval-every N, or epoch")  # fmt: skip
        if self.load_best_model_at_end and self.eval_strategy != "epoch" and not (self.save_every and self.eval_every):
            raise ValueError("--load-best-model-at-end picks among the checkpoints of evaluated steps, and this run "
                             "evaluates none before the end: pass --eval-every N and --save-every N (a multiple), or "
                             "--eval-strategy epoch")  # fmt: skip
        if self.save_every and not (self.eval_every and self.save_every % self.eval_every == 0):
            raise ValueError(
                f"--metric-for-best-model compares the checkpoints of evaluated steps: --save-every {self.save_every} "
                f"must be a multiple of --eval-every {self.eval_every}"
            )

    def _check_output_dir_apart(self) -> None:
        """The output directory may not be, hold or lie inside an input (a hub id's being its snapshot in
        the Hugging Face cache), nor lie in that cache: `--overwrite` would delete what the run is about
        to read, and the run's checkpoints would replace it."""
        inputs = {"--model": self.model, "--tokenizer": self.tokenizer, "--data": None if self.synthetic else self.data,
                  "--eval-data": self.eval_data, "--test-data": self.test_data}  # fmt: skip
        if self.resume not in (None, "latest") and not self.continues_in_output_dir:
            inputs["--resume"] = self.resume  # a checkpoint of the run in --output-dir is what --resume continues
        check_apart(self.output_dir, "--output-dir", inputs, "the run writes there (and --overwrite deletes) what "
                    "it reads; choose an --output-dir outside the run's inputs")  # fmt: skip

    def _validate_data(self) -> None:
        """The data options: where the examples come from, how many passes, how they are batched."""
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"--epochs must be a finite number > 0; got {self.epochs}")
        if self.task == "denoise" and self.synthetic:
            raise ValueError("--task denoise needs a text corpus: pass --data FILE.txt")
        if self.data is not None and self.dataset_name is not None:
            raise ValueError("--data and --dataset-name both name the training data; pass one")
        if self.dataset_name is not None and self.task == "denoise":
            raise ValueError("--task denoise reads a text file (--data FILE.txt), not --dataset-name")
        if self.model is not None and not self.random_init and self.data is None and self.dataset_name is None:
            raise ValueError(f"--model {self.model} is fine-tuned on data, and none is given: pass --data FILE (or "
                             f"--dataset-name NAME), or --data {SYNTHETIC} for the built-in task "
                             "(reverse a word)")  # fmt: skip
        if self.epochs is not None and self.synthetic:
            raise ValueError("--epochs counts passes over --data or --dataset-name; the synthetic task has no end: "
                             "pass --steps")  # fmt: skip
        if self.test_data is not None and self.task == "denoise":
            raise ValueError("--test-data predicts seq2seq examples; --task denoise has none to predict: drop "
                             "--test-data")  # fmt: skip
        if self.eval_data is not None and self.task == "denoise":
            raise ValueError("--eval-data holds seq2seq examples to evaluate; --task denoise evaluates none: drop "
                             "--eval-data")  # fmt: skip
        if self.source_prefix and self.task == "denoise":
            raise ValueError("--source-prefix goes before seq2seq sources; --task denoise corrupts spans of plain text "
                             "and puts nothing before them: drop --source-prefix")  # fmt: skip
        if self.max_predict_samples is not None and self.test_data is None:
            raise ValueError("--max-predict-samples limits --test-data's examples: pass --test-data FILE")
        for name in ("data", "eval_data", "test_data"):
            path = getattr(self, name)
            if path is not None and not (name == "data" and path == SYNTHETIC) and not Path(path).exists():
                raise FileNotFoundError(
                    f"--{_flag(name)} {path} does not exist; pass the path of a data file, a pipe or a `datasets` "
                    "directory"
                )
        if not self.synthetic and self.max_tokens is None and self.buffer_size < self.batch_size:
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
