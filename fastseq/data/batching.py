"""Batching: examples of similar length together (`bucketed_batches`), and `FileStream`, the
batches of a data source read as a stream a buffer at a time, whose position a checkpoint restores.

Lengths are token counts from the tokenizer (`TokenLengths`), as the collator will cut them: a
batch under `max_tokens` holds at most that many padded tokens on each side (rows x the longest
source, and rows x the longest target, as fairseq's --max-tokens). With packing, a batch is rows
of several examples each (`fastseq.data.packing`)."""

from __future__ import annotations

import logging
import random
from array import array
from collections.abc import Callable, Iterable, Sequence

from fastseq.tokenizers import Tokenizer

from .packing import packed_batches
from .sources import DataSource

log = logging.getLogger("fastseq.data")


def bucketed_batches(
    examples: Sequence,
    lengths: Sequence[int],
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    bucket_size: int = 100,
    seed: int = 0,
    shuffle: bool = True,
) -> list[list[int]]:
    """Index batches of examples of similar length: shuffle, sort within buckets of
    `bucket_size * batch` examples by length, cut into batches of `batch_size` examples or of at
    most `max_tokens` padded tokens (longest row times rows), then shuffle the batches."""
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("pass exactly one of batch_size and max_tokens")
    if len(examples) != len(lengths):
        raise ValueError(f"{len(examples)} examples but {len(lengths)} lengths")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)
    per_bucket = bucket_size * (batch_size or max(1, max_tokens // max(max(lengths, default=1), 1)))
    batches: list[list[int]] = []
    for start in range(0, len(order), per_bucket):
        bucket = sorted(order[start : start + per_bucket], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = 0
        for i in bucket:
            longest_if = max(longest, lengths[i])
            full = len(batch) == batch_size if batch_size else batch and longest_if * (len(batch) + 1) > max_tokens
            if full:
                batches.append(batch)
                batch, longest_if = [], lengths[i]
            batch.append(i)
            longest = longest_if
        if batch:
            batches.append(batch)
    if max_tokens is not None:
        too_long = [b for b in batches if len(b) == 1 and lengths[b[0]] > max_tokens]
        if too_long:
            i = too_long[0][0]
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than max_tokens={max_tokens}; raise it")
    if shuffle:
        rng.shuffle(batches)
    return batches


def take(iterable: Iterable, n: int) -> list:
    """The first n items of an iterable (all of them when n < 0)."""
    out = []
    for item in iterable:
        if 0 <= n <= len(out):
            break
        out.append(item)
    return out


class TokenLengths:
    """The (source, target) token counts of an example before any cut, eos included; for plain
    text (denoising), the text's tokens and 0."""

    def __init__(self, tokenizer: Tokenizer, *, text: bool = False):
        self.tokenizer, self.text = tokenizer, text

    def __call__(self, example) -> tuple[int, int]:
        encode = self.tokenizer.encode
        if self.text:
            return len(encode(example, add_special_tokens=False)), 0
        source, target = example
        return len(encode(source)), len(encode(target))


class Cuts:
    """How many examples the maximum lengths cut, per side, and the longest seen."""

    def __init__(self, limits: tuple[int | None, int | None], flags: tuple[str, str] | None):
        self.limits, self.flags = limits, flags
        self.examples, self.cut, self.longest = 0, [0, 0], [0, 0]

    def add(self, lengths: Sequence[tuple[int, int]]) -> None:
        self.examples += len(lengths)
        for side in (0, 1):
            limit = self.limits[side]
            self.longest[side] = max([self.longest[side]] + [n[side] for n in lengths])
            if limit is not None:
                self.cut[side] += sum(n[side] > limit for n in lengths)

    def report(self, what: str) -> str | None:
        """One line with the counts and the flag to raise; None when nothing was cut or no flags."""
        if self.flags is None or not any(self.cut):
            return None
        parts = [
            f"{self.cut[side]:,} of {self.examples:,} {name}s are longer than --{self.flags[side]} "
            f"{self.limits[side]} tokens (the longest: {self.longest[side]:,}) and are cut"
            for side, name in ((0, "source"), (1, "target"))
            if self.cut[side]
        ]
        flags = " / ".join(f"--{self.flags[side]}" for side in (0, 1) if self.cut[side])
        return f"{what}: {'; '.join(parts)}; raise {flags} to keep more of them"


class FileStream:
    """The examples of a source, read as a stream: `buffer_size` examples at a time are cut into
    length-bucketed batches and shuffled (seeded by epoch and buffer), so memory holds one buffer,
    never the data. Its position is (epoch, buffer, batch); resuming re-reads up to that buffer.
    With `pack`, a buffer is packed into rows of `limits` tokens (`packed_batches`) and a batch is
    `batch_size` rows (or rows up to `max_tokens`), each a list of examples.

    `measure(example) -> (source tokens, target tokens)`; `limits`: the maximum lengths the
    collator cuts to (a batch's budget counts what is left). With `flags` (the names of the two
    options), the examples cut are counted over the first epoch and reported in a warning: once at
    the first buffer that has any, and with the epoch's totals at its end."""

    def __init__(self, source: DataSource, measure: Callable[[object], tuple[int, int]], *, batch_size: int,
                 max_tokens: int | None, seed: int, buffer_size: int = 100_000,
                 limits: tuple[int | None, int | None] = (None, None),
                 flags: tuple[str, str] | None = None, pack: bool = False):  # fmt: skip
        self.source, self.measure, self.limits, self.pack = source, measure, limits, pack
        if pack and None in limits:
            raise ValueError(f"packing needs both maximum lengths (a row's capacity); got {limits}")
        if pack and max_tokens and max(limits) > max_tokens:
            raise ValueError(f"--max-tokens {max_tokens} cannot hold a packed row of up to {max(limits)} tokens (the "
                             "maximum lengths); raise --max-tokens, or lower --max-source-length and "
                             "--max-target-length")  # fmt: skip
        self.batch_size, self.max_tokens, self.seed, self.buffer_size = batch_size, max_tokens, seed, buffer_size
        self.epoch, self.buffer, self.index = 0, 0, 0
        self.seen = 0  # examples of this epoch in the batches returned so far
        self.epoch_length = source.num_examples  # examples per epoch, once known
        self.cuts, self._warned = Cuts(limits, flags), False
        self._reader, self._read = source.open(), 0  # `_read`: examples taken from this reader
        self._fill()
        if not self._examples:
            raise ValueError(f"{source.label} has no examples; check the data and --source-field/--target-field")

    def _cut(self, lengths: tuple[int, int]) -> tuple[int, int]:
        """An example's (source, target) tokens after the collator's cuts."""
        source, target = (n if limit is None else min(n, limit) for n, limit in zip(lengths, self.limits, strict=True))
        return source, target

    def _batches(self, lengths: Sequence[tuple[int, int]], epoch: int, buffer: int) -> list[list]:
        """A buffer's batches from its examples' lengths after the cuts: lists of indices, or with
        packing lists of rows of indices."""
        sizes = dict(max_tokens=self.max_tokens) if self.max_tokens else dict(batch_size=self.batch_size)
        seed = (self.seed * 100003 + epoch) * 100003 + buffer
        if self.pack:
            return packed_batches(lengths, self.limits, seed=seed, **sizes) if lengths else []
        budgets = [max(n) for n in lengths]  # what an example weighs against --max-tokens: its longer side
        if self.max_tokens and budgets and max(budgets) > self.max_tokens:
            raise ValueError(
                f"{self.source.label}: an example has {max(budgets)} tokens on one side (after the cuts of "
                f"--max-source-length/--max-target-length), more than --max-tokens {self.max_tokens} can hold; raise "
                "--max-tokens or lower those lengths"
            )
        return bucketed_batches(budgets, budgets, seed=seed, **sizes) if budgets else []

    def _fill(self) -> None:
        """Read the next buffer and batch it."""
        self._examples = [x for _, x in zip(range(self.buffer_size), self._reader, strict=False)]
        self._read += len(self._examples)
        if len(self._examples) < self.buffer_size and self.epoch == 0:  # the last buffer: the length is known
            self.epoch_length = self._read
        lengths = [self.measure(x) for x in self._examples]
        if self.epoch == 0:
            self._count_cuts(lengths)
        self._batches_now = self._batches([self._cut(n) for n in lengths], self.epoch, self.buffer)

    def _size(self, batch: list) -> int:
        """The examples of a batch (of indices, or of rows of them)."""
        return sum(map(len, batch)) if self.pack else len(batch)

    def _count_cuts(self, lengths: list[tuple[int, int]]) -> None:
        if self.buffer * self.buffer_size < self.cuts.examples:  # a buffer counted before (after a resume)
            return
        self.cuts.add(lengths)
        line = self.cuts.report(f"{self.source.label} ({self.cuts.examples:,} examples read)")
        if line and not self._warned:
            log.warning(line)
            self._warned = True

    def next_batch(self) -> list:
        while self.index >= len(self._batches_now):
            self.buffer, self.index = self.buffer + 1, 0
            self._fill()
            if not self._examples:  # the data is done: the next epoch starts over
                self._end_epoch()
        indices = self._batches_now[self.index]
        self.index += 1
        self.seen += self._size(indices)
        if self.pack:
            return [[self._examples[i] for i in row] for row in indices]
        return [self._examples[i] for i in indices]

    def _end_epoch(self) -> None:
        if self.epoch == 0:
            self.epoch_length = self._read
            line = self.cuts.report(f"{self.source.label}, epoch 1")
            if line and self.cuts.examples == self._read:
                log.warning(line)
        if not self.source.rereadable:
            raise ValueError(
                f"{self.source.label} is a pipe, read once, and it ended after {self._read:,} examples (one epoch); "
                "pass fewer --steps, or a regular file to train for more than one epoch"
            )
        self.epoch, self.buffer, self.seen = self.epoch + 1, 0, 0
        self._reader, self._read = self.source.open(), 0
        self._fill()
        if not self._examples:
            raise ValueError(f"{self.source.label} has no examples any more: it changed during the run; restore it "
                             "and --resume")  # fmt: skip

    def epochs_done(self) -> float:
        """Epochs done so far: whole ones, plus the fraction of this one where its length is known."""
        if not self.epoch_length:
            return float(self.epoch)
        return self.epoch + self.seen / self.epoch_length

    @property
    def varies_by_epoch(self) -> bool:
        """Whether an epoch's number of batches depends on its shuffle (--max-tokens or packing)."""
        return self.max_tokens is not None or self.pack

    def count_batches(self, epochs: int) -> list[int]:
        """The number of batches of each of the first `epochs` epochs, cut as `next_batch` cuts
        them: one pass over the data (measuring every example only when --max-tokens or packing
        needs it)."""
        if not self.source.rereadable:
            raise ValueError(
                f"{self.source.label} is a pipe, read once, so its epochs cannot be counted before training; pass "
                "--steps instead of --epochs (a pipe gives one epoch at most), or a regular file"
            )
        measured = self.varies_by_epoch
        buffers: list[tuple[array, array]] = []  # each buffer's source and target lengths after the cuts
        reader = self.source.open()
        while chunk := [x for _, x in zip(range(self.buffer_size), reader, strict=False)]:
            cut = [self._cut(self.measure(x)) for x in chunk] if measured else [(0, 0)] * len(chunk)
            buffers.append((array("l", (n for n, _ in cut)), array("l", (n for _, n in cut))))
        self.epoch_length = sum(len(sources) for sources, _ in buffers)

        def count(epoch: int) -> int:
            return sum(len(self._batches(list(zip(*b, strict=True)), epoch, i)) for i, b in enumerate(buffers))

        if not measured:  # the count does not depend on the order: the same every epoch
            return [count(0)] * epochs
        return [count(e) for e in range(epochs)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": self.buffer, "index": self.index, "examples": self.epoch_length}

    def load_state_dict(self, state: dict, most_epochs: int | None = None) -> None:
        """Go to a checkpoint's position, each field checked: an edited one (a buffer past the data, an
        index past its buffer's batches, more epochs than `most_epochs`, the batches read before it)
        raises ValueError instead of training on other batches."""
        epoch, buffer, index = state["epoch"], state["buffer"], state["index"]
        for name, value in (("epoch", epoch), ("buffer", buffer), ("index", index)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ValueError(f"stream.{name} is {value!r:.60}, not a whole number >= 0")
        examples = state.get("examples")
        if examples is not None and not (isinstance(examples, int) and not isinstance(examples, bool) and examples > 0):
            raise ValueError(f"stream.examples is {examples!r:.60}, not a whole number > 0 (an epoch's examples)")
        if most_epochs is not None and epoch > most_epochs:
            raise ValueError(f"stream.epoch is {epoch}, more epochs than the {most_epochs} batches read before it")
        if self.source.rereadable:
            self._reader, self._read = self.source.open(), 0
        elif epoch != 0:
            raise ValueError(f"{self.source.label} is a pipe, read once, so a checkpoint in its epoch {epoch + 1} "
                             "cannot be resumed from it; resume with the data as a regular file")  # fmt: skip
        self.epoch_length = self.epoch_length or state.get("examples")
        if self.source.rereadable or buffer > 0:  # a pipe holds the first buffer of epoch 0 already
            for _ in zip(range(buffer * self.buffer_size - self._read), self._reader, strict=False):
                pass
            self.epoch, self.buffer, self._read = epoch, buffer, buffer * self.buffer_size
            self._fill()
            if not self._examples:
                raise ValueError(f"stream.buffer is {buffer}, past the end of {self.source.label} (buffers of "
                                 f"{self.buffer_size:,} examples)")  # fmt: skip
        if index > len(self._batches_now):
            raise ValueError(f"stream.index is {index}, past the {len(self._batches_now)} batches of its buffer")
        self.index = index
        self.seen = buffer * self.buffer_size + sum(self._size(b) for b in self._batches_now[:index])
