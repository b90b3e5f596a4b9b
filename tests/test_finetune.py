"""Fine-tuning end to end, as `transformers`' `run_summarization.py` and `run_translation.py` do it,
through the `fastseq` command on tiny models: a FLAN-style model (a real SentencePiece tokenizer,
gated-GELU, its own LM head, a vocabulary padded past the tokenizer) summarizing with a source
prefix and ROUGE; translation from nested fields in parquet and a `datasets` directory with BLEU;
then `fastseq generate` over a file. The saved model is read back by `transformers`, whose
generated and decoded outputs must be the predictions fastseq wrote."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fastseq.cli import main

ANIMALS = ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee", "ant", "elk"]


def _spiece_model_dir(path: Path, vocab_size: int) -> Path:
    """A tiny T5 v1.1 (gated GELU, untied head) whose vocabulary has `vocab_size` ids, more than its
    SentencePiece tokenizer's 140 (40 pieces and 100 sentinels), as FLAN-T5 has 32,128 for 32,100."""
    import sentencepiece as spm

    from fastseq.models import T5ForConditionalGeneration
    from fastseq.tokenizers import T5Tokenizer
    from fastseq.train.engine import default_config

    path.mkdir(parents=True)
    corpus = [f"the {a} saw the {b} near the river and it was happy today" for a in ANIMALS for b in ANIMALS]
    corpus += [f"summarize: {c} {a} sat on the mat" for a in ANIMALS for c in ("a", "one", "the")]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(path / "sp"), vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    tokenizer = T5Tokenizer(path / "sp.model", extra_ids=100)
    assert len(tokenizer) == 140 < vocab_size
    torch.manual_seed(0)
    config = dataclasses.replace(default_config(), vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                 num_layers=2, num_decoder_layers=2, tie_word_embeddings=False, extra={})  # fmt: skip
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # the ids past the tokenizer get large logits, so that greedy decoding emits some
        model.lm_head.weight[len(tokenizer) :] *= 4
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(capfd, *argv: str) -> str:
    code = main(list(argv))
    captured = capfd.readouterr()
    assert code == 0, captured.err
    return captured.out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _predictions(out: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"eval_predictions-{step}.jsonl").read_text().splitlines()]


def _transformers_outputs(model_dir: Path, sources: list[str], max_source: int, max_new: int) -> list[str]:
    """What `transformers` generates (greedy) and decodes from the saved model directory."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    batch = tokenizer(sources, padding=True, truncation=True, max_length=max_source, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**batch, max_new_tokens=max_new, num_beams=1, do_sample=False)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _emits_padded_ids(model_dir: Path, sources: list[str], max_source: int, max_new: int, tokenizer_size: int) -> bool:
    """Whether the model's greedy outputs hold an id the tokenizer does not have (what decoding drops)."""
    import fastseq
    from fastseq.tokenizers import load_tokenizer

    batch = load_tokenizer(model_dir)(sources, padding=True, truncation=True, max_length=max_source)
    ids = fastseq.from_pretrained(model_dir).eval().generate(batch["input_ids"], batch["attention_mask"],
                                                            max_new_tokens=max_new)  # fmt: skip
    return bool((ids >= tokenizer_size).any())


def test_flan_style_summarization_with_a_padded_vocabulary_prefix_and_rouge(tmp_path, capfd, reference_backend):
    from rouge_score import rouge_scorer

    model = _spiece_model_dir(tmp_path / "flan-tiny", vocab_size=160)
    others = ANIMALS[3:] + ANIMALS[:3]
    rows = [{"article": {"text": f"the {a} saw the {b} near the river. it was happy today."},
             "summary": f"the {a} saw the {b}.\nit was happy."}
            for a, b in zip(ANIMALS, others, strict=True)]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    _run(capfd, "train", "--model", str(model), "--data", str(data), "--eval-data", str(data),
         "--source-field", "article.text", "--target-field", "summary", "--source-prefix", "summarize: ",
         "--metric", "rouge", "--steps", "4", "--eval-every", "2", "--eval-examples", "6", "--batch-size", "4",
         "--max-source-length", "24", "--max-new-tokens", "8", "--quiet", "--output-dir", str(out))  # fmt: skip
    final = _predictions(out, 4)
    assert [r["source"] for r in final] == [f"summarize: {r['article']['text']}" for r in rows[:6]]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    (record,) = [r for r in _records(out) if r["step"] == 4 and "eval_loss" in r]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        direct = [scorer.score(r["target"], r["prediction"])[key].fmeasure for r in final]
        assert record[key] == pytest.approx(100 * sum(direct) / len(final), rel=1e-12), key
    # transformers reads the saved directory (padded vocabulary, generation config, tokenizer) and
    # generates and decodes what fastseq's evaluation wrote.
    expected = _transformers_outputs(out, [r["source"] for r in final], max_source=24, max_new=8)
    assert [r["prediction"] for r in final] == expected
    assert _emits_padded_ids(out, [r["source"] for r in final], max_source=24, max_new=8, tokenizer_size=140)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 160


def test_translation_from_nested_fields_in_parquet_and_a_datasets_directory_then_generate(
    tmp_path, capfd, reference_backend
):
    import datasets
    import sacrebleu

    model = _spiece_model_dir(tmp_path / "t5-tiny", vocab_size=144)
    pairs = [{"translation": {"en": f"the {a} saw the {b}", "xx": f"{b} {a} saw"}, "id": i}
             for i, (a, b) in enumerate(zip(ANIMALS, ANIMALS[1:] + ANIMALS[:1], strict=True))]  # fmt: skip
    datasets.Dataset.from_list(pairs).to_parquet(tmp_path / "train.parquet")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(pairs[:5])}).save_to_disk(tmp_path / "dev")
    out = tmp_path / "out"
    _run(capfd, "train", "--model", str(model), "--data", str(tmp_path / "train.parquet"),
         "--eval-data", str(tmp_path / "dev"), "--source-field", "translation.en", "--target-field", "translation.xx",
         "--metric", "bleu", "--steps", "3", "--batch-size", "4", "--max-new-tokens", "6", "--quiet",
         "--output-dir", str(out))  # fmt: skip
    final = _predictions(out, 3)
    assert [(r["source"], r["target"]) for r in final] == [(p["translation"]["en"], p["translation"]["xx"])
                                                            for p in pairs[:5]]  # fmt: skip
    (record,) = [r for r in _records(out) if r["step"] == 3 and "eval_loss" in r]
    predictions, targets = [r["prediction"] for r in final], [r["target"] for r in final]
    assert record["bleu"] == sacrebleu.corpus_bleu(predictions, [targets]).score
    # `fastseq generate` over a jsonl file with the nested field gives evaluation's greedy outputs.
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(p) + "\n" for p in pairs[:5]))
    _run(capfd, "generate", "--model", str(out), "--input-file", str(test), "--input-field", "translation.en",
         "--output-file", str(tmp_path / "pred.jsonl"), "--max-new-tokens", "6", "--quiet")  # fmt: skip
    written = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [w["prediction"] for w in written] == predictions
    assert [{k: v for k, v in w.items() if k != "prediction"} for w in written] == pairs[:5]


def test_generate_predicts_as_training_evaluated(tmp_path, capfd, caplog, reference_backend):
    """A trained model directory records the run's source prefix and lengths and evaluation's decoding;
    `fastseq generate` with no flags gives evaluation's predictions (prefix added, sources cut to the
    run's max source length, one warning counting the cut ones), and so does `transformers` from the same
    files; generation_config.json's settings apply, and a flag overrides them."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from fastseq.tokenizers import load_tokenizer

    model = _spiece_model_dir(tmp_path / "t5-tiny", vocab_size=144)
    rows = [{"document": f"the {a} saw the {b} near the river", "summary": f"the {a} saw"}
            for a, b in zip(ANIMALS, ANIMALS[2:] + ANIMALS[:2], strict=True)]  # fmt: skip
    rows[3]["document"] = " ".join(f"the {a} saw the river" for a in ANIMALS)  # 154 tokens, the others 32 to 35
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    _run(capfd, "train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--source-field",
         "document", "--target-field", "summary", "--source-prefix", "summarize: ", "--max-source-length", "40",
         "--num-beams", "2", "--max-new-tokens", "5", "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--quiet",
         "--output-dir", str(out))  # fmt: skip
    assert json.loads((out / "prediction_config.json").read_text()) == {
        "source_prefix": "summarize: ", "max_source_length": 40, "max_target_length": 128}  # fmt: skip
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_new_tokens"]) == (2, 5)
    evaluated = [r["prediction"] for r in _predictions(out, 2)]
    sources = [f"summarize: {r['document']}" for r in rows]
    tokenizer = load_tokenizer(out)
    assert (tokenizer(sources, padding=True)["attention_mask"].sum(1) > 40).tolist() == [i == 3 for i in range(10)]

    def generate(*flags: str) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="fastseq.generate"):
            _run(capfd, "generate", "--model", str(out), "--input-file", str(data), "--input-field", "document",
                 "--output-file", str(tmp_path / "pred.jsonl"), "--quiet", *flags)  # fmt: skip
        written = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
        return [w["prediction"] for w in written]

    assert generate() == evaluated
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["1 of 10 inputs are longer than 40 tokens (prediction_config.json's max_source_length) and "
                        "were cut to it; pass --max-source-length N to change it"]  # fmt: skip
    # transformers reads the same files: the tokenizer cuts to model_max_length, generate takes the config's decoding.
    theirs = AutoTokenizer.from_pretrained(out)
    batch = theirs(sources, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ids = AutoModelForSeq2SeqLM.from_pretrained(out).eval().generate(**batch)
    assert theirs.batch_decode(ids, skip_special_tokens=True) == evaluated
    # generation_config.json's settings apply; a flag overrides the file and the recorded prefix and length.
    (out / "generation_config.json").write_text(json.dumps({**generation, "num_beams": 3, "max_new_tokens": 3}))
    assert generate() == generate("--num-beams", "3", "--max-new-tokens", "3")
    plain = generate("--source-prefix", "", "--max-source-length", "200", "--num-beams", "1")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # nothing was cut
    import fastseq

    greedy = fastseq.from_pretrained(out).generate(**tokenizer([r["document"] for r in rows], padding=True),
                                                   max_new_tokens=3)  # fmt: skip
    assert plain == tokenizer.batch_decode(greedy[:, 1:], skip_special_tokens=True)
