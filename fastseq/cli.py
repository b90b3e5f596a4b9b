"""The `fastseq` command."""

from __future__ import annotations

import argparse
import logging
import sys

from . import train


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastseq", description="Fast training of T5-family models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model (no arguments: the embedded default run)")
    train.add_arguments(p_train)
    p_train.set_defaults(func=train.run)
    p_gen = sub.add_parser("generate", help="generate text with a trained model directory")
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
        "convert", help="re-save a Hugging Face model directory (dtype, shards), or write one from a DeepSpeed run"
    )
    p_convert.add_argument("source", nargs="?")
    p_convert.add_argument("destination", nargs="?")
    p_convert.add_argument("--from-deepspeed", default=None, metavar="CKPT",
                           help="a checkpoint of `fastseq train --deepspeed` (OUTPUT/checkpoint-STEP)")  # fmt: skip
    p_convert.add_argument("--to", default=None, metavar="DIR", help="the Hugging Face directory to write")
    p_convert.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p_convert.add_argument("--max-shard-size", default="5GB")
    p_convert.set_defaults(func=_convert)
    p_plan = sub.add_parser("plan", help="which DeepSpeed strategy fits a model on a cluster, and its memory")
    from .distributed import plan as _plan

    _plan.add_arguments(p_plan)
    p_plan.set_defaults(func=_plan.run)
    from . import bench as _bench

    p_bench = sub.add_parser("bench", help="run the benchmarks and write their CSVs, plots and table")
    _bench.add_arguments(p_bench)
    p_bench.set_defaults(func=_bench.run)
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
