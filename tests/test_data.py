"""fastseq.data: readers, collators, T5 span corruption and length-bucketed batching."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fastseq.data import (
    Seq2SeqCollator,
    SpanCorruptionCollator,
    bucketed_batches,
    compute_input_and_target_lengths,
    random_spans_noise_mask,
    read_csv,
    read_examples,
    read_jsonl,
    read_text,
    span_corrupt,
)
from fastseq.tokenizers import ByT5Tokenizer


def test_jsonl_streams_and_names_the_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(read_jsonl(path, "q", "a")) == [(r["q"], r["a"]) for r in rows]
    with pytest.raises(ValueError, match=r"train.jsonl:1: missing field\(s\) \['source', 'target'\]"):
        next(read_examples(path))
    path.write_text(json.dumps(rows[0]) + "\n" + '{"q": "broken\n')
    reader = read_jsonl(path, "q", "a")
    assert next(reader) == ("question 0", "answer 0")  # yielded before the bad line is read
    with pytest.raises(ValueError, match=r"train.jsonl:2: not valid JSON"):
        next(reader)
    path.write_text('["a", "b"]\n')
    with pytest.raises(ValueError, match=r":1: expected an object"):
        list(read_jsonl(path))
    path.write_text('{"source": 1, "target": "x"}\n')
    with pytest.raises(ValueError, match="must be strings"):
        list(read_jsonl(path))


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text('source,target\n"a, with comma",b\nc,d\n')
    assert list(read_examples(tmp_path / "d.csv")) == [("a, with comma", "b"), ("c", "d")]
    (tmp_path / "d.tsv").write_text("x\ty\nfirst\tsecond\n")
    assert list(read_csv(tmp_path / "d.tsv", "x", "y")) == [("first", "second")]
    (tmp_path / "bad.csv").write_text("source,target\na,b\nonly-one\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: 1 fields, but the header has 2"):
        list(read_csv(tmp_path / "bad.csv"))
    (tmp_path / "empty.csv").write_text("")
    assert list(read_csv(tmp_path / "empty.csv")) == []
    with pytest.raises(ValueError, match="unknown data format '.xlsx'"):
        read_examples(tmp_path / "d.xlsx")


def test_text_reader(tmp_path):
    (tmp_path / "t.txt").write_text("one doc\n\n  two doc  \n")
    assert list(read_text(tmp_path / "t.txt")) == ["one doc", "two doc"]


def test_seq2seq_collator_pads_and_masks_labels():
    tok = ByT5Tokenizer()
    collate = Seq2SeqCollator(tok, max_source_length=6, max_target_length=4, pad_to_multiple_of=8)
    batch = collate([("abcdefghij", "xy"), ("ab", "uvwxyz")])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 8)
    assert batch["input_ids"][0, :6].tolist() == tok.encode("abcde") and batch["input_ids"][0, 5] == tok.eos_token_id
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == tok.encode("xy") + [-100] * 5
    assert batch["labels"][1, :4].tolist() == tok.encode("uvw")
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_t5_length_computation_matches_the_paper_setting():
    assert compute_input_and_target_lengths(512, 0.15, 3.0) == (568, 114)
    assert compute_input_and_target_lengths(1024, 0.15, 3.0) == (1137, 229)
    # The defining property: one more raw token would overflow the input.
    for n in (16, 64, 100, 512):
        tokens, targets = compute_input_and_target_lengths(n)
        noise = round(tokens * 0.15)
        spans = round(noise / 3.0)
        assert tokens - noise + spans + 1 <= n and targets == noise + spans + 1
        noise1 = round((tokens + 1) * 0.15)
        assert tokens + 1 - noise1 + round(noise1 / 3.0) + 1 > n


@pytest.mark.parametrize("length", [2, 5, 37, 568])
def test_noise_mask_counts_and_alternation(length):
    rng = random.Random(length)
    for _ in range(20):
        mask = random_spans_noise_mask(length, 0.15, 3.0, rng=rng)
        assert len(mask) == length and not mask[0]  # starts with a non-noise run
        noise = min(max(round(length * 0.15), 1), length - 1)
        assert sum(mask) == noise
        spans = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        assert spans == max(round(min(noise, length - noise) / 3.0), 1)


def test_mean_span_length_is_as_configured():
    rng = random.Random(0)
    runs = []
    for _ in range(200):
        mask = random_spans_noise_mask(568, 0.15, 3.0, rng=rng)
        run = 0
        for m in [*mask, False]:
            if m:
                run += 1
            elif run:
                runs.append(run)
                run = 0
    assert abs(sum(runs) / len(runs) - 3.0) < 0.1


def test_span_corruption_round_trips_with_sentinels_in_order():
    tok = ByT5Tokenizer()
    collate = SpanCorruptionCollator(tok, input_length=64, seed=3)
    assert (collate.tokens_length, collate.target_length) == compute_input_and_target_lengths(64)
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "short text", "x"]
    batch = collate(texts)
    sentinels = {tok.sentinel_id(i): i for i in range(tok.extra_ids)}
    for row, text in enumerate(texts):
        source = [t for t in batch["input_ids"][row].tolist() if t != tok.pad_token_id]
        target = [t for t in batch["labels"][row].tolist() if t != -100]
        assert source[-1] == target[-1] == tok.eos_token_id
        assert len(source) <= 64
        # Sentinels numbered 0, 1, 2, ... in both.
        in_source = [sentinels[t] for t in source if t in sentinels]
        assert in_source == list(range(len(in_source))) == [sentinels[t] for t in target if t in sentinels]
        # Putting each span back at its sentinel restores the text's tokens.
        spans, current = {}, None
        for t in target[:-1]:
            if t in sentinels:
                current = sentinels[t]
                spans[current] = []
            else:
                spans[current].append(t)
        restored = []
        for t in source[:-1]:
            restored += spans[sentinels[t]] if t in sentinels else [t]
        original = tok.encode(text, add_special_tokens=False)[: collate.tokens_length]
        assert restored == (original if len(original) >= 2 else original + [tok.eos_token_id])
    again = SpanCorruptionCollator(tok, input_length=64, seed=3)
    assert torch.equal(again(texts)["input_ids"], batch["input_ids"])  # seeded
    state = again.state_dict()
    follow = again(texts)
    again.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip (checkpoints)
    assert torch.equal(again(texts)["labels"], follow["labels"])


def test_span_corrupt_by_hand():
    inputs, targets = span_corrupt(
        [10, 11, 12, 13, 14, 15], [False, True, True, False, True, False], lambda n: 100 - n, 1
    )
    assert inputs == [10, 100, 13, 99, 15, 1]
    assert targets == [100, 11, 12, 99, 14, 1]


def test_bucketed_batches():
    lengths = [random.Random(i).randint(1, 50) for i in range(103)]
    batches = bucketed_batches(list(range(103)), lengths, batch_size=8, bucket_size=4, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) <= 8 for b in batches)
    # Within a batch, lengths are close: far less spread than random batches.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15
    by_tokens = bucketed_batches(list(range(103)), lengths, max_tokens=120, seed=1)
    assert sorted(i for b in by_tokens for i in b) == list(range(103))
    assert all(max(lengths[i] for i in b) * len(b) <= 120 for b in by_tokens)
    assert bucketed_batches(list(range(103)), lengths, batch_size=8, seed=1) == bucketed_batches(
        list(range(103)), lengths, batch_size=8, seed=1
    )
    with pytest.raises(ValueError, match="more than max_tokens=10"):
        bucketed_batches([0, 1], [5, 30], max_tokens=10)
    with pytest.raises(ValueError, match="exactly one of"):
        bucketed_batches([0], [1])
