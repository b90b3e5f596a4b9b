"""The `fastseq` command: the only place that knows argparse. A user error is one line that names
the problem and the fix (exit status 2); `--debug` shows the traceback instead."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .train.signals import Signals

if TYPE_CHECKING:
    from .train import TrainArgs

# What bad input raises: reported in one line. Anything else is a fault of fastseq's (exit status 1).
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)
log = logging.getLogger("fastseq.generate")


_OWN_DIRECTORY = "write to a directory of its own"


def _convert(args: argparse.Namespace) -> None:
    from .checkpoint import from_pretrained, resolve_dtype
    from .files import check_apart, parse_size
    from .hub import model_directory

    destination = args.to or args.destination
    parse_size(args.max_shard_size, "--max-shard-size")  # before anything is read
    dtype = resolve_dtype(args.dtype)
    if args.from_deepspeed:
        from .distributed.convert import convert

        if not destination or args.source:
            raise ValueError("use: fastseq convert --from-deepspeed OUTPUT/checkpoint-STEP --to DIR")
        check_apart(destination, "--to", {"--from-deepspeed": args.from_deepspeed}, _OWN_DIRECTORY)
        _check_empty(destination, "--to", args.overwrite)
        with _disk_full_said(args.from_deepspeed, destination, dtype):
            convert(args.from_deepspeed, destination, max_shard_size=args.max_shard_size, dtype=dtype)
        return
    if not args.source or not destination:
        raise ValueError("use: fastseq convert SRC DST, or fastseq convert --from-deepspeed CKPT --to DIR")
    from .distributed.convert import copy_side_files
    from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter_directory, merged_model

    check_apart(destination, "DST", {"SRC": args.source}, _OWN_DIRECTORY)
    source = model_directory(args.source)  # a hub id: its snapshot, whose tokenizer files are copied too
    if args.base and not args.merge_lora:
        raise ValueError("--base names the model LoRA adapters were trained on; it goes with --merge-lora")
    if args.merge_lora != is_adapter_directory(source):
        if args.merge_lora:
            raise ValueError(f"--merge-lora: {source} has no {ADAPTER_CONFIG}; pass the output directory of a run "
                             "trained with --lora-r")  # fmt: skip
        raise ValueError(f"{source} holds LoRA adapters ({ADAPTER_CONFIG}); pass --merge-lora to write their base "
                         "model with them merged in")  # fmt: skip
    if args.merge_lora:
        from .lora import read_adapter_config

        base = args.base or read_adapter_config(source).get("base_model_name_or_path")
        if base and Path(base).is_dir():  # the base is an input too: DST may not overwrite it
            check_apart(destination, "DST", {"the base model": base}, _OWN_DIRECTORY)
    _check_empty(destination, "DST", args.overwrite)
    if args.merge_lora:
        model = merged_model(source, base=args.base, dtype=dtype)
    else:
        model = from_pretrained(source, dtype=dtype)
    if args.overwrite:  # a LoRA run's adapters left there would be loaded in place of the model written
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            Path(destination, name).unlink(missing_ok=True)
    with _disk_full_said(source, destination, dtype):
        model.save_pretrained(destination, max_shard_size=args.max_shard_size)
        copied = copy_side_files(source, Path(destination))
    print(f"fastseq convert: {type(model).__name__} ({model.num_parameters():,} parameters) -> {destination}"
          f"{'; copied ' + ', '.join(copied) if copied else ''}")  # fmt: skip


def _check_empty(destination: str, flag: str, overwrite: bool) -> None:
    """convert writes a new directory: one that holds anything (another model, a run and its checkpoints)
    is refused unless --overwrite asks to replace its model files there (saving removes the weight shards
    of another model, and leaves the rest)."""
    path = Path(destination)
    if overwrite or not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ValueError(f"{flag} {destination} is not empty (it holds {shown}); convert to a new directory, or pass "
                         "--overwrite to replace its model files")  # fmt: skip


@contextlib.contextmanager
def _disk_full_said(source, destination: str, dtype):
    """A full disk (or quota, or file-size limit) while `fastseq convert` writes: the line `train`
    gives (`fastseq.files.disk_full`), with the space the converted weights need."""
    from .files import DiskFull, disk_full, is_disk_full

    try:
        yield
    except Exception as err:
        if isinstance(err, DiskFull) or not is_disk_full(err):
            raise
        from .checkpoint import read_model_config
        from .memory import parameter_count

        needed = parameter_count(read_model_config(source)[0]) * dtype.itemsize
        raise disk_full(err, Path(destination), "the converted model", needed, "free space there, or convert to "
                        "another destination") from err  # fmt: skip


# `fastseq generate`'s settings where neither a flag nor the model directory's generation_config.json sets one.
GENERATE_DEFAULTS = dict(max_new_tokens=64, num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                         repetition_penalty=1.0, early_stopping=False)  # fmt: skip


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import from_pretrained
    from .files import reason
    from .generation import PREDICTION_CONFIG, check_settings, read_json_file, recorded_prediction, settings_from_file
    from .hub import model_directory
    from .lora import is_adapter_directory, merged_model
    from .tokenizers import check_vocabulary, load_tokenizer
    from .train.engine import resolve_device

    _check_generate_options(args)
    device = resolve_device(args.device)
    texts, records = _generate_inputs(args)
    directory = model_directory(args.model)
    if is_adapter_directory(directory):  # a LoRA run's output: its base with the adapters merged in
        model = merged_model(directory).to(device)
    else:
        model = from_pretrained(directory).to(device)
    tokenizer = load_tokenizer(args.tokenizer or directory)
    check_vocabulary(tokenizer, model.config.vocab_size)  # its ids past the embedding would index out of range
    # As the run that trained the model evaluated: its source prefix and max source length, and the
    # generation_config.json settings (transformers' generate reads the same file); a flag wins.
    recorded_prefix, recorded_limit = recorded_prediction(read_json_file(directory / PREDICTION_CONFIG),
                                                          directory / PREDICTION_CONFIG)  # fmt: skip
    generation_file = directory / "generation_config.json"
    from_file = settings_from_file(read_json_file(generation_file), generation_file)
    flags = {name: getattr(args, name) for name in GENERATE_DEFAULTS if getattr(args, name, None) is not None}
    prefix = args.source_prefix if args.source_prefix is not None else recorded_prefix or ""
    limit = args.max_source_length if args.max_source_length is not None else recorded_limit
    applied = {k: v for k, v in from_file.items() if k not in flags}
    try:  # the file's settings that no flag overrides, before any work: a bad one names the file
        check_settings(model.config, **{**GENERATE_DEFAULTS, **applied})
    except ValueError as err:
        raise ValueError(f"{generation_file}: {err}; fix the field, or pass its flag") from None
    if args.source_prefix is None and prefix:
        applied["source_prefix"] = prefix
    if args.max_source_length is None and limit is not None:
        applied["max_source_length"] = limit
    if applied and not args.quiet:
        log.info("from %s: %s (a flag overrides each)", directory,
                 ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}" for k, v in applied.items()))  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(args.seed)
    settings = dict({**GENERATE_DEFAULTS, **from_file, **flags}, do_sample=args.do_sample, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, generator=generator)  # fmt: skip
    cut = [0]  # the inputs longer than `limit` tokens, cut to it

    def outputs():
        """Each input's output text, batch by batch (a progress bar on stderr for file input)."""
        from tqdm import tqdm

        quiet = args.quiet or bool(args.texts)  # texts given as arguments: a few, no bar
        with tqdm(total=len(texts), desc="generate", unit="input", disable=quiet, file=sys.stderr) as progress:
            for start in range(0, len(texts), args.batch_size):
                chunk = [prefix + text for text in texts[start : start + args.batch_size]]
                batch = tokenizer(chunk, padding=True, truncation=limit is not None, max_length=limit)
                if limit is not None:
                    cut[0] += int((tokenizer(chunk, padding=True)["attention_mask"].sum(1) > limit).sum())
                try:
                    out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), **settings)
                except (RuntimeError, MemoryError) as err:
                    if not _out_of_memory(err):
                        raise
                    longest = int(batch["attention_mask"].sum(1).max())
                    raise ValueError(
                        f"generating for inputs of up to {longest} tokens ran out of memory "
                        f"({reason(err)}); pass --max-source-length N to cut the inputs to N "
                        "tokens, or a smaller --batch-size"
                    ) from None
                yield from tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
                progress.update(len(chunk))
        if cut[0]:
            why = "(--max-source-length) and were cut to it"
            if args.max_source_length is None:
                why = (
                    f"({PREDICTION_CONFIG}'s max_source_length) and were cut to it; pass --max-source-length N to "
                    "change it"
                )
            log.warning("%d of %d inputs are longer than %d tokens %s", cut[0], len(texts), limit, why)

    lines = (_output_line(text, i, records, args.output_field) for i, text in enumerate(outputs()))
    if args.output_file in (None, "-"):
        for line in lines:
            print(line, flush=True)
        return
    from .files import atomic_write

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line + "\n")

    atomic_write(Path(args.output_file), write)
    print(f"fastseq generate: {len(texts)} outputs -> {args.output_file}", file=sys.stderr)


def _count(text: str) -> int:
    """An argparse type: an int, also when written as 1e9 (a count written in float notation is read as
    the count it spells, and then checked against its limit)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def _out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation that failed: CUDA's out-of-memory error, the CPU allocator's."""
    import torch

    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err)


def _check_generate_options(args: argparse.Namespace) -> None:
    """The options generation itself does not check (it checks its settings), before anything is read."""
    for name, low in (("batch_size", 1), ("max_source_length", 1), ("seed", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}; got {value}")
    if args.seed >= 2**64:
        raise ValueError(f"--seed must be below 2**64 (torch's seeds are 64-bit); got {args.seed}")
    if args.texts and args.input_file is not None:
        raise ValueError("pass input texts as arguments or --input-file FILE, not both")
    jsonl, input_field = _jsonl_input(args)
    if jsonl and args.output_field == input_field.split(".")[0]:
        raise ValueError(f"--output-field {args.output_field} would replace each record's input ({input_field}) with "
                         "its output; choose another --output-field")  # fmt: skip
    if args.output_file not in (None, "-"):
        out = Path(args.output_file)
        if out.is_dir():
            raise ValueError(f"--output-file {out} is a directory; pass a file name")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"--output-file {out}: the directory {out.parent} does not exist; create it first")
        from .files import check_apart

        source = args.input_file if args.input_file != "-" else None
        check_apart(out, "--output-file", {"--input-file": source}, "write the outputs to another file")
        _check_model_files_kept(out, {"--model": args.model, "--tokenizer": args.tokenizer})


# What a model directory's loaders read besides the names below: a new file of these kinds there would be read
# as the model's own (a config, weights, a tokenizer's model).
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model")
_MODEL_NAMES = ("merges.txt",)


def _check_model_files_kept(out: Path, directories: dict[str, str | None]) -> None:
    """generate's --output-file may be a new file inside --model or --tokenizer (predictions beside the model),
    but not one that is already there (a run's own file) nor one the model's loaders would read."""
    target = Path(os.path.realpath(out))
    for flag, value in directories.items():
        if value is None or not Path(value).is_dir() or Path(os.path.realpath(value)) not in target.parents:
            continue
        if target.exists():
            raise ValueError(f"--output-file {out} would replace a file of {flag} {value}; write the outputs to "
                             "another file")  # fmt: skip
        if target.suffix in _MODEL_SUFFIXES or target.name in _MODEL_NAMES:
            raise ValueError(f"--output-file {out} lies inside {flag} {value}, whose loaders would read it as the "
                             "model's own file; write the outputs to another file")  # fmt: skip


def _jsonl_input(args: argparse.Namespace) -> tuple[bool, str]:
    """Whether `generate` reads JSON-lines records (a `.jsonl` --input-file, or any input with
    --input-field; texts given as arguments are text), and the records' input field."""
    source = args.input_file or "-"
    jsonl = not args.texts and (args.input_field is not None or source.lower().endswith(".jsonl"))
    return jsonl, args.input_field or "source"


def _generate_inputs(args: argparse.Namespace) -> tuple[list[str], list[dict] | None]:
    """The input texts, and for JSON-lines input the records they came from (None otherwise).
    Texts come from the arguments, else from --input-file (`-`: stdin), else from stdin."""
    from .data.readers import valid_text

    if args.texts:
        return list(args.texts), None
    source = args.input_file or "-"
    if source == "-" and sys.stdin.isatty():
        raise ValueError("no input: pass texts as arguments, --input-file FILE, or pipe them on stdin")
    jsonl, field = _jsonl_input(args)
    name = "<stdin>" if source == "-" else source
    texts, records = [], []
    for number, line in _input_lines(source):
        where = f"{name}:{number}"
        if not jsonl:
            texts.append(valid_text(line.rstrip("\r\n"), where))
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); fix the line") from None
        texts.append(valid_text(_input_field(record, field, where), where))
        records.append(record)
    if not texts:
        raise ValueError(f"{name} holds no input; pass a file with one input per line")
    return texts, records if jsonl else None


def _input_lines(source: str):
    """(line number, line) of `source` (`-`: stdin), UTF-8 (a leading byte-order mark dropped), decoded line
    by line so that an error names the line."""
    name = "<stdin>" if source == "-" else source
    if source == "-":
        handle = sys.stdin.buffer
    else:
        path = Path(source)
        if path.is_dir():
            raise ValueError(f"--input-file {path} is a directory; pass a file with one input per line")
        if not path.exists():
            raise FileNotFoundError(f"--input-file {path} does not exist; pass a file with one input per line")
        handle = path.open("rb")
    try:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{name}:{number}: not UTF-8 text ({err.reason}); convert the file to UTF-8") from None
    finally:
        if handle is not sys.stdin.buffer:
            handle.close()


def _input_field(record, name: str, where: str) -> str:
    """record[name], where `a.b` reaches into nested objects (`translation.en`), as `--source-field` does."""
    from .data.readers import MISSING, field, json_kind

    value = field(record, name) if isinstance(record, dict) else MISSING
    if value is MISSING:
        has = f"the record has {sorted(record)}" if isinstance(record, dict) else f"the line is {json_kind(record)}"
        raise ValueError(f"{where}: no field {name!r} ({has}); choose it with --input-field")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} is {json_kind(value)}, not text; choose another --input-field")
    return value


def _output_line(text: str, index: int, records: list[dict] | None, field: str) -> str:
    """One line of output: the text with its line breaks as spaces (one output per line), or for JSON-lines
    input the input record with the output under `field`."""
    if records is None:
        return " ".join(text.splitlines())
    return json.dumps({**records[index], field: text}, ensure_ascii=False)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from .optim import OPTIMIZERS, SCHEDULES
    from .train import TrainArgs

    d = TrainArgs()
    parser.add_argument("--config", default=None, help="a YAML file of these options (command-line flags win)")
    parser.add_argument("--model", default=None, help="model directory or hub id (ORG/NAME, through the Hugging Face "
                        "cache); a preset name with --random-init (default: a small T5 v1.1)")  # fmt: skip
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="train --model's config (a preset or a directory) from random weights")  # fmt: skip
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument("--data", default=None,
                        help=".jsonl/.json/.csv/.tsv/.parquet (also .gz), a pipe or a `datasets` directory (seq2seq); "
                             ".txt (denoise); synthetic: the built-in task, the default without --model (HF: "
                             "--train_file)")  # fmt: skip
    parser.add_argument("--eval-data", default=None, help="held-out data, the same kinds (HF: --validation_file)")
    parser.add_argument("--test-data", default=None,
                        help="test data, the same kinds, predicted and scored at the end: OUTPUT/"
                             "test_predictions.jsonl, predict_results.json (HF: --do_predict --test_file)")  # fmt: skip
    parser.add_argument("--dataset-name", default=None, help="a dataset datasets.load_dataset resolves (hub id)")
    parser.add_argument("--dataset-config-name", default=None, help="the configuration of --dataset-name")
    parser.add_argument("--train-split", default=None, help="the split trained on (default train)")
    parser.add_argument("--eval-split", default=None,
                        help="held-out split of --dataset-name (a DatasetDict --eval-data: validation)")  # fmt: skip
    parser.add_argument("--source-prefix", default=None, help='put before every source text ("summarize: ")')
    parser.add_argument("--task", default=None, choices=["seq2seq", "denoise"])
    parser.add_argument("--source-field", default=None, help="field; a.b reaches into objects (HF: --text_column)")
    parser.add_argument("--target-field", default=None, help="target field (HF: --summary_column)")
    parser.add_argument("--output-dir", "--output", dest="output_dir", default=None, help=f"default {d.output_dir}")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the files of an earlier run in --output-dir (other files are kept)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    parser.add_argument("--epochs", type=float, default=None,
                        help="passes over the data instead of --steps (HF: --num_train_epochs)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per batch instead of --batch-size")
    parser.add_argument("--buffer-size", type=int, default=None, help="examples shuffled and bucketed at a time")
    parser.add_argument("--pack", action="store_true", default=None, help="several examples per row (t5x packing)")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate; adafactor's default: its relative step from scratch, 1e-3 for a "
                             "pretrained directory (0: relative step); adamw needs one")  # fmt: skip
    parser.add_argument("--schedule", default=None, choices=SCHEDULES)
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    parser.add_argument("--warmup-ratio", type=float, default=None, help="warm-up as a fraction of --steps")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--clip", type=float, default=None, help="gradient-norm clipping (0: none)")
    parser.add_argument("--label-smoothing", type=float, default=None,
                        help="eps of the label-smoothed training loss (HF: --label_smoothing_factor)")  # fmt: skip
    parser.add_argument("--max-source-length", type=int, default=None,
                        help="source tokens kept (default: 512; a LongT5 model's n_positions, else 4096)")  # fmt: skip
    parser.add_argument("--max-target-length", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--force-fp16", action="store_true", default=None, help="allow fp16 for T5-family models")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument(
        "--max-eval-samples",
        "--eval-examples",
        dest="max_eval_samples",
        type=int,
        default=None,
        help="evaluate the first N held-out examples (default: all; the built-in task's 256)",
    )
    parser.add_argument("--max-train-samples", type=int, default=None, help="train on the first N examples of the data")
    parser.add_argument("--max-predict-samples", type=int, default=None,
                        help="predict the first N examples of --test-data (default: all)")  # fmt: skip
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and at the end)")
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the latest checkpoint in --output-dir (or from the one given)")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", default=None, help="no progress bar")
    parser.add_argument("--deepspeed", default=None,
                        help="a DeepSpeed JSON config, or a shipped one's name (zero1, zero2, zero3, zero3_offload, "
                             "pipeline ...; see `fastseq plan`); start with `deepspeed`")  # fmt: skip
    parser.add_argument("--metric", default=None,
                        help="held-out metrics, comma separated: exact_match (default), rouge, bleu, chrf; none: "
                             "the loss only")  # fmt: skip
    parser.add_argument("--num-beams", type=int, default=None, help="evaluation's beams (default 1: greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="evaluation's generation limit (default: --max-target-length)")  # fmt: skip
    parser.add_argument("--metric-for-best-model", default=None,
                        help="a held-out score (eval_loss, rougeL, bleu ...) picking the best checkpoint")  # fmt: skip
    parser.add_argument("--eval-strategy", default=None, choices=["steps", "epoch", "no"],
                        help="steps: every --eval-every and --save-every steps (default); epoch: evaluate and save at "
                             "each epoch's end; no: evaluate at the end only (HF: --eval_strategy)")  # fmt: skip
    parser.add_argument("--early-stopping-patience", type=int, default=None,
                        help="stop after N evaluations without a better --metric-for-best-model (HF's "
                             "EarlyStoppingCallback)")  # fmt: skip
    parser.add_argument("--greater-is-better", type=str.lower, default=None, choices=["true", "false"],
                        help="whether a larger --metric-for-best-model wins (default: not for a loss)")  # fmt: skip
    parser.add_argument("--save-total-limit", type=int, default=None,
                        help="keep at most N checkpoints, never the best or the latest")  # fmt: skip
    parser.add_argument("--load-best-model-at-end", action="store_true", default=None,
                        help="at the end, OUTPUT's model (its evaluation and predictions too) is the best "
                             "checkpoint's by --metric-for-best-model")  # fmt: skip
    parser.add_argument("--report-to", default=None, choices=["none", "tensorboard", "wandb"],
                        help="also log metrics.jsonl's scalars to TensorBoard under OUTPUT/runs, or to a W&B run "
                             "under OUTPUT/wandb (WANDB_MODE=offline: no network)")  # fmt: skip
    parser.add_argument("--lora-r", type=int, default=None,
                        help="train LoRA adapters of this rank (peft) on the frozen --model (0: no LoRA)")  # fmt: skip
    parser.add_argument("--lora-alpha", type=float, default=None, help="the adapters' scale is alpha / r (default 2r)")
    parser.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (0.05)")
    parser.add_argument("--lora-targets", default=None,
                        help="layers that get adapters, comma separated (default q,v; T5 also k,o,wi_0,wi_1,wi,wo: "
                             "a feed-forward block with an adapter runs unfused)")  # fmt: skip
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def train_args(ns: argparse.Namespace) -> TrainArgs:
    """The run's TrainArgs from `--config FILE.yaml` and the flags (flags win)."""
    from .train import TrainArgs

    values: dict = {}
    if getattr(ns, "config", None):
        values.update(_yaml_options(Path(ns.config)))
    skipped = ("config", "func", "command", "local_rank", "debug")  # --local_rank: LOCAL_RANK says the same
    values.update({k: v for k, v in vars(ns).items() if v is not None and k not in skipped})
    return TrainArgs.from_dict(values)


def _yaml_options(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path} is not a file; pass a YAML file of training options")
    try:
        text = path.read_text(encoding="utf-8")
        _check_yaml_events(yaml, path, text)
        _check_yaml_keys(yaml, path, text)
        loaded = yaml.safe_load(text) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not valid YAML ({str(err).splitlines()[0]}); fix the file") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of options (steps: 100, lr: 1.0e-3, ...)")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


_YAML_DEPTH = 32  # collections inside collections in a --config (its options are one level, a few lists)


def _check_yaml_events(yaml, path: Path, text: str) -> None:
    """Anchors and aliases are refused: nested aliases ("billion laughs") expand a few lines into
    gigabytes. The events are read one by one, so nothing is expanded to find them; nor is a
    collection nested past `_YAML_DEPTH` read on (100,000 levels took the loader minutes)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
        if depth > _YAML_DEPTH:
            raise ValueError(f"--config {path}:{event.start_mark.line + 1}: nested deeper than {_YAML_DEPTH} levels; "
                             "a training config is a mapping of options")  # fmt: skip
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            kind = "alias *" if isinstance(event, yaml.AliasEvent) else "anchor &"
            raise ValueError(f"--config {path}:{event.start_mark.line + 1}: YAML {kind}{event.anchor} is not "
                             "accepted in a training config; write each option out")  # fmt: skip


def _check_yaml_keys(yaml, path: Path, text: str) -> None:
    """An option given twice (`steps:` twice, or `batch_size:` and `batch-size:`) is refused: YAML keeps
    the last one without a word."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, tuple[str, int]] = {}
    for key, _ in node.value:
        name = str(key.value).replace("-", "_")
        line = key.start_mark.line + 1
        if name in seen:
            given, first = seen[name]
            raise ValueError(f"--config {path}:{line}: option {key.value} is given twice (also as {given} on line "
                             f"{first}); keep one")  # fmt: skip
        seen[name] = (str(key.value), line)


def _plan(ns: argparse.Namespace) -> None:
    import dataclasses
    import math

    from .distributed.plan import Cluster, show
    from .memory import host_memory_gib

    checks = {"--gpus": (ns.gpus, 1), "--gpus-per-node": (ns.gpus_per_node, 1)}
    for flag, (value, low) in checks.items():
        if value is not None and value < low:
            raise ValueError(f"{flag} must be at least {low}; got {value}")
    for flag, value in {"--gpu-mem": ns.gpu_mem, "--cpu-mem": ns.cpu_mem}.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be a positive number of GiB; got {value}")
    per_node = ns.gpus_per_node or min(ns.gpus, 8)
    if ns.gpus % per_node:
        raise ValueError(f"--gpus {ns.gpus} is not a multiple of --gpus-per-node {per_node}")
    from .train import TrainArgs
    from .train.args import SYNTHETIC

    fields = [f.name for f in dataclasses.fields(TrainArgs)]
    options = _yaml_options(Path(ns.config)) if ns.config else {}
    options.update({k: v for k, v in vars(ns).items() if k in fields and v is not None})
    options.setdefault("batch_size", 1)  # the plan's micro-batch per GPU unless one is given
    # A model fine-tuned on no data given: the printed command names the data options as placeholders to fill.
    placeholders = {}
    if options.get("model") and not options.get("random_init") and not {"data", "dataset_name"} & set(options):
        placeholders = {"data": PLAN_DATA, **({} if options.get("eval_data") else {"eval_data": PLAN_EVAL_DATA})}
    args = TrainArgs.from_dict({**options, **({"data": SYNTHETIC} if placeholders else {})})
    args.validate()
    options = {name: getattr(args, name) for name in fields if name in options}  # typed, in TrainArgs order
    options = {name: placeholders.get(name, options.get(name)) for name in fields if name in {*options, *placeholders}}
    cpu_mem = ns.cpu_mem if ns.cpu_mem is not None else host_memory_gib()
    cluster = Cluster(gpus=ns.gpus, gpus_per_node=per_node, gpu_mem=ns.gpu_mem, cpu_mem=cpu_mem)
    show(args, options, cluster, cpu_from_machine=ns.cpu_mem is None)


# What `fastseq plan`'s command names for the data of a pretrained model when no data option was given.
PLAN_DATA, PLAN_EVAL_DATA = "TRAIN.jsonl", "EVAL.jsonl"


def _bench(ns: argparse.Namespace) -> None:
    from .bench import run

    run(ns.names, quick=ns.quick, out=ns.out, readme=ns.readme, compile=ns.compile)


def _train(ns: argparse.Namespace) -> int:
    from .train import train

    summary = train(train_args(ns))
    stopped = summary["interrupted"]
    return 128 + getattr(signal, stopped) if stopped else 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import NAMES as BENCHMARKS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show its traceback")
    parser = argparse.ArgumentParser(prog="fastseq", description="Fast training of T5-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", parents=[common], help="train a model (no arguments: the embedded default run)")
    add_train_arguments(p_train)
    p_train.set_defaults(func=_train)
    p_gen = sub.add_parser("generate", parents=[common], help="generate text with a trained model directory")
    p_gen.add_argument("--model", required=True, help="a model directory (with its tokenizer files)")
    p_gen.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p_gen.add_argument("texts", nargs="*", help="input texts, one output line each (none: --input-file or stdin)")
    p_gen.add_argument("--input-file", default=None, metavar="FILE",
                       help="one input per line; .jsonl: a JSON object per line (--input-field); -: stdin")  # fmt: skip
    p_gen.add_argument("--input-field", default=None,
                       help="the field of each JSON line to generate from, a.b for nested (default: source); "
                            "implies JSON-lines input")  # fmt: skip
    p_gen.add_argument(
        "--output-file",
        default=None,
        metavar="FILE",
        help="the outputs, written atomically (-: stdout, the default); JSON lines for JSON",
    )
    p_gen.add_argument("--output-field", default="prediction", help="the output's field in JSON-lines output")
    p_gen.add_argument("--batch-size", type=_count, default=16, help="inputs generated at a time")
    p_gen.add_argument("--source-prefix", default=None,
                       help='put before every input (default: the one the model was trained with)')  # fmt: skip
    p_gen.add_argument("--max-new-tokens", type=_count, default=None,
                       help="default: generation_config.json's (its max_length - 1), else 64")  # fmt: skip
    p_gen.add_argument("--max-source-length", type=_count, default=None,
                       help="cut inputs to this many tokens (default: the model's training run's)")  # fmt: skip
    p_gen.add_argument("--num-beams", type=_count, default=None, help="default: generation_config.json's, else 1")
    p_gen.add_argument("--length-penalty", type=float, default=None,
                       help="log-prob / length ** this (default: generation_config.json's, else 1)")  # fmt: skip
    p_gen.add_argument("--no-repeat-ngram-size", type=_count, default=None,
                       help="never repeat an n-gram this long (default: generation_config.json's, else 0)")  # fmt: skip
    p_gen.add_argument("--min-new-tokens", type=_count, default=None,
                       help="no eos before this many tokens (default: generation_config.json's, else 0)")  # fmt: skip
    p_gen.add_argument("--repetition-penalty", type=float, default=None,
                       help="CTRL's penalty (default: generation_config.json's, else 1.0: none)")  # fmt: skip
    p_gen.add_argument("--do-sample", action="store_true")
    p_gen.add_argument("--temperature", type=float, default=1.0)
    p_gen.add_argument("--top-k", type=_count, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p_gen.add_argument("--quiet", action="store_true", help="no progress bar")
    p_gen.set_defaults(func=_generate)
    p_convert = sub.add_parser(
        "convert",
        parents=[common],
        help="re-save a Hugging Face model directory (dtype, shards), or write one from a DeepSpeed run",
    )
    p_convert.add_argument("source", nargs="?")
    p_convert.add_argument("destination", nargs="?")
    p_convert.add_argument("--from-deepspeed", default=None, metavar="CKPT",
                           help="a checkpoint of `fastseq train --deepspeed` (OUTPUT/checkpoint-STEP)")  # fmt: skip
    p_convert.add_argument("--to", default=None, metavar="DIR", help="the Hugging Face directory to write")
    p_convert.add_argument("--merge-lora", action="store_true",
                           help="SRC is a LoRA run's output: write its base with the adapters merged in")  # fmt: skip
    p_convert.add_argument("--base", default=None, metavar="MODEL",
                           help="with --merge-lora: the base model (default: the adapter config's)")  # fmt: skip
    p_convert.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p_convert.add_argument("--max-shard-size", default="5GB")
    p_convert.add_argument("--overwrite", action="store_true",
                           help="write into a destination that is not empty, replacing its model files")  # fmt: skip
    p_convert.set_defaults(func=_convert)
    p_plan = sub.add_parser(
        "plan",
        parents=[common],
        help="which DeepSpeed strategy fits a model on a cluster, its memory, config and launch command",
        description="Plans the run `fastseq train` would make with the same options (--model, --batch-size, "
        "--grad-accum, --max-source-length, --max-target-length, --optimizer, --precision, "
        "--gradient-checkpointing ...), and prints the launch command with them.",
    )
    p_plan.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p_plan.add_argument("--gpus-per-node", type=int, default=None, help="default: min(gpus, 8)")
    p_plan.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of memory per GPU (default 80)")
    p_plan.add_argument("--cpu-mem", type=float, default=None,
                        help="GiB of host memory per node (default: this machine's)")  # fmt: skip
    add_train_arguments(p_plan)
    # The planner's earlier names of train's --batch-size, --max-source-length and --max-target-length.
    p_plan.add_argument("--batch", dest="batch_size", type=int, help=argparse.SUPPRESS)
    p_plan.add_argument("--seq", dest="max_source_length", type=int, help=argparse.SUPPRESS)
    p_plan.add_argument("--target", dest="max_target_length", type=int, help=argparse.SUPPRESS)
    p_plan.set_defaults(func=_plan)
    p_bench = sub.add_parser("bench", parents=[common], help="run the benchmarks and write their CSVs, plots and table")
    p_bench.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    p_bench.add_argument("--quick", action="store_true", help="tiny sizes on the CPU: checks that every script works")
    p_bench.add_argument("--out", default=None, help="results directory (default: bench/results)")
    p_bench.add_argument("--readme", default=None, help="the README whose results table is rewritten")
    p_bench.add_argument("--compile", action="store_true", help="also time torch.compile of each training provider")
    p_bench.set_defaults(func=_bench)
    return parser


def _one_line(err: BaseException) -> str:
    """The error and its notes (where a failed run's state was saved) in one line."""
    if isinstance(err, OSError) and err.strerror:  # raised by the OS: "[Errno 13] ..." says less than this
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err)
    text = " ".join(text.split()) or type(err).__name__
    return "; ".join([text, *(" ".join(note.split()) for note in getattr(err, "__notes__", []))])


def main(argv: list[str] | None = None) -> int:
    """`fastseq COMMAND ...`. Its signal handlers (`Signals`) are installed before anything heavy is
    imported (torch takes seconds): SIGINT, SIGTERM or SIGHUP at any moment of the start-up is the
    line a later one gives ("interrupted", exit status 128 + the signal's number)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = f"fastseq {argv[0]}" if argv and not argv[0].startswith("-") else "fastseq"
    with Signals():
        try:
            return _run(argv)
        except KeyboardInterrupt as err:  # before training starts, or Ctrl-C twice: no checkpoint waited for
            if "--debug" in argv:
                raise
            number = getattr(err, "number", signal.SIGINT)
            said = "" if number == signal.SIGINT else f" by {signal.Signals(number).name}"
            notes = "".join(f"; {note}" for note in getattr(err, "__notes__", []))
            print(f"{command}: interrupted{said}{notes}", file=sys.stderr)
            return 128 + number


def _run(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"fastseq {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(f"fastseq {args.command}: internal error: {type(err).__name__}: {_one_line(err)}; rerun with --debug "
              "for the traceback and report it", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
