"""Packing, as t5x/seqio pack: several examples in one row, each with its segment id (1, 2, ...;
0 is padding) and positions restarting at 0, so that the model masks attention by segment.

- `pack_rows`: best-fit decreasing of examples into rows of two capacities (source, target);
- `packed_batches`: a buffer's examples shuffled, packed, and the rows cut into batches;
- `PackingCollator`: rows of examples -> the packed batch (`input_ids`, `attention_mask`,
  `segment_ids`, `positions`, `labels`, `decoder_segment_ids`, `decoder_positions`)."""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

from .collators import Seq2SeqCollator, SpanCorruptionCollator, _pad

Lengths = tuple[int, int]  # an example's (source, target) tokens, after the collator's cuts


class _OpenRows:
    """The open rows by their room on the leading side (0 ... its capacity): at each room, the rows
    sorted by their room on the other side; over those, a tree of the most room on the other side,
    which finds the best fit in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1 << capacity.bit_length()  # leaves 0 ... capacity, and more
        self.most = [-1] * (2 * self.size)  # the most room on the other side under each node; -1: no row
        self.rows: list[list[tuple[int, int]]] = [[] for _ in range(capacity + 1)]  # (other room, row)

    def add(self, room: int, other: int, row: int) -> None:
        insort(self.rows[room], (other, row))
        self._update(room)

    def take(self, need: int, need_other: int) -> tuple[int, int, int] | None:
        """Remove and return (room, other room, row) of the row with the least room >= `need` whose
        other room is >= `need_other` (of those, the one with the least other room); None if none."""
        room = self._find(1, 0, self.size - 1, need, need_other)
        if room is None:
            return None
        at = bisect_left(self.rows[room], (need_other, -1))
        other, row = self.rows[room].pop(at)
        self._update(room)
        return room, other, row

    def _update(self, room: int) -> None:
        node = room + self.size
        self.most[node] = self.rows[room][-1][0] if self.rows[room] else -1
        while node > 1:
            node //= 2
            most = max(self.most[2 * node], self.most[2 * node + 1])
            if self.most[node] == most:
                break
            self.most[node] = most

    def _find(self, node: int, low: int, high: int, need: int, need_other: int) -> int | None:
        if high < need or self.most[node] < need_other:
            return None
        if low == high:
            return low
        middle = (low + high) // 2
        found = self._find(2 * node, low, middle, need, need_other)
        return found if found is not None else self._find(2 * node + 1, middle + 1, high, need, need_other)


def pack_rows(lengths: Sequence[Lengths], capacity: Lengths) -> list[list[int]]:
    """Rows of example indices, best-fit decreasing over two capacities: no row holds more than
    `capacity` tokens on either side. Examples go largest first (by the sum of their two sides, each
    as a fraction of its capacity; equal ones in their given order) into the open row with the least
    room left on the leading side (the side whose tokens fill more rows) among those that hold them
    on both; a new row opens when none does. A buffer of 100,000 examples packs in about a second."""
    for i, (source, target) in enumerate(lengths):
        if source > capacity[0] or target > capacity[1]:
            raise ValueError(f"example {i} has {source} source and {target} target tokens, more than a row of "
                             f"{capacity[0]} and {capacity[1]} holds")  # fmt: skip
    load = [sum(n[side] for n in lengths) / capacity[side] for side in (0, 1)]
    lead = 0 if load[0] >= load[1] else 1
    other = 1 - lead
    rows: list[list[int]] = []
    open_rows = _OpenRows(capacity[lead])
    size = [1 / capacity[0], 1 / capacity[1]]
    for i in sorted(range(len(lengths)), key=lambda i: -(lengths[i][0] * size[0] + lengths[i][1] * size[1])):
        need, need_other = lengths[i][lead], lengths[i][other]
        found = open_rows.take(need, need_other)
        if found is None:
            found = capacity[lead], capacity[other], len(rows)
            rows.append([])
        room, room_other, row = found
        rows[row].append(i)
        open_rows.add(room - need, room_other - need_other, row)
    return rows


def packed_batches(
    lengths: Sequence[Lengths],
    capacity: Lengths,
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
) -> list[list[list[int]]]:
    """Batches of rows of example indices: the examples shuffled (`seed`) and packed by `pack_rows`;
    the rows, sorted by their (source, target) tokens since a batch is padded to its longest row,
    cut into batches of `batch_size` rows, or of at most `max_tokens` padded tokens on each side
    (rows x the longest row's tokens on that side); the batches shuffled."""
    if (batch_size is None) == (max_tokens is None):
        raise ValueError("pass exactly one of batch_size and max_tokens")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = [[order[j] for j in row] for row in pack_rows([lengths[i] for i in order], capacity)]
    sized = sorted(((sum(lengths[i][0] for i in row), sum(lengths[i][1] for i in row)), row) for row in rows)
    if batch_size is not None:
        batches = [[row for _, row in sized[start : start + batch_size]] for start in range(0, len(sized), batch_size)]
    else:
        batches, batch, longest = [], [], 0  # `longest`: the batch's longest row, on its longer side
        for size, row in sized:
            if batch and max(longest, *size) * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(row)
            longest = max(longest, *size)
        batches += [batch] if batch else []
    rng.shuffle(batches)
    return batches


def _segments(pieces: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """The pieces one after the other: their ids, segment ids (1, 2, ...) and positions."""
    ids, segment_ids, positions = [], [], []
    for segment, piece in enumerate(pieces, start=1):
        ids += piece
        segment_ids += [segment] * len(piece)
        positions += range(len(piece))
    return ids, segment_ids, positions


class PackingCollator:
    """Rows of examples -> a packed batch, all int64: `input_ids`, `attention_mask` (segment id not
    0), `segment_ids`, `positions` (B, Ls); `labels` (-100 on padding), `decoder_segment_ids`,
    `decoder_positions` (B, Lt). Each example is encoded by `collator` (cut as it cuts); rows are
    padded to the longest row of the batch (to a multiple of the collator's `pad_to_multiple_of`).
    No `decoder_input_ids`: the model shifts the labels right in each segment."""

    def __init__(self, collator: Seq2SeqCollator | SpanCorruptionCollator):
        self.collator = collator

    def state_dict(self) -> dict | None:
        return self.collator.state_dict() if hasattr(self.collator, "state_dict") else None

    def load_state_dict(self, state: dict) -> None:
        self.collator.load_state_dict(state)

    def __call__(self, rows: Sequence[Sequence]) -> dict[str, torch.Tensor]:
        if not rows or not all(rows):
            raise ValueError("an empty batch or row: the dataset (or what is left of it) has no examples")
        sources, targets = [], []  # per row: (ids, segment ids, positions)
        for row in rows:
            encoded = [self.collator.encode(example) for example in row]
            sources.append(_segments([source for source, _ in encoded]))
            targets.append(_segments([target for _, target in encoded]))
        input_ids, segment_ids, positions = self._pad(sources, self.collator.tokenizer.pad_token_id)
        labels, decoder_segment_ids, decoder_positions = self._pad(targets, -100)
        return {"input_ids": input_ids, "attention_mask": (segment_ids != 0).long(), "segment_ids": segment_ids,
                "positions": positions, "labels": labels, "decoder_segment_ids": decoder_segment_ids,
                "decoder_positions": decoder_positions}  # fmt: skip

    def _pad(self, rows: list[tuple[list[int], list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
        """One side's ids (padded with `pad`), segment ids and positions (padded with 0), each (B, L)."""
        ids, segment_ids, positions = zip(*rows, strict=True)
        multiple = self.collator.pad_to_multiple_of
        return _pad(ids, pad, multiple), _pad(segment_ids, 0, multiple), _pad(positions, 0, multiple)
