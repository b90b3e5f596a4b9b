"""Collators turn a list of examples into a batch of tensors:
- `Seq2SeqCollator`: source/target pairs, dynamic padding (optionally to a multiple of 8),
  labels -100 on padding;
- `SpanCorruptionCollator`: T5's span-corruption objective on plain text, with the original
  code's noise mask (`random_spans_noise_mask`) and input/target length computation
  (`compute_input_and_target_lengths`), sentinels in order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from fastseq.tokenizers import Tokenizer

from .readers import Example


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

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """An example's source and target ids, cut to the maximum lengths, eos kept last."""
        source, target = example
        encode = self.tokenizer.encode
        return (encode(source, max_length=self.max_source_length, truncation=True),
                encode(target, max_length=self.max_target_length, truncation=True))  # fmt: skip

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("an empty batch: the dataset (or what is left of it) has no examples")
        tok = self.tokenizer
        sources, targets = zip(*map(self.encode, examples), strict=True)
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


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """The noise tokens and noise spans of `random_spans_noise_mask` for `length` tokens."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(min(num_noise, length - num_noise) / mean_noise_span_length)), 1)
    return num_noise, num_spans


def random_spans_noise_mask(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0, *, rng: random.Random
) -> list[bool]:
    """T5's noise mask: round(length * density) noise tokens (at least 1, at most length - 1) in
    round(noise / mean_span) spans (at least 1), noise and non-noise runs alternating, starting
    with non-noise, run lengths uniformly random."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens; got {length}")
    num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
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

    def lengths(self, text_tokens: int) -> tuple[int, int]:
        """The input and target token counts `encode` gives a text of `text_tokens` tokens."""
        length = max(min(text_tokens, self.tokens_length), 2)
        noise, spans = _noise_counts(length, self.noise_density, self.mean_noise_span_length)
        return length - noise + spans + 1, noise + spans + 1

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        """A text's span-corrupted input and target ids (the next noise mask of the collator's RNG)."""
        tok = self.tokenizer
        ids = tok.encode(text, add_special_tokens=False)[: self.tokens_length]
        if len(ids) < 2:
            ids = ids + [tok.eos_token_id] * (2 - len(ids))
        mask = random_spans_noise_mask(len(ids), self.noise_density, self.mean_noise_span_length, rng=self.rng)
        return span_corrupt(ids, mask, tok.sentinel_id, tok.eos_token_id)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not texts:
            raise ValueError("an empty batch: the dataset (or what is left of it) has no texts")
        tok = self.tokenizer
        inputs, targets = zip(*map(self.encode, texts), strict=True)
        input_ids = _pad(inputs, tok.pad_token_id, self.pad_to_multiple_of)
        labels = _pad(targets, -100, self.pad_to_multiple_of)
        return {"input_ids": input_ids, "attention_mask": (input_ids != tok.pad_token_id).long(), "labels": labels}
