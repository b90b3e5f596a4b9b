"""fastseq.tokenizers against transformers' tokenizers, on SentencePiece and BPE models trained here
from generated text."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch

from fastseq.tokenizers import (
    BlenderbotSmallTokenizer,
    ByT5Tokenizer,
    T5Tokenizer,
    check_vocabulary,
    load_tokenizer,
)

SYLLABLES = ["ka", "to", "ri", "mu", "sen", "pa", "lo", "ne", "qui", "bra", "fo", "ju", "ov", "la", "do", "ca",
             "fé", "ü", "語", "本", "'s", "!", "?", ",", "."]  # fmt: skip


def _corpus(n=3000, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


TEXTS = [
    "kato rimu sen",
    "  kato   rimu\tsen \n la ",
    "Kato, RIMU! fé ü 語本?",
    "kato <extra_id_0> rimu <extra_id_17> sen",
    "kato<extra_id_1>rimu<extra_id_99>",
    "kato</s>mu <pad> x <unk>",
    "unknown ZZZ §§ ∑ chars",
    "ｋａｔｏ ① Ⅻ",  # NFKC-normalised by the SentencePiece model
    "",
    " ",
    "it's  don't, (para) . .",
]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("t5tok")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(path / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def hf_t5(spiece_dir):
    from transformers import T5Tokenizer as HFT5Tokenizer

    return HFT5Tokenizer.from_pretrained(spiece_dir)


def test_t5_encode_and_decode_match_transformers(spiece_dir, hf_t5):
    ours = load_tokenizer(spiece_dir)
    assert isinstance(ours, T5Tokenizer)
    assert len(ours) == len(hf_t5) == 300
    assert (ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2)
    assert ours.sentinel_id(0) == hf_t5.convert_tokens_to_ids("<extra_id_0>") == 299
    assert ours.sentinel_id(99) == hf_t5.convert_tokens_to_ids("<extra_id_99>") == 200
    for text in [*TEXTS, *_corpus(50, seed=1)]:
        expected = hf_t5(text).input_ids
        assert ours.encode(text) == expected, text
        for skip in (False, True):
            assert ours.decode(expected, skip_special_tokens=skip) == hf_t5.decode(
                expected, skip_special_tokens=skip
            ), (text, skip)


def test_t5_decodes_any_ids_as_transformers(spiece_dir, hf_t5):
    ours = load_tokenizer(spiece_dir)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ids = torch.randint(0, len(ours), (12,), generator=g).tolist()
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_t5.decode(ids, skip_special_tokens=skip), ids


def test_t5_sentinel_beyond_the_count_is_an_error(spiece_dir, hf_t5):
    ours = load_tokenizer(spiece_dir)
    # transformers splits it into ordinary pieces without a word:
    assert len(hf_t5("<extra_id_100>").input_ids) > 2
    with pytest.raises(ValueError, match=r"<extra_id_100>.*100 sentinels"):
        ours.encode("fill <extra_id_100> here")
    with pytest.raises(ValueError, match="out of range"):
        ours.sentinel_id(100)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batches_match_transformers(spiece_dir, hf_t5, side):
    ours = load_tokenizer(spiece_dir)
    texts = TEXTS[:5] + _corpus(5, seed=2)
    for kwargs in (
        dict(padding=True),
        dict(padding=True, truncation=True, max_length=6),
        dict(padding="max_length", max_length=40),
        dict(padding=True, pad_to_multiple_of=8),
    ):
        got = ours(texts, padding_side=side, **kwargs)
        expected = hf_t5(texts, padding_side=side, return_tensors="pt", **kwargs)
        assert torch.equal(got["input_ids"], expected["input_ids"]), kwargs
        assert torch.equal(got["attention_mask"], expected["attention_mask"]), kwargs
    batch = ours(texts, padding=True)
    assert ours.batch_decode(batch["input_ids"], skip_special_tokens=True) == hf_t5.batch_decode(
        batch["input_ids"], skip_special_tokens=True
    )


def test_batch_options_are_checked(spiece_dir):
    ours = load_tokenizer(spiece_dir)
    with pytest.raises(ValueError, match="padding=True"):
        ours(["kato", "kato rimu sen"], padding=False)
    assert ours(["kato", "kato rimu sen"], padding=False, return_tensors=None)["input_ids"][0] == ours.encode("kato")
    with pytest.raises(ValueError, match="needs max_length"):
        ours(["kato"], padding="max_length")
    with pytest.raises(ValueError, match="padding_side"):
        ours(["kato"], padding_side="middle")
    assert ours.decode([5, 300]) == ours.decode([5])  # an id past the vocabulary is dropped


def test_padded_vocabulary_ids_are_dropped_as_transformers_does(spiece_dir, hf_t5):
    """FLAN-T5 and mT5 models have more ids than their tokenizers (32,128 vs 32,100; 250,112 vs 250,100):
    a model may emit one; decoding drops it, as transformers does."""
    ours = load_tokenizer(spiece_dir)
    model_vocab = 328  # the tokenizer's 300 ids rounded up to a multiple of 8 (FLAN-T5's 32,128 likewise)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        ids = torch.randint(0, model_vocab, (14,), generator=g).tolist() + [model_vocab - 1, 300]
        assert any(i >= len(ours) for i in ids)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf_t5.decode(ids, skip_special_tokens=skip), ids
    rows = torch.tensor([[0, 5, 320, 6, 1], [0, 327, 7, 1, 0]])
    assert ours.batch_decode(rows, skip_special_tokens=True) == hf_t5.batch_decode(rows, skip_special_tokens=True)


def test_byt5_and_blenderbot_small_decode_ids_they_lack(bpe_dir):
    from transformers import BlenderbotSmallTokenizer as HFTokenizer
    from transformers import ByT5Tokenizer as HFByT5Tokenizer

    # ByT5: transformers raises on an id past its 384 ("bytes must be in range(0, 256)"); fastseq drops it and
    # decodes the rest as transformers decodes them.
    ours, theirs = ByT5Tokenizer(), HFByT5Tokenizer()
    ids = [75, 400, 76, 383, 1000, 259, 1]
    with pytest.raises(ValueError):
        theirs.decode(ids)
    known = [i for i in ids if i < 384]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(known, skip_special_tokens=skip)
    # BlenderbotSmall: transformers reads an id its vocabulary lacks as the unknown token; so does fastseq.
    ours, theirs = load_tokenizer(bpe_dir), HFTokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"))
    ids = [5, 6, len(ours), 7, len(ours) + 40, 2]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert "__unk__" in ours.decode(ids, skip_special_tokens=True)


def test_saved_tokenizer_loads_in_transformers_and_back(spiece_dir, tmp_path, hf_t5):
    from transformers import AutoTokenizer

    ours = load_tokenizer(spiece_dir)
    ours.padding_side = "left"
    ours.save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.padding_side == "left"
    for text in TEXTS:
        assert theirs(text).input_ids == ours.encode(text) == again.encode(text)


def test_byt5_matches_transformers():
    from transformers import ByT5Tokenizer as HFByT5Tokenizer

    theirs, ours = HFByT5Tokenizer(), ByT5Tokenizer()
    assert len(ours) == len(theirs) == 384
    assert ours.sentinel_id(0) == theirs.convert_tokens_to_ids("<extra_id_0>")
    for text in [*TEXTS, *_corpus(20, seed=3)]:
        if any(int(n) >= 125 for n in re.findall(r"<extra_id_(\d+)>", text)):
            continue
        expected = theirs(text).input_ids
        assert ours.encode(text) == expected, text
        for skip in (False, True):
            assert ours.decode(expected, skip_special_tokens=skip) == theirs.decode(expected, skip_special_tokens=skip)
    with pytest.raises(ValueError, match="<extra_id_125>"):
        ours.encode("<extra_id_125>")
    # A byte sequence cut inside a character decodes what is whole, as transformers does.
    ids = ours.encode("fé語", add_special_tokens=False)[:-1]
    assert ours.decode(ids) == theirs.decode(ids)


def _learn_bpe(words: Counter, merges: int) -> list[tuple[str, str]]:
    """Plain BPE learning over words ending in </w>: merge the most frequent pair, repeat."""
    vocab = {(*w[:-1], w[-1] + "</w>"): n for w, n in words.items()}
    learned = []
    for _ in range(merges):
        pairs = Counter()
        for symbols, n in vocab.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        learned.append(best)
        merged = {}
        for symbols, n in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = n
        vocab = merged
    return learned


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from transformers import BlenderbotSmallTokenizer as HFTokenizer

    path = tmp_path_factory.mktemp("bbtok")
    corpus = [line.lower() for line in _corpus(400, seed=4)]
    words = Counter(w for line in corpus for w in line.replace(",", " ,").replace("'", " ' ").split())
    merges = _learn_bpe(words, 60)
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    vocab = {"__null__": 0, "__start__": 1, "__end__": 2, "__unk__": 3}
    (path / "vocab.json").write_text(json.dumps(vocab))
    # The vocabulary: every piece the merges produce on the training text, minus a few (so that
    # held-out pieces exercise the unknown token).
    pieces = HFTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).tokenize(" ".join(corpus[:300]))
    for piece in sorted(set(pieces))[:-5]:
        vocab.setdefault(piece, len(vocab))
    vocab["__newln__"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    return path


def test_blenderbot_small_matches_transformers(bpe_dir, tmp_path):
    from transformers import BlenderbotSmallTokenizer as HFTokenizer

    theirs = HFTokenizer(str(bpe_dir / "vocab.json"), str(bpe_dir / "merges.txt"))
    ours = load_tokenizer(bpe_dir)
    assert isinstance(ours, BlenderbotSmallTokenizer)
    assert len(ours) == len(theirs)
    assert (ours.pad_token_id, ours.bos_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2, 3)
    texts = [*TEXTS, *_corpus(40, seed=5), "__start__ kato __end__", "two\nlines here", "ZZQ unknownish"]
    for text in texts:
        expected = theirs(text).input_ids
        assert ours.encode(text) == expected, text
        for skip in (False, True):
            assert ours.decode(expected, skip_special_tokens=skip) == theirs.decode(expected, skip_special_tokens=skip)
    assert ours.unk_token_id in ours.encode("ZZQ unknownish")
    ours.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).encode(texts[2]) == ours.encode(texts[2])


def test_load_tokenizer_errors_and_vocabulary_check(tmp_path, spiece_dir):
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    assert isinstance(load_tokenizer(tmp_path), ByT5Tokenizer)
    check_vocabulary(load_tokenizer(spiece_dir), 300)
    with pytest.raises(ValueError, match="300 ids but the model's vocabulary has 256"):
        check_vocabulary(load_tokenizer(spiece_dir), 256)


def test_spiece_model_without_t5_special_ids_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(500)), model_prefix=str(tmp_path / "spiece"), vocab_size=80,
        model_type="unigram", minloglevel=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="pad_id=0, eos_id=1, unk_id=2"):
        load_tokenizer(tmp_path)


# ---- damaged tokenizer files: each one error that names the file and the fix ---------------------------------


def _bad_tokenizer(tmp_path, spiece_dir, bpe_dir, case: str):
    path = tmp_path / case.replace(" ", "_")
    path.mkdir()
    spiece = (spiece_dir / "spiece.model").read_bytes()
    files = {
        "truncated spiece.model": {"spiece.model": spiece[: len(spiece) // 2]},
        "empty spiece.model": {"spiece.model": b""},
        "text as spiece.model": {"spiece.model": b"<pad> 0\n</s> 1\n"},
        "tokenizer_config.json list": {"spiece.model": spiece, "tokenizer_config.json": b"[1, 2]"},
        "tokenizer_config.json invalid": {"spiece.model": spiece, "tokenizer_config.json": b'{"extra_ids": 1'},
        "extra_ids text": {"spiece.model": spiece, "tokenizer_config.json": b'{"extra_ids": "100"}'},
        "extra_ids negative": {"spiece.model": spiece, "tokenizer_config.json": b'{"extra_ids": -5}'},
        "extra_ids a billion": {"spiece.model": spiece, "tokenizer_config.json": b'{"extra_ids": 1000000000}'},
        "padding_side middle": {"spiece.model": spiece, "tokenizer_config.json": b'{"padding_side": "middle"}'},
        "vocab.json list": {"vocab.json": b'["__null__", "__start__"]', "merges.txt": b"#version: 0.2\n"},
        "vocab.json gap": {
            "vocab.json": json.dumps({**json.loads((bpe_dir / "vocab.json").read_text()), "zz": 1000}).encode(),
            "merges.txt": (bpe_dir / "merges.txt").read_bytes(),
        },
        "vocab.json text id": {"vocab.json": b'{"__null__": "0"}', "merges.txt": b"#version: 0.2\n"},
        "merges.txt not UTF-8": {"vocab.json": (bpe_dir / "vocab.json").read_bytes(), "merges.txt": b"\xff\xfe\n"},
    }[case]
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


BAD_TOKENIZERS = {
    "truncated spiece.model": ("spiece.model is not a SentencePiece model", "copy spiece.model again"),
    "empty spiece.model": ("spiece.model is not a SentencePiece model",),
    "text as spiece.model": ("spiece.model is not a SentencePiece model",),
    "tokenizer_config.json list": ("tokenizer_config.json holds a JSON list, not an object",),
    "tokenizer_config.json invalid": ("tokenizer_config.json is not valid JSON",),
    "extra_ids text": ("tokenizer_config.json: extra_ids is '100'; it must be an integer in 0 ... 10000",),
    "extra_ids negative": ("tokenizer_config.json: extra_ids is -5; it must be an integer in 0 ... 10000",),
    "extra_ids a billion": ("tokenizer_config.json: extra_ids is 1000000000; it must be an integer in 0 ...",),
    "padding_side middle": ("padding_side is 'middle'",),
    "vocab.json list": ("vocab.json holds a JSON list", "token -> id"),
    "vocab.json gap": ("vocab.json: the ids must be 0 ...", "is missing"),
    "vocab.json text id": ("vocab.json: token '__null__' has id '0'",),
    "merges.txt not UTF-8": ("merges.txt is not UTF-8",),
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS))
def test_damaged_tokenizer_files_are_one_error_naming_the_file(tmp_path, spiece_dir, bpe_dir, case):
    path = _bad_tokenizer(tmp_path, spiece_dir, bpe_dir, case)
    with pytest.raises(ValueError) as err:
        load_tokenizer(path)
    for text in BAD_TOKENIZERS[case]:
        assert text in str(err.value), str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("case", list(BAD_TOKENIZERS))
def test_damaged_tokenizer_files_through_the_cli(tmp_path, spiece_dir, bpe_dir, capfd, case):
    from fastseq.cli import main

    path = _bad_tokenizer(tmp_path, spiece_dir, bpe_dir, case)
    commands = [["train", "--tokenizer", str(path), "--output-dir", str(tmp_path / "out")]]
    if case in ("truncated spiece.model", "tokenizer_config.json invalid", "vocab.json gap"):
        commands.append(["generate", "--model", str(path), "text"])
    for argv in commands:
        if argv[0] == "generate":  # a model directory whose weights are fine and whose tokenizer is not
            _tiny_model(path)
        assert main(argv) == 2
        lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("fastseq ")]
        assert len(lines) == 1 and BAD_TOKENIZERS[case][0] in lines[0], lines
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _tiny_model(path):
    from fastseq.models import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0)
    T5ForConditionalGeneration(config).save_pretrained(path)


# ---- a trained model directory is one transformers reads whole ----------------------------------------------


def _tiny(family: str, vocab_size: int):
    from fastseq.models import (
        BlenderbotSmallConfig,
        BlenderbotSmallForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    if family == "blenderbot-small":
        config = BlenderbotSmallConfig(vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, max_position_embeddings=128, dropout=0.0)  # fmt: skip
        return BlenderbotSmallForConditionalGeneration(config)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize("family", ["t5", "byt5", "blenderbot-small"])
def test_a_trained_directory_loads_in_transformers_auto_classes(tmp_path, spiece_dir, bpe_dir, family):
    """`fastseq train` writes the final model and each checkpoint with generation_config.json and the
    tokenizer files: AutoTokenizer and AutoModelForSeq2SeqLM read them and generate what fastseq generates
    (transformers 5 has no text2text-generation or summarization pipeline; they were this, in one call)."""
    import transformers

    import fastseq
    from fastseq.cli import main

    source = {"t5": spiece_dir, "byt5": None, "blenderbot-small": bpe_dir}[family]
    tokenizer = ByT5Tokenizer() if source is None else load_tokenizer(source)
    start = tmp_path / "start"
    _tiny("blenderbot-small" if family == "blenderbot-small" else "t5", len(tokenizer)).save_pretrained(start)
    tokenizer.save_pretrained(start)
    out = tmp_path / "out"
    argv = ["train", "--model", str(start), "--data", "synthetic", "--steps", "2", "--batch-size", "4",
            "--eval-examples", "4", "--quiet", "--optimizer", "adamw", "--lr", "1e-3",
            "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    texts = ["kato rimu sen", "Fé ü, la!"]
    for directory in (out, out / "checkpoint-2"):
        assert (directory / "generation_config.json").is_file()
        theirs_tok = transformers.AutoTokenizer.from_pretrained(directory)
        theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
        ours_tok, ours = load_tokenizer(directory), fastseq.from_pretrained(directory)
        assert theirs.generation_config.decoder_start_token_id == ours.config.decoder_start_token_id
        assert theirs.generation_config.eos_token_id == ours.config.eos_token_id
        batch = theirs_tok(texts, padding=True, return_tensors="pt")
        assert torch.equal(batch["input_ids"], ours_tok(texts)["input_ids"])
        with torch.no_grad():
            expected = theirs.generate(**batch, max_new_tokens=5, num_beams=1, do_sample=False)
        got = ours.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5)
        width = min(expected.shape[1], got.shape[1])
        assert torch.equal(got[:, :width], expected[:, :width])
        assert ours_tok.batch_decode(got, skip_special_tokens=True) == theirs_tok.batch_decode(
            got, skip_special_tokens=True
        )
