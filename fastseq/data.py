"""Training data: streaming readers, collators and length-bucketed batching.

Readers yield examples one at a time and never hold a file in memory:
- `read_jsonl(path, source_field, target_field)`: one JSON object per line;
- `read_csv(path, source_field, target_field)`: a header row, comma- or (for `.tsv`) tab-separated;
- `read_text(path)`: one document per non-blank line (the denoising task's input).
A malformed line is an error naming the file and the line number.

Collators turn a list of examples into a batch of tensors:
- `Seq2SeqCollator`: source/target pairs, dynamic padding (optionally to a multiple of 8),
  labels -100 on padding;
- `SpanCorruptionCollator`: T5's span-corruption objective on plain text, with the original
  code's noise mask (`random_spans_noise_mask`) and input/target length computation
  (`compute_input_and_target_lengths`), sentinels in order.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .tokenizers import Tokenizer

Example = tuple[str, str]  # (source, target)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _lines(path: Path, **open_args) -> Iterator[str]:
    """The lines of a text file, with errors that name the file (and the line) and the fix."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a data file")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass a data file (.jsonl, .csv, .tsv, or .txt for denoise)")
    try:
        f = path.open(encoding="utf-8", **open_args)
    except OSError as err:
        raise ValueError(f"{path} cannot be read ({err.strerror}); check its permissions") from err
    number = 0
    with f:
        try:
            for line in f:
                number += 1
                yield line
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{number + 1}: not UTF-8 text ({err.reason}); convert the file to UTF-8") from None


def _valid_text(text: str, where: str) -> str:
    """Text that can be encoded: JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where}: the text holds {text[err.start]!r}, a lone surrogate that is not a Unicode character; "
            "fix or drop that example"
        ) from None
    return text


def read_jsonl(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    path = Path(path)
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield _fields(record, source_field, target_field, f"{path}:{number}")


def read_csv(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """CSV with a header row; tab-separated when the file ends in `.tsv`."""
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(_lines(path, newline=""), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{where}: {len(row)} fields, but the header has {len(header)} ({header})")
        yield _fields(dict(zip(header, row, strict=True)), source_field, target_field, where)


def read_text(path: str | Path) -> Iterator[str]:
    """One document per non-blank line, stripped."""
    path = Path(path)
    for number, line in enumerate(_lines(path), start=1):
        if line.strip():
            yield _valid_text(line.strip(), f"{path}:{number}")


def _fields(record, source_field: str, target_field: str, where: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with {source_field!r} and {target_field!r}; got {record!r:.80}")
    missing = [f for f in (source_field, target_field) if f not in record]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {missing}; the record has {sorted(record)}. "
            "Choose the fields with --source-field / --target-field"
        )
    source, target = record[source_field], record[target_field]
    if not isinstance(source, str) or not isinstance(target, str):
        raise ValueError(f"{where}: {source_field!r} and {target_field!r} must be strings")
    return _valid_text(source, where), _valid_text(target, where)


def read_examples(path: str | Path, source_field: str = "source", target_field: str = "target") -> Iterator[Example]:
    """Source/target pairs from `.jsonl`/`.json`, `.csv` or `.tsv`, by the file's extension."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, source_field, target_field)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, source_field, target_field)
    raise ValueError(f"{path}: unknown data format {suffix!r}; use .jsonl, .csv or .tsv (or .txt for --task denoise)")


# --------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], value: int, multiple: int | None) -> torch.Tensor:
    length = max((len(r) for r in rows), default=0)
    if multiple:
        length = -(-length // multiple) * multiple
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


class Seq2SeqCollator:
    """(source, target) pairs -> input_ids, attention_mask, labels (-100 on padding). Rows are
    padded to the longest in the batch (to a multiple of `pad_to_multiple_of` if set) and cut
    to `max_source_length` / `max_target_length`, eos kept last."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_source_length: int = 512,
        max_target_length: int = 128,
        pad_to_multiple_of: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("an empty batch: the dataset (or what is left of it) has no examples")
        tok = self.tokenizer
        sources = [tok.encode(s, max_length=self.max_source_length, truncation=True) for s, _ in examples]
        targets = [tok.encode(t, max_length=self.max_target_length, truncation=True) for _, t in examples]
        input_ids = _pad(sources, tok.pad_token_id, self.pad_to_multiple_of)
        labels = _pad(targets, -100, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": (input_ids != tok.pad_token_id).long(), "labels": labels}


def compute_input_and_target_lengths(
    inputs_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """T5's length computation: the number of raw tokens to take so that, after span corruption
    (each span one sentinel, plus eos), the input has at most `inputs_length` tokens; and the
    target length that results. For 512 with the defaults: (568, 114)."""

    def corrupted(tokens_length: int) -> tuple[int, int]:
        noise = int(round(tokens_length * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return tokens_length - noise + spans + 1, noise + spans + 1

    tokens_length = inputs_length
    while corrupted(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = corrupted(tokens_length)
    # With noise density 0.5 the target can outgrow the input; T5 takes one token fewer then.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _segment_lengths(num_items: int, num_segments: int, rng: random.Random) -> list[int]:
    """A uniformly random split of `num_items` into `num_segments` non-empty runs."""
    starts = [True] * (num_segments - 1) + [False] * (num_items - num_segments)
    rng.shuffle(starts)
    lengths, current = [], 1
    for start in starts:
        if start:
            lengths.append(current)
            current = 1
        else:
            current += 1
    lengths.append(current)
    return lengths


def rng_state(rng: random.Random) -> list:
    """A `random.Random`'s state as JSON-ready lists (checkpoints keep it in JSON)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def random_spans_noise_mask(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0, *, rng: random.Random
) -> list[bool]:
    """T5's noise mask: round(length * density) noise tokens (at least 1, at most length - 1) in
    round(noise / mean_span) spans (at least 1), noise and non-noise runs alternating, starting
    with non-noise, run lengths uniformly random."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens; got {length}")
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(min(num_noise, length - num_noise) / mean_noise_span_length)), 1)
    noise_runs = _segment_lengths(num_noise, num_spans, rng)
    keep_runs = _segment_lengths(length - num_noise, num_spans, rng)
    mask: list[bool] = []
    for keep, noise in zip(keep_runs, noise_runs, strict=True):
        mask += [False] * keep + [True] * noise
    return mask


def span_corrupt(
    ids: Sequence[int], mask: Sequence[bool], sentinel: Callable[[int], int], eos_id: int
) -> tuple[list[int], list[int]]:
    """Input: the tokens with each noise span replaced by the next sentinel, then eos. Target:
    each sentinel followed by the span it replaced, then eos."""
    inputs, targets, n = [], [], 0
    for i, (token, noisy) in enumerate(zip(ids, mask, strict=True)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                inputs.append(sentinel(n))
                targets.append(sentinel(n))
                n += 1
            targets.append(token)
        else:
            inputs.append(token)
    return inputs + [eos_id], targets + [eos_id]


class SpanCorruptionCollator:
    """Plain texts -> T5 span-corruption batches. Each text's tokens (no eos) are cut to the raw
    length that `compute_input_and_target_lengths` gives for `input_length` (or used whole when
    shorter), noised with `random_spans_noise_mask`, and split into input and target."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        input_length: int = 512,
        noise_density: float = 0.15,
        mean_noise_span_length: float = 3.0,
        pad_to_multiple_of: int | None = None,
        seed: int = 0,
    ):
        if not hasattr(tokenizer, "sentinel_id"):
            raise ValueError(f"{type(tokenizer).__name__} has no sentinel tokens; span corruption needs T5's or ByT5's")
        self.tokenizer = tokenizer
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.tokens_length, self.target_length = compute_input_and_target_lengths(
            input_length, noise_density, mean_noise_span_length
        )
        self.pad_to_multiple_of = pad_to_multiple_of
        self.rng = random.Random(seed)

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(self.rng, state["rng"])

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not texts:
            raise ValueError("an empty batch: the dataset (or what is left of it) has no texts")
        tok = self.tokenizer
        inputs, targets = [], []
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)[: self.tokens_length]
            if len(ids) < 2:
                ids = ids + [tok.eos_token_id] * (2 - len(ids))
            mask = random_spans_noise_mask(len(ids), self.noise_density, self.mean_noise_span_length, rng=self.rng)
            source, target = span_corrupt(ids, mask, tok.sentinel_id, tok.eos_token_id)
            inputs.append(source)
            targets.append(target)
        input_ids = _pad(inputs, tok.pad_token_id, self.pad_to_multiple_of)
        labels = _pad(targets, -100, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": (input_ids != tok.pad_token_id).long(), "labels": labels}


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


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
