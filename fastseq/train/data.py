"""The data of a run, from its `TrainArgs`: a stream of example batches whose position a
checkpoint can restore, the collator, and the held-out examples (read, tokenized and so checked
at the start). Reading, collating and batching live in `fastseq.data`."""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fastseq.data import (
    Cuts,
    DataSource,
    FileStream,
    PackingCollator,
    Seq2SeqCollator,
    SpanCorruptionCollator,
    TokenLengths,
    file_source,
    hub_source,
    rng_state,
    set_rng_state,
)
from fastseq.tokenizers import Tokenizer

from .args import MAX_COUNT, TrainArgs

log = logging.getLogger("fastseq.train")
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SOURCE_LENGTH = 512  # --max-source-length's default for T5 and BlenderbotSmall
LONG_SOURCE_LENGTH = 4096  # LongT5's input length in pre-training, for a LongT5 config that names none
FLAGS = ("max-source-length", "max-target-length")
SYNTHETIC_HELD_OUT = 256  # the built-in task's held-out examples when --max-eval-samples gives none
# The most epochs --epochs counts one by one (with --max-tokens or --pack, each epoch's shuffle cuts
# its own number of batches): each is a pass over the data's lengths.
COUNTED_EPOCHS = 10_000

__all__ = ["Data", "FileStream", "SyntheticStream", "build_data", "make_examples", "max_source_length"]


def make_examples(n: int, rng: random.Random, min_len: int = 3, max_len: int = 8) -> list[tuple[str, str]]:
    """The default task: reverse a random lower-case word."""
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]
    return [(f"reverse: {w}", w[::-1]) for w in words]


def _generated(seed: int) -> Iterator[tuple[str, str]]:
    """The default task's examples, without end."""
    rng = random.Random(seed)
    while True:
        yield from make_examples(1000, rng)


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


@dataclass
class Data:
    stream: SyntheticStream | FileStream
    collator: Seq2SeqCollator | SpanCorruptionCollator | PackingCollator
    held_out: list[tuple[str, str]]  # examples for loss and exact match; empty: no evaluation
    eval_collator: Seq2SeqCollator | None  # unpacked
    fingerprint_path: str | None = None  # what identifies the training data: a file, pipe or directory
    synthetic: bool = False  # the default task, generated without end: no epochs
    test: list[tuple[str, str]] = field(default_factory=list)  # --test-data's examples, predicted at the end

    @property
    def epoch(self) -> float | None:
        """Epochs done so far (fractional where the epoch's length is known); None for the synthetic task."""
        return None if self.synthetic else self.stream.epochs_done()

    def micro_batch(self, data_parallel: int, rank: int) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        """This data-parallel rank's next micro-batch, collated on the host, and its tokens, source
        and target sides together: the real ones (not padding) and all of them, padding included;
        read from the host tensors, counting costs no device sync. Every rank reads all
        `data_parallel` batches and keeps its own, so the stream position is the same on every rank."""
        examples = [self.stream.next_batch() for _ in range(data_parallel)][rank]
        batch = self.collator(examples)
        real = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        return batch, (real, batch["input_ids"].numel() + batch["labels"].numel())

    def state_dict(self) -> dict:
        collator = self.collator.state_dict() if hasattr(self.collator, "state_dict") else None
        return {"stream": self.stream.state_dict(), "collator": collator}

    def load_state_dict(self, state: dict, batches: int) -> None:
        """A checkpoint's data position, after `batches` batches were read (each epoch holds one at least)."""
        if not isinstance(state.get("stream"), dict):
            raise ValueError(f"stream is {state.get('stream')!r:.60}, not an object")
        if isinstance(self.stream, FileStream):
            self.stream.load_state_dict(state["stream"], most_epochs=batches)
        else:
            self.stream.load_state_dict(state["stream"])
        if state.get("collator") is not None and hasattr(self.collator, "load_state_dict"):
            self.collator.load_state_dict(state["collator"])


def max_source_length(args: TrainArgs, config) -> int:
    """--max-source-length, else the model's: a LongT5 config's `n_positions` (4096 when it names
    none), 512 for the other families."""
    if args.max_source_length is not None:
        return args.max_source_length
    if config.model_type == "longt5":
        return int(config.to_hf_dict().get("n_positions") or LONG_SOURCE_LENGTH)
    return SOURCE_LENGTH


def build_data(args: TrainArgs, tokenizer: Tokenizer, config, data_parallel: int = 1) -> Data:
    """The run's data. Sets what follows from the model and the data in `args`: the default
    --max-source-length, and with --epochs the number of steps (`--grad-accum` x `data_parallel`
    batches a step, whole steps within the epochs). With --pack, training batches are packed rows;
    the held-out examples are not packed."""
    args.max_source_length = max_source_length(args, config)
    if args.pack and config.model_type == "longt5":
        raise ValueError("--pack: LongT5's local and transient-global attention take no segment ids, so a LongT5 "
                         "model does not pack; train it without --pack")  # fmt: skip
    most = getattr(config, "max_position_embeddings", None)  # BlenderbotSmall's learned positions
    if args.pack and most is not None and max(args.max_source_length, args.max_target_length) > most:
        raise ValueError(f"--pack: an example of up to {max(args.max_source_length, args.max_target_length)} tokens "
                         f"(--max-source-length {args.max_source_length}, --max-target-length "
                         f"{args.max_target_length}) has positions past the model's max_position_embeddings {most}; "
                         f"lower those lengths to at most {most}")  # fmt: skip
    sizes = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed,
                 buffer_size=args.buffer_size, pack=args.pack)  # fmt: skip
    limits = (args.max_source_length, args.max_target_length)
    collator = Seq2SeqCollator(tokenizer, max_source_length=args.max_source_length,
                               max_target_length=args.max_target_length)  # fmt: skip
    if args.synthetic:
        if args.pack:
            source = DataSource("the synthetic task", lambda: _generated(args.seed), True, None, None)
            stream = FileStream(source, TokenLengths(tokenizer), limits=limits, **sizes)
        else:
            stream = SyntheticStream(args.batch_size, args.seed)
        count = SYNTHETIC_HELD_OUT if args.max_eval_samples is None else args.max_eval_samples
        held_out = make_examples(count, random.Random(args.seed + 1))
        test = _test(args, tokenizer, limits)
        return Data(stream, _packing(collator, args.pack), held_out, collator, synthetic=True, test=test)
    if args.task == "denoise":
        corrupt = SpanCorruptionCollator(tokenizer, input_length=args.max_source_length, seed=args.seed)
        source = _first(file_source(args.data, f"--data {args.data}", args.source_field, args.target_field, text=True),
                        args.max_train_samples)  # fmt: skip
        _check_epochs(args, source)
        text = TokenLengths(tokenizer, text=True)
        if args.pack:  # rows hold the span-corrupted inputs and targets
            measure, limits = (lambda x: corrupt.lengths(text(x)[0])), corrupt.lengths(corrupt.tokens_length)
        else:
            measure, limits = text, (corrupt.tokens_length, None)
        stream = FileStream(source, measure, limits=limits, **sizes)
        _set_steps(args, stream, data_parallel)
        return Data(stream, _packing(corrupt, args.pack), [], None, source.fingerprint_path or args.data)
    source = _with_prefix(_first(_train_source(args), args.max_train_samples), args.source_prefix)
    _check_epochs(args, source)
    stream = FileStream(source, TokenLengths(tokenizer), limits=limits, flags=FLAGS, **sizes)
    _set_steps(args, stream, data_parallel)
    held_out = _held_out(args, tokenizer, limits)
    test = _test(args, tokenizer, limits)
    return Data(stream, _packing(collator, args.pack), held_out, collator, source.fingerprint_path or args.data,
                test=test)  # fmt: skip


def _packing(collator: Seq2SeqCollator | SpanCorruptionCollator, pack: bool):
    return PackingCollator(collator) if pack else collator


def _train_source(args: TrainArgs) -> DataSource:
    if args.dataset_name is not None:
        return hub_source(args.dataset_name, args.dataset_config_name, args.train_split,
                          f"--dataset-name {args.dataset_name}", args.source_field, args.target_field)  # fmt: skip
    return file_source(args.data, f"--data {args.data}", args.source_field, args.target_field, split=args.train_split)


def _eval_source(args: TrainArgs) -> DataSource | None:
    if args.eval_data is not None:
        return file_source(args.eval_data, f"--eval-data {args.eval_data}", args.source_field, args.target_field,
                           split=args.eval_split or "validation")  # fmt: skip
    if args.dataset_name is not None and args.eval_split is not None:
        return hub_source(args.dataset_name, args.dataset_config_name, args.eval_split,
                          f"--dataset-name {args.dataset_name} --eval-split {args.eval_split}", args.source_field,
                          args.target_field)  # fmt: skip
    return None


def _first(source: DataSource, count: int | None) -> DataSource:
    """The source's first `count` examples in every epoch (--max-train-samples; None: all of them)."""
    if count is None:
        return source
    total = None if source.num_examples is None else min(source.num_examples, count)
    return DataSource(f"{source.label} (first {count})", lambda: itertools.islice(source.open(), count),
                      source.rereadable, source.fingerprint_path, total)  # fmt: skip


def _with_prefix(source: DataSource, prefix: str) -> DataSource:
    """The source with --source-prefix before every source text."""
    if not prefix:
        return source
    return DataSource(source.label, lambda: ((prefix + s, t) for s, t in source.open()), source.rereadable,
                      source.fingerprint_path, source.num_examples)  # fmt: skip


def _held_out(args: TrainArgs, tokenizer: Tokenizer, limits: tuple[int, int]) -> list[tuple[str, str]]:
    """The held-out examples: all of them, or the first --max-eval-samples (`_read_all`)."""
    source = _eval_source(args)
    if source is None:
        return []
    return _read_all(source, args, tokenizer, limits, args.max_eval_samples, "held out")


def _test(args: TrainArgs, tokenizer: Tokenizer, limits: tuple[int, int]) -> list[tuple[str, str]]:
    """--test-data's examples: all of them, or the first --max-predict-samples (`_read_all`)."""
    if args.test_data is None:
        return []
    source = file_source(args.test_data, f"--test-data {args.test_data}", args.source_field, args.target_field,
                         split="test")  # fmt: skip
    return _read_all(source, args, tokenizer, limits, args.max_predict_samples, "test")


def _read_all(source: DataSource, args: TrainArgs, tokenizer: Tokenizer, limits: tuple[int, int], count: int | None,
              what: str) -> list[tuple[str, str]]:  # fmt: skip
    """The first `count` examples of `source` (None: all), with --source-prefix, all read now so that
    a bad record stops the run before training (the error names file:line); tokenized and their
    cuts reported."""
    kept = []
    for example in _with_prefix(source, args.source_prefix).open():
        if count is None or len(kept) < count:
            kept.append(example)
    if not kept and count != 0:
        raise ValueError(f"{source.label} has no examples; check the data and --source-field/--target-field")
    cuts = Cuts(limits, FLAGS)
    cuts.add([TokenLengths(tokenizer)(example) for example in kept])
    line = cuts.report(f"{source.label} ({what})")
    if line:
        log.warning(line)
    return kept


def _check_epochs(args: TrainArgs, source: DataSource) -> None:
    """Before anything is read: --epochs needs a source it can read more than once."""
    if args.epochs is not None and not source.rereadable:
        raise ValueError(
            f"{source.label} is a pipe, read once, so its epochs cannot be counted before training; pass --steps "
            "instead of --epochs (a pipe gives one epoch at most), or a regular file"
        )


def _set_steps(args: TrainArgs, stream: FileStream, data_parallel: int) -> None:
    """--epochs: the steps of that many passes, counting the batches as the stream cuts them."""
    if args.epochs is None:
        return
    whole = math.floor(args.epochs)
    part = args.epochs - whole
    if stream.varies_by_epoch:  # each epoch counted: its batches depend on its shuffle
        if whole >= COUNTED_EPOCHS:
            raise ValueError(f"--epochs {args.epochs:g} with --max-tokens or --pack: each epoch's batches are counted "
                             f"before training, at most {COUNTED_EPOCHS:,} epochs; pass --steps instead")  # fmt: skip
        counts = stream.count_batches(whole + 1)
        first, batches = counts[0], sum(counts[:whole]) + int(part * counts[whole])
    else:  # every epoch is cut into as many batches: one count, however many epochs (no list of them)
        (first,) = stream.count_batches(1)
        batches = whole * first + int(part * first)
    per_step = args.grad_accum * data_parallel
    steps = batches // per_step
    if steps > MAX_COUNT:
        raise ValueError(f"--epochs {args.epochs:g} gives {steps:,} steps, more than 2**40 ({MAX_COUNT}); pass fewer "
                         "--epochs")  # fmt: skip
    if steps < 1:
        raise ValueError(
            f"--epochs {args.epochs} gives {batches} batches of {stream.source.label}, fewer than one step's "
            f"{per_step} (--grad-accum x data-parallel ranks); raise --epochs or lower --batch-size"
        )
    log.info("--epochs %s: %d steps (%d batches an epoch)", f"{args.epochs:g}", steps, first)
    args.steps = steps
