"""The `fastseq` command: the only place that knows argparse. A user error is one line that names
the problem and the fix (exit status 2); `--debug` shows the traceback instead."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .bench import NAMES as BENCHMARKS
from .optim import OPTIMIZERS, SCHEDULES
from .train import TrainArgs, train

# What bad input raises: reported in one line. Anything else is a fault of fastseq's (exit status 1).
USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


def _convert(args: argparse.Namespace) -> None:
    from .checkpoint import from_pretrained

    destination = args.to or args.destination
    if args.from_deepspeed:
        from .checkpoint import resolve_dtype
        from .distributed.convert import convert

        if not destination or args.source:
            raise ValueError("use: fastseq convert --from-deepspeed OUTPUT/checkpoint-STEP --to DIR")
        convert(args.from_deepspeed, destination, max_shard_size=args.max_shard_size, dtype=resolve_dtype(args.dtype))
        return
    if not args.source or not destination:
        raise ValueError("use: fastseq convert SRC DST, or fastseq convert --from-deepspeed CKPT --to DIR")
    args.destination = destination
    model = from_pretrained(args.source, dtype=args.dtype)
    model.save_pretrained(args.destination, max_shard_size=args.max_shard_size)
    print(f"fastseq convert: {type(model).__name__} ({model.num_parameters():,} parameters) -> {args.destination}")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from .checkpoint import from_pretrained
    from .tokenizers import load_tokenizer

    model = from_pretrained(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    batch = tokenizer(args.texts, padding=True, truncation=args.max_source_length is not None,
                      max_length=args.max_source_length)  # fmt: skip
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(
        batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams, do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, generator=generator,
    )  # fmt: skip
    for text in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True):
        print(text)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainArgs()
    parser.add_argument("--config", default=None, help="a YAML file of these options (command-line flags win)")
    parser.add_argument("--model", default=None, help="preset name or checkpoint directory (default: a small T5 v1.1)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    parser.add_argument("--data", default=None,
                        help=".jsonl/.json/.csv/.tsv/.parquet (also .gz), a pipe or a `datasets` directory (seq2seq); "
                             ".txt (denoise); default: synthetic (HF: --train_file)")  # fmt: skip
    parser.add_argument("--eval-data", default=None, help="held-out data, the same kinds (HF: --validation_file)")
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
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZERS)
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate; adafactor's default: its relative step from scratch, 1e-3 for a "
                             "pretrained directory (0: relative step); adamw needs one")  # fmt: skip
    parser.add_argument("--schedule", default=None, choices=SCHEDULES)
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--clip", type=float, default=None, help="gradient-norm clipping (0: none)")
    parser.add_argument("--max-source-length", type=int, default=None,
                        help="source tokens kept (default: 512; a LongT5 model's n_positions, else 4096)")  # fmt: skip
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


def train_args(ns: argparse.Namespace) -> TrainArgs:
    """The run's TrainArgs from `--config FILE.yaml` and the flags (flags win)."""
    values: dict = {}
    if getattr(ns, "config", None):
        values.update(_yaml_options(Path(ns.config)))
    skipped = ("config", "func", "command", "local_rank", "debug")  # --local_rank: LOCAL_RANK says the same
    values.update({k: v for k, v in vars(ns).items() if v is not None and k not in skipped})
    args = TrainArgs.from_dict(values)
    if args.lr == 0:  # --lr 0: Adafactor's relative step
        args.lr = None
    return args


def _yaml_options(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path} is not a file; pass a YAML file of training options")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path} is not valid YAML ({str(err).splitlines()[0]}); fix the file") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of options (steps: 100, lr: 1.0e-3, ...)")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def _plan(ns: argparse.Namespace) -> None:
    from .distributed.plan import show

    show(ns.model, gpus=ns.gpus, gpus_per_node=ns.gpus_per_node, gpu_mem=ns.gpu_mem, cpu_mem=ns.cpu_mem,
         batch=ns.batch, seq=ns.seq, target=ns.target)  # fmt: skip


def _bench(ns: argparse.Namespace) -> None:
    from .bench import run

    run(ns.names, quick=ns.quick, out=ns.out, readme=ns.readme, compile=ns.compile)


def _train(ns: argparse.Namespace) -> int:
    summary = train(train_args(ns))
    stopped = summary["interrupted"]
    return 128 + getattr(signal, stopped) if stopped else 0


def build_parser() -> argparse.ArgumentParser:
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
    p_gen.add_argument("texts", nargs="+", help="input texts, one output line each")
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--max-source-length", type=int, default=None)
    p_gen.add_argument("--num-beams", type=int, default=1)
    p_gen.add_argument("--do-sample", action="store_true")
    p_gen.add_argument("--temperature", type=float, default=1.0)
    p_gen.add_argument("--top-k", type=int, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--device", default=None)
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
    p_convert.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p_convert.add_argument("--max-shard-size", default="5GB")
    p_convert.set_defaults(func=_convert)
    p_plan = sub.add_parser(
        "plan", parents=[common], help="which DeepSpeed strategy fits a model on a cluster, and its memory"
    )
    p_plan.add_argument("--model", required=True, help="a preset name (fastseq.presets.PRESETS)")
    p_plan.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p_plan.add_argument("--gpus-per-node", type=int, default=None, help="default: min(gpus, 8)")
    p_plan.add_argument("--gpu-mem", type=float, default=80.0, help="GB of memory per GPU")
    p_plan.add_argument("--cpu-mem", type=float, default=1000.0, help="GB of CPU memory per node")
    p_plan.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    p_plan.add_argument("--seq", type=int, default=512, help="input tokens")
    p_plan.add_argument("--target", type=int, default=128, help="target tokens")
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
    if isinstance(err, OSError) and err.strerror:  # raised by the OS: "[Errno 13] ..." says less than this
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    elif isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err)
    return " ".join(text.split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"fastseq {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"fastseq {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        print(f"fastseq {args.command}: internal error: {type(err).__name__}: {_one_line(err)}; rerun with --debug "
              "for the traceback and report it", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
