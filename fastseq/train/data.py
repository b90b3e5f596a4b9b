"""The training data of a run: a stream of example batches whose position a checkpoint can
restore, the collator, and the held-out examples."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fastseq.data import (
    Seq2SeqCollator,
    SpanCorruptionCollator,
    bucketed_batches,
    read_examples,
    read_text,
    rng_state,
    set_rng_state,
)
from fastseq.tokenizers import Tokenizer

from .args import TrainArgs

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def make_examples(n: int, rng: random.Random, min_len: int = 3, max_len: int = 8) -> list[tuple[str, str]]:
    """The default task: reverse a random lower-case word."""
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(min_len, max_len))) for _ in range(n)]
    return [(f"reverse: {w}", w[::-1]) for w in words]


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


class FileStream:
    """The examples of a file, read as a stream: `buffer_size` examples at a time are cut into
    length-bucketed batches and shuffled (seeded by epoch and buffer), so memory holds one buffer,
    never the file. Its position is (epoch, buffer, batch); resuming re-reads up to that buffer."""

    def __init__(self, open_reader, length, *, batch_size: int, max_tokens: int | None, seed: int,
                 buffer_size: int = 100_000):  # fmt: skip
        self.open_reader, self.length = open_reader, length
        self.batch_size, self.max_tokens, self.seed, self.buffer_size = batch_size, max_tokens, seed, buffer_size
        self.epoch, self.buffer, self.index = 0, 0, 0
        self._reader = open_reader()
        self._fill()
        if not self._examples:
            raise ValueError("the training data has no examples; check the file and --source-field/--target-field")

    def _fill(self) -> None:
        """Read the next buffer and batch it."""
        self._examples = [x for _, x in zip(range(self.buffer_size), self._reader, strict=False)]
        lengths = [self.length(x) for x in self._examples]
        sizes = dict(max_tokens=self.max_tokens) if self.max_tokens else dict(batch_size=self.batch_size)
        seed = (self.seed * 100003 + self.epoch) * 100003 + self.buffer
        self._batches = bucketed_batches(self._examples, lengths, seed=seed, **sizes) if self._examples else []

    def next_batch(self) -> list:
        while self.index >= len(self._batches):
            self.buffer, self.index = self.buffer + 1, 0
            self._fill()
            if not self._examples:  # the file is done: the next epoch starts over
                self.epoch, self.buffer = self.epoch + 1, 0
                self._reader = self.open_reader()
                self._fill()
        batch = [self._examples[i] for i in self._batches[self.index]]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": self.buffer, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.buffer, self.index = state["epoch"], state["buffer"], state["index"]
        self._reader = self.open_reader()
        for _ in zip(range(self.buffer * self.buffer_size), self._reader, strict=False):
            pass
        self._fill()


@dataclass
class Data:
    stream: SyntheticStream | FileStream
    collator: Seq2SeqCollator | SpanCorruptionCollator
    held_out: list[tuple[str, str]]  # examples for loss and exact match; empty: no evaluation
    eval_collator: Seq2SeqCollator | None

    def micro_batch(self, data_parallel: int, rank: int) -> tuple[dict[str, torch.Tensor], int]:
        """This data-parallel rank's next micro-batch, collated on the host, and its token count
        (source and target tokens), read from the host tensors: counting costs no device sync.
        Every rank reads all `data_parallel` batches and keeps its own, so the stream position is
        the same on every rank."""
        examples = [self.stream.next_batch() for _ in range(data_parallel)][rank]
        batch = self.collator(examples)
        tokens = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        return batch, tokens

    def state_dict(self) -> dict:
        collator = self.collator.state_dict() if hasattr(self.collator, "state_dict") else None
        return {"stream": self.stream.state_dict(), "collator": collator}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        if state.get("collator") is not None and hasattr(self.collator, "load_state_dict"):
            self.collator.load_state_dict(state["collator"])


def build_data(args: TrainArgs, tokenizer: Tokenizer) -> Data:
    if args.data is None:
        stream = SyntheticStream(args.batch_size, args.seed)
        held_out = make_examples(args.eval_examples, random.Random(args.seed + 1))
        return Data(stream, Seq2SeqCollator(tokenizer), held_out, Seq2SeqCollator(tokenizer))
    sizes = dict(batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed,
                 buffer_size=args.buffer_size)  # fmt: skip
    if args.task == "denoise":
        collator = SpanCorruptionCollator(tokenizer, input_length=args.max_source_length, seed=args.seed)
        return Data(FileStream(lambda: read_text(args.data), len, **sizes), collator, [], None)
    collator = Seq2SeqCollator(tokenizer, max_source_length=args.max_source_length,
                               max_target_length=args.max_target_length)  # fmt: skip
    stream = FileStream(lambda: read_examples(args.data, args.source_field, args.target_field),
                        lambda pair: len(pair[0]) + len(pair[1]), **sizes)  # fmt: skip
    held_out = []
    if args.eval_data:
        held_out = list(read_examples(args.eval_data, args.source_field, args.target_field))[: args.eval_examples]
    return Data(stream, collator, held_out, collator)
