"""The `fastseq` command."""

from __future__ import annotations

import argparse
import logging
import sys

from . import train


def _convert(args: argparse.Namespace) -> None:
    from .checkpoint import from_pretrained

    model = from_pretrained(args.source, dtype=args.dtype)
    model.save_pretrained(args.destination, max_shard_size=args.max_shard_size)
    print(f"fastseq convert: {type(model).__name__} ({model.num_parameters():,} parameters) -> {args.destination}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseq", description="Fast training of T5-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model (no arguments: the embedded default run)")
    train.add_arguments(p_train)
    p_train.set_defaults(func=train.run)
    p_convert = sub.add_parser("convert", help="re-save a Hugging Face model directory (dtype, shards)")
    p_convert.add_argument("source")
    p_convert.add_argument("destination")
    p_convert.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p_convert.add_argument("--max-shard-size", default="5GB")
    p_convert.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        # Bad input: one clear line, no traceback.
        print(f"fastseq {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
