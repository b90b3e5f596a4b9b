"""fastseq.data: readers, collators, T5 span corruption and length-bucketed batching."""

from __future__ import annotations

import json
import math
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
    with pytest.raises(ValueError, match="must be strings; got a number and a string"):
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
    # A column read twice in the header: which one is meant is not guessed; one named twice but unread is fine.
    (tmp_path / "twice.csv").write_text("source,target,source\na,b,c\n")
    with pytest.raises(ValueError, match=r"twice.csv:1: the header names column 'source' 2 times; rename all but"):
        list(read_csv(tmp_path / "twice.csv"))
    (tmp_path / "notes.csv").write_text("source,notes,target,notes\na,x,b,y\n")
    assert list(read_csv(tmp_path / "notes.csv")) == [("a", "b")]
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


# ---- formats: each reader against the library that owns the format, reading the same data ----------


ROWS = [
    {"id": i, "document": f"document {i}, with a comma" + " and more" * (i % 3), "summary": f"summary {i}",
     "translation": {"en": f"hello {i}", "de": f"hallo {i}"}}
    for i in range(7)
]  # fmt: skip
PAIRS = [(r["document"], r["summary"]) for r in ROWS]


def _write_all(tmp_path):
    """The same rows in every format fastseq reads; returns {name: path}."""
    import gzip

    import datasets

    flat = [{"document": r["document"], "summary": r["summary"]} for r in ROWS]
    files = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "csv": tmp_path / "d.csv",
             "tsv": tmp_path / "d.tsv", "parquet": tmp_path / "d.parquet", "jsonl.gz": tmp_path / "d.jsonl.gz",
             "csv.gz": tmp_path / "d.csv.gz"}  # fmt: skip
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    files["json"].write_text(json.dumps(ROWS, indent=2))  # an array over many lines
    datasets.Dataset.from_list(flat).to_csv(files["csv"], index=False)
    datasets.Dataset.from_list(flat).to_csv(files["tsv"], index=False, sep="\t")
    datasets.Dataset.from_list(ROWS).to_parquet(files["parquet"])
    files["jsonl.gz"].write_bytes(gzip.compress(files["jsonl"].read_bytes()))
    files["csv.gz"].write_bytes(gzip.compress(files["csv"].read_bytes()))
    return files


def test_readers_agree_with_datasets_and_pyarrow(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    files = _write_all(tmp_path)
    for name, path in files.items():
        assert list(read_examples(path, "document", "summary")) == PAIRS, name
    builders = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "jsonl.gz": "json"}
    for name, builder in builders.items():
        theirs = datasets.load_dataset(builder, data_files=str(files[name]), split="train",
                                       cache_dir=str(tmp_path / "cache"))  # fmt: skip
        assert list(zip(theirs["document"], theirs["summary"], strict=True)) == PAIRS, name
    table = pq.read_table(files["parquet"]).to_pylist()
    assert [(r["document"], r["summary"]) for r in table] == PAIRS
    # Nested fields, in every format that nests.
    nested = [(r["translation"]["en"], r["translation"]["de"]) for r in ROWS]
    for name in ("jsonl", "json", "parquet", "jsonl.gz"):
        assert list(read_examples(files[name], "translation.en", "translation.de")) == nested, name
    with pytest.raises(ValueError, match=r"d.jsonl:1: missing field\(s\) \['translation.fr'\]"):
        next(read_examples(files["jsonl"], "translation.fr", "summary"))
    with pytest.raises(ValueError, match=r"no column 'title' for the field 'title'"):
        next(read_examples(files["parquet"], "title", "summary"))


def test_datasets_directories(tmp_path):
    import datasets

    from fastseq.data import file_source

    whole = datasets.Dataset.from_list(ROWS)
    whole.save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": whole, "validation": whole.select(range(2))}).save_to_disk(tmp_path / "dict")
    assert list(read_examples(tmp_path / "one", "document", "summary")) == PAIRS
    assert list(read_examples(tmp_path / "dict", "translation.en", "summary", split="validation")) == [
        (r["translation"]["en"], r["summary"]) for r in ROWS[:2]
    ]
    with pytest.raises(ValueError, match=r"has the splits \['train', 'validation'\], not 'test'"):
        read_examples(tmp_path / "dict", split="test")
    source = file_source(str(tmp_path / "dict"), "--data", "document", "summary")
    assert source.num_examples == 7 and source.rereadable and source.fingerprint_path == str(tmp_path / "dict")
    assert list(source.open()) == list(source.open()) == PAIRS
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not one `datasets.save_to_disk` wrote"):
        read_examples(tmp_path / "plain")


def test_json_arrays_stream_and_name_the_line(tmp_path, monkeypatch):
    import fastseq.data.readers as readers

    monkeypatch.setattr(readers, "_CHUNK", 7)  # elements and numbers split across chunks
    path = tmp_path / "a.json"
    path.write_text("\ufeff[\n" + ",\n".join(json.dumps(r) for r in ROWS) + "\n]\n")
    assert list(read_examples(path, "document", "summary")) == PAIRS
    lines = [json.dumps(r) for r in ROWS[:3]]
    path.write_text("[\n" + ",\n".join(lines) + ',\n{"document": "x", "summary": }\n]')
    reader = read_examples(path, "document", "summary")
    assert [next(reader) for _ in range(3)] == PAIRS[:3]  # yielded before the bad element is read
    with pytest.raises(ValueError, match=r"a.json:5: not valid JSON"):
        next(reader)
    path.write_text("[" + lines[0] + ",")
    with pytest.raises(ValueError, match=r"a.json:1: the JSON array is not closed"):
        list(read_examples(path, "document", "summary"))
    path.write_text("[" + lines[0] + "] []")
    with pytest.raises(ValueError, match=r"a.json:1: text after the end of the JSON array"):
        list(read_examples(path, "document", "summary"))
    path.write_text("\n".join(lines))  # a .json file of JSON Lines, as datasets reads it
    assert list(read_examples(path, "document", "summary")) == PAIRS[:3]


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_a_deeply_nested_value_is_an_error_naming_the_line(tmp_path, kind):
    deep = '{"source": "a", "target": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / f"deep.{kind}"
    ok = '{"source": "a", "target": "b"}'
    path.write_text(f"{ok}\n{deep}\n" if kind == "jsonl" else f"[{ok},\n{deep}]")
    with pytest.raises(ValueError, match=rf"deep.{kind}:2: the JSON value is nested too deeply"):
        list(read_examples(path))


def test_csv_bom_long_fields_and_compression(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffsource,target\nx,y\n".encode())
    assert list(read_examples(path)) == [("x", "y")]  # the BOM is not part of the first column's name
    long = "word " * 50_000  # over csv's default field limit of 128 KiB
    (tmp_path / "long.tsv").write_text(f"source\ttarget\n{long}\tshort\n")
    assert list(read_examples(tmp_path / "long.tsv")) == [(long, "short")]
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"bad.jsonl.gz:1: the compressed file is damaged"):
        list(read_examples(tmp_path / "bad.jsonl.gz"))
    (tmp_path / "d.parquet.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="parquet compresses its own columns"):
        read_examples(tmp_path / "d.parquet.gz")


@pytest.mark.parametrize("name", ["fifo.jsonl", "fifo"])
def test_a_pipe_is_read_as_a_stream(tmp_path, name):
    import os
    import threading

    from fastseq.data import file_source

    path = tmp_path / name
    os.mkfifo(path)
    text = "".join(json.dumps(r) + "\n" for r in ROWS)

    def write():
        with open(path, "w") as f:
            f.write(text)

    writer = threading.Thread(target=write)
    writer.start()
    source = file_source(str(path), "--data", "document", "summary")  # opens nothing yet
    assert not source.rereadable and source.fingerprint_path is None
    assert list(source.open()) == PAIRS  # without an extension, by its content
    writer.join()


# ---- token lengths, --max-tokens and the stream ------------------------------------------------------


def _stream(examples, tokenizer, **kw):
    from fastseq.data import DataSource, FileStream, TokenLengths

    source = DataSource("--data x", lambda: iter(examples), True, None, None)
    return FileStream(source, TokenLengths(tokenizer), **{"batch_size": 4, "max_tokens": None, "seed": 1, **kw})


def test_max_tokens_counts_tokens_not_characters():
    """ByT5 with CJK text: 3 bytes, so 3 tokens, a character. Every batch's padded source and target
    tensors hold at most --max-tokens tokens, as the collator makes them."""
    tok = ByT5Tokenizer()
    rng = random.Random(0)
    examples = [("".join(rng.choice("漢字仮名交") for _ in range(rng.randint(1, 4))), "訳" * rng.randint(1, 3))
                for _ in range(60)]  # fmt: skip
    stream = _stream(examples, tok, max_tokens=40)
    collate = Seq2SeqCollator(tok)
    seen = []
    while stream.epoch == 0:
        batch = stream.next_batch()
        if stream.epoch == 0:
            tensors = collate(batch)
            assert tensors["input_ids"].numel() <= 40 and tensors["labels"].numel() <= 40, batch
            seen += batch
    assert sorted(seen) == sorted(examples)


@pytest.mark.parametrize("max_tokens", [None, 60])
def test_count_batches_is_what_the_stream_gives(max_tokens):
    tok = ByT5Tokenizer()
    examples = [(f"source {i} " + "x" * (i % 11), f"t{i}") for i in range(45)]
    stream = _stream(examples, tok, max_tokens=max_tokens, buffer_size=10)
    counts = stream.count_batches(3)
    epochs = []  # the epoch of every batch returned
    while stream.epoch < 3:
        batch = stream.next_batch()
        epochs.append(stream.epoch)
    assert [epochs.count(e) for e in range(3)] == counts
    assert stream.epochs_done() == 3 + len(batch) / 45  # the first batch of the fourth epoch


def test_epochs_done_and_cut_examples_are_reported(caplog):
    tok = ByT5Tokenizer()
    examples = [("a" * (3 if i % 4 else 30), "b" * (2 if i % 5 else 20)) for i in range(20)]
    with caplog.at_level("WARNING", logger="fastseq.data"):
        stream = _stream(
            examples, tok, buffer_size=8, limits=(10, 10), flags=("max-source-length", "max-target-length")
        )
        assert stream.epochs_done() == 0.0 and stream.epoch_length is None  # not known before a pass
        while stream.epoch == 0:
            stream.next_batch()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings  # at the first buffer with cuts, and the epoch's totals at its end
    assert "2 of 8 sources are longer than --max-source-length 10 tokens (the longest: 31)" in warnings[0]
    assert "5 of 20 sources" in warnings[1] and "4 of 20 targets" in warnings[1]
    assert "raise --max-source-length / --max-target-length" in warnings[1]
    assert stream.epoch_length == 20 and 1.0 < stream.epochs_done() < 1.5


# ---- packing ---------------------------------------------------------------------------------------


def _flan_like(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(source, target) lengths: log-normal sources (median 150, a tail cut at 2,048), short targets."""
    rng = random.Random(seed)
    return [(min(2048, max(1, round(rng.lognormvariate(math.log(150), 0.9)))),
             min(256, max(1, round(rng.lognormvariate(math.log(8), 0.6))))) for _ in range(n)]  # fmt: skip


def test_pack_rows_places_every_example_once_within_both_capacities():
    from fastseq.data import pack_rows

    lengths = _flan_like(20_000)
    rows = pack_rows(lengths, (2048, 256))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for side, capacity in enumerate((2048, 256)):
        assert max(sum(lengths[i][side] for i in row) for row in rows) <= capacity
    fill = sum(source for source, _ in lengths) / (len(rows) * 2048)
    assert fill >= 0.97, fill  # best-fit decreasing; the rows padding-free bound is 1.0
    # The sides are symmetric: with the target side leading, the same rows.
    assert pack_rows([(t, s) for s, t in lengths], (256, 2048)) == rows
    # Both sides binding: targets too long for the source side alone to decide.
    tight = [(s, min(t * 3, 256)) for s, t in lengths[:3000]]
    rows = pack_rows(tight, (2048, 256))
    assert max(sum(tight[i][1] for i in row) for row in rows) <= 256
    assert sorted(i for row in rows for i in row) == list(range(3000))
    with pytest.raises(ValueError, match="example 1 has 9 source and 1 target tokens, more than a row of 8 and 4"):
        pack_rows([(8, 4), (9, 1)], (8, 4))


def test_packed_batches_are_seeded_and_hold_their_budget():
    from fastseq.data import packed_batches

    lengths = _flan_like(2000, seed=1)
    batches = packed_batches(lengths, (2048, 256), batch_size=8, seed=3)
    assert batches == packed_batches(lengths, (2048, 256), batch_size=8, seed=3)
    assert batches != packed_batches(lengths, (2048, 256), batch_size=8, seed=4)
    assert sorted(map(len, batches))[1:] == [8] * (len(batches) - 1)  # one batch may hold fewer rows
    assert sorted(i for batch in batches for row in batch for i in row) == list(range(2000))
    by_tokens = packed_batches(lengths, (2048, 256), max_tokens=5000, seed=3)
    for batch in by_tokens:
        longest = max(sum(lengths[i][side] for i in row) for row in batch for side in (0, 1))
        assert longest * len(batch) <= 5000
    assert sorted(i for batch in by_tokens for row in batch for i in row) == list(range(2000))
    assert packed_batches([], (8, 8), max_tokens=8) == packed_batches([], (8, 8), batch_size=2) == []


def test_packed_batches_are_nearly_all_real_tokens():
    """Batches of 16 rows, padded to their longest row on each side: at least 97% real tokens,
    source and target sides together, on the FLAN-like mixture."""
    from fastseq.data import packed_batches

    lengths = _flan_like(20_000)
    real = padded = 0
    for batch in packed_batches(lengths, (2048, 256), batch_size=16, seed=0):
        for side in (0, 1):
            sizes = [sum(lengths[i][side] for i in row) for row in batch]
            real, padded = real + sum(sizes), padded + max(sizes) * len(sizes)
    assert real / padded >= 0.97, real / padded


def test_packing_collator_segments_positions_and_labels():
    from fastseq.data import PackingCollator

    tok = ByT5Tokenizer()
    plain = Seq2SeqCollator(tok, max_source_length=6, max_target_length=4)
    rows = [[("abc", "x"), ("abcdefghij", "xyzuvw")], [("ab", "y")]]
    batch = PackingCollator(plain)(rows)
    assert batch["input_ids"].shape == batch["segment_ids"].shape == batch["positions"].shape == (2, 10)
    assert batch["labels"].shape == batch["decoder_segment_ids"].shape == batch["decoder_positions"].shape == (2, 6)
    assert "decoder_input_ids" not in batch and all(t.dtype == torch.int64 for t in batch.values())
    assert batch["segment_ids"].tolist() == [[1] * 4 + [2] * 6, [1] * 3 + [0] * 7]
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2] + [0] * 7]
    assert torch.equal(batch["attention_mask"], (batch["segment_ids"] != 0).long())
    assert batch["input_ids"][1, 3:].tolist() == [tok.pad_token_id] * 7
    assert batch["decoder_segment_ids"].tolist() == [[1, 1, 2, 2, 2, 2], [1, 1, 0, 0, 0, 0]]
    assert batch["decoder_positions"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0]]
    assert batch["labels"][1].tolist() == tok.encode("y") + [-100] * 4
    # Each segment holds what the unpacked collator makes of its example, cuts included.
    for r, row in enumerate(rows):
        for s, example in enumerate(row, start=1):
            alone = plain([example])
            assert batch["input_ids"][r][batch["segment_ids"][r] == s].tolist() == alone["input_ids"][0].tolist()
            assert batch["labels"][r][batch["decoder_segment_ids"][r] == s].tolist() == alone["labels"][0].tolist()
    with pytest.raises(ValueError, match="empty batch"):
        PackingCollator(plain)([[]])


def test_span_corruption_packs_to_the_lengths_it_announces():
    from fastseq.data import PackingCollator

    tok = ByT5Tokenizer()
    corrupt = SpanCorruptionCollator(tok, input_length=32, seed=0)
    texts = ["x", "short text", "a longer text that the input length cuts " * 2]
    batch = PackingCollator(corrupt)([texts])
    for segment, text in enumerate(texts, start=1):
        expected = corrupt.lengths(len(tok.encode(text, add_special_tokens=False)))
        got = (int((batch["segment_ids"][0] == segment).sum()), int((batch["decoder_segment_ids"][0] == segment).sum()))
        assert got == expected, text
    assert corrupt.lengths(corrupt.tokens_length)[0] <= 32


def test_a_packed_stream_resumes_exactly_and_counts_its_batches():
    from fastseq.data import TokenLengths

    tok = ByT5Tokenizer()
    examples = [(f"source {i} " + "x" * (i * 7 % 40), "t" * (1 + i % 5)) for i in range(70)]
    options = dict(pack=True, limits=(64, 16), batch_size=2, buffer_size=25)
    stream = _stream(examples, tok, **options)
    counts = stream.count_batches(2)
    seen, epochs = [], []
    while stream.epoch < 2:
        batch = stream.next_batch()
        epochs.append(stream.epoch)
        if stream.epoch == 0:
            seen += [example for row in batch for example in row]
            for row in batch:
                cut = [stream._cut(TokenLengths(tok)(example)) for example in row]
                assert sum(s for s, _ in cut) <= 64 and sum(t for _, t in cut) <= 16
    assert sorted(seen) == sorted(examples)  # every example once an epoch
    assert [epochs.count(e) for e in range(2)] == counts
    first = _stream(examples, tok, **options)
    for _ in range(7):  # into the second buffer
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(12)]  # across buffers and into the next epoch
    again = _stream(examples, tok, **options)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [again.next_batch() for _ in range(12)] == expected
    assert again.epochs_done() == first.epochs_done()
    with pytest.raises(ValueError, match="--max-tokens 40 cannot hold a packed row of up to 64 tokens"):
        _stream(examples, tok, **{**options, "max_tokens": 40})


def test_a_packed_batch_gives_the_loss_of_the_same_examples_unpacked(reference_backend):
    from fastseq.data import PackingCollator
    from fastseq.models import T5ForConditionalGeneration
    from fastseq.train.engine import default_config

    tok = ByT5Tokenizer()
    plain = Seq2SeqCollator(tok, max_source_length=24, max_target_length=8)
    rows = [[("reverse: abc", "cba"), ("a source cut by the maximum length", "a long target")], [("short", "s")]]
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(default_config()).eval()
    packed = model(**PackingCollator(plain)(rows)).loss
    unpacked = model(**plain([example for row in rows for example in row])).loss
    assert abs(packed.item() - unpacked.item()) <= 1e-5 * abs(unpacked.item())
