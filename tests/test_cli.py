"""The `fastseq` command, run through its installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

import fastseq
from tests.conftest import batch, hf_model, refused


def _fastseq(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("fastseq")
    assert exe, "the fastseq console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, check=False)


def test_train_default_job_short_run_then_generate(tmp_path):
    out = tmp_path / "run"
    result = _fastseq("train", "--steps", "40", "--eval-examples", "16", "--quiet", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "held-out exact match" in result.stdout and "checkpoint in" in result.stdout
    model = fastseq.from_pretrained(out)
    assert model.config.vocab_size == 384 and model.config.feed_forward_proj == "gated-gelu"
    result = _fastseq("generate", "--model", str(out), "reverse: abc", "reverse: hello", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    # The same text as the library's greedy decoding of that checkpoint.
    from fastseq.tokenizers import load_tokenizer

    tok = load_tokenizer(out)
    batch = tok(["reverse: abc", "reverse: hello"])
    expected = tok.batch_decode(model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8)[:, 1:],
                                skip_special_tokens=True)  # fmt: skip
    assert lines == expected


def test_train_resume_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    common = ["--eval-examples", "4", "--quiet", "--output-dir", str(out), "--batch-size", "4"]
    assert _fastseq("train", "--steps", "4", *common).returncode == 0
    result = _fastseq("train", "--steps", "6", "--resume", *common)
    assert result.returncode == 0, result.stderr
    assert "steps 4-6" in result.stdout and (out / "checkpoint-6").is_dir()


def test_convert_to_bfloat16_shards(tmp_path):
    hf_model("t5_v10_tied").save_pretrained(tmp_path / "src")
    result = _fastseq(
        "convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", "bfloat16", "--max-shard-size", "30KB"
    )
    assert result.returncode == 0, result.stderr
    model = fastseq.from_pretrained(tmp_path / "dst", dtype=torch.bfloat16)
    assert (tmp_path / "dst" / "model.safetensors.index.json").is_file()
    ref = fastseq.from_pretrained(tmp_path / "src")
    inputs = batch("t5_v10_tied")
    with torch.no_grad():
        a = ref(**inputs).logits
        b = model.float()(**inputs).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_bad_arguments_fail_cleanly(tmp_path):
    result = _fastseq("convert", str(tmp_path / "missing"), str(tmp_path / "dst"))
    assert result.returncode == 2
    assert "error:" in result.stderr and "not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_pytorch_bin_directory_to_safetensors(tmp_path):
    import json

    ref = hf_model("t5_v11_untied")
    src = tmp_path / "bin"
    src.mkdir()
    torch.save({k: v.contiguous() for k, v in ref.state_dict().items()}, src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(ref.config.to_dict()))
    result = _fastseq("convert", str(src), str(tmp_path / "safe"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "safe" / "model.safetensors").is_file() and not list((tmp_path / "safe").glob("*.bin"))
    from transformers import T5ForConditionalGeneration

    theirs = T5ForConditionalGeneration.from_pretrained(tmp_path / "safe").eval()
    inputs = batch("t5_v11_untied")
    with torch.no_grad():
        assert torch.allclose(theirs(**inputs).logits, ref(**inputs).logits, atol=1e-5)


def _metric_losses(out) -> list[float]:
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def wait_for_steps(out, steps: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until the run in `proc` has logged `steps` steps (it must still be running)."""
    import time

    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run logged no steps"
        time.sleep(0.05)


@pytest.mark.parametrize("signame", [pytest.param("SIGINT", marks=pytest.mark.slow), "SIGTERM"])
def test_a_signal_ends_the_run_with_a_checkpoint_that_resumes_exactly(tmp_path, signame):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM: the step finishes, a checkpoint is written, the
    run says how to resume; resumed, it gives the losses of a run never interrupted, bit for bit."""
    import signal

    from fastseq.train.state import latest_checkpoint

    out = tmp_path / "run"
    common = ["--batch-size", "8", "--optimizer", "adamw", "--lr", "1e-3", "--eval-examples", "0", "--quiet"]
    proc = subprocess.Popen([shutil.which("fastseq"), "train", "--steps", "100000", *common, "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_steps(out, 3, proc)
    proc.send_signal(getattr(signal, signame))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + getattr(signal, signame), stderr
    checkpoint = latest_checkpoint(out)
    stopped = int(checkpoint.name.split("-")[1])
    assert f"stopped by {signame} after step {stopped}; continue with the same command and --resume" in stdout
    assert len(_metric_losses(out)) == stopped and "Traceback" not in stderr
    result = _fastseq("train", "--steps", str(stopped + 3), "--resume", *common, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    straight = tmp_path / "straight"
    assert _fastseq("train", "--steps", str(stopped + 3), *common, "--output-dir", str(straight)).returncode == 0
    assert _metric_losses(out) == _metric_losses(straight)  # bit for bit
    a, b = fastseq.from_pretrained(out), fastseq.from_pretrained(straight)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# ---- convert: the tokenizer and generation config travel; a destination never overlaps its source -------


def _tiny_model_dir(path):
    """A small random T5 v1.1 with the ByT5 vocabulary, saved with its tokenizer (and generation config)."""
    import dataclasses

    from fastseq.models import T5ForConditionalGeneration
    from fastseq.tokenizers import ByT5Tokenizer
    from fastseq.train.engine import default_config

    torch.manual_seed(0)
    config = dataclasses.replace(default_config(), d_model=32, d_kv=8, d_ff=48, num_heads=2, extra={})
    T5ForConditionalGeneration(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def test_a_converted_directory_keeps_its_tokenizer_and_generates(tmp_path):
    source, converted = tmp_path / "src", tmp_path / "dst"
    _tiny_model_dir(source)
    result = _fastseq("convert", str(source), str(converted), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (converted / name).read_bytes() == (source / name).read_bytes(), name
    assert "copied" in result.stdout and "tokenizer_config.json" in result.stdout
    texts = ["reverse: abc", "hello"]
    ours = _fastseq("generate", "--model", str(converted), *texts, "--max-new-tokens", "5")
    assert ours.returncode == 0, ours.stderr
    assert len(ours.stdout.splitlines()) == 2


@pytest.mark.parametrize("where", ["same", "inside", "holding"])
def test_convert_refuses_a_destination_that_overlaps_its_source(tmp_path, capfd, where):
    from fastseq.cli import main

    source = tmp_path / "model"
    _tiny_model_dir(source)
    dest = {"same": source, "inside": source / "hf", "holding": tmp_path}[where]
    relation = {"same": "is", "inside": "lies inside", "holding": "holds"}[where]
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    deepspeed = ["convert", "--from-deepspeed", str(source), "--to", str(dest)]
    forms = [(["convert", str(source), str(dest)], ("DST", "SRC")), (deepspeed, ("--to", "--from-deepspeed"))]
    for argv, names in forms:
        assert main(argv) == 2
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("fastseq ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0] == (f"fastseq convert: error: {names[0]} {dest} {relation} {names[1]} {source}; write to a "
                            "directory of its own")  # fmt: skip
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_convert_refuses_a_destination_that_holds_anything_unless_overwrite(tmp_path, capfd):
    """DST (or --to) holding another run's files is refused before anything is read or written: saving
    would have replaced its model and removed its shard-named files. --overwrite replaces the model files
    there and keeps the rest."""
    from fastseq.cli import main

    source, run = tmp_path / "model", tmp_path / "run"
    _tiny_model_dir(source)
    shutil.copytree(source, run)
    (run / "notes.txt").write_text("mine")
    (run / "model-00001-of-00002.safetensors").write_text("x")
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    shown = "config.json, generation_config.json, model-00001-of-00002.safetensors and 4 more"
    for argv, flag in ((["convert", str(source), str(run), "--dtype", "bf16"], "DST"),
                       (["convert", "--from-deepspeed", str(source), "--to", str(run)], "--to")):  # fmt: skip
        refused(capfd, argv, f"{flag} {run} is not empty (it holds {shown}); convert to a new directory, or pass "
                             "--overwrite to replace its model files")  # fmt: skip
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
    (tmp_path / "empty").mkdir()  # an empty directory is a new one
    assert main(["convert", str(source), str(tmp_path / "empty")]) == 0
    (run / "adapter_config.json").write_text("{}")  # a LoRA run's, which generate would load in its place
    assert main(["convert", str(source), str(run), "--dtype", "bf16", "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine" and not (run / "adapter_config.json").exists()
    assert json.loads((run / "config.json").read_text())["dtype"] == "bfloat16"
    assert fastseq.from_pretrained(run).num_parameters() == fastseq.from_pretrained(source).num_parameters()


def test_convert_from_deepspeed_names_a_checkpoint_without_deepspeed_states(tmp_path, capfd):
    """A one-process run's checkpoint given to --from-deepspeed: one line saying what it is and the command
    that converts it (DeepSpeed's own error said only that no *_model_states.pt files were found)."""
    checkpoint = tmp_path / "run" / "checkpoint-5"
    _tiny_model_dir(checkpoint)
    refused(capfd, ["convert", "--from-deepspeed", str(checkpoint), "--to", str(tmp_path / "hf")],
            f"--from-deepspeed {checkpoint} holds a Hugging Face model and no DeepSpeed states",
            f"convert it with `fastseq convert {checkpoint} DST`")  # fmt: skip
    (checkpoint / "model.safetensors").unlink()
    refused(capfd, ["convert", "--from-deepspeed", str(checkpoint), "--to", str(tmp_path / "hf")],
            "holds no DeepSpeed model states (*model_states.pt)")  # fmt: skip
    assert not (tmp_path / "hf").exists()


def test_convert_from_deepspeed_refuses_a_model_type_it_cannot_build(tmp_path, capfd):
    """A checkpoint whose config.json names another model type: one line naming the file and the types
    fastseq reads (it printed only "error: bert"), nothing written."""
    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "bert"}))
    refused(capfd, ["convert", "--from-deepspeed", str(checkpoint), "--to", str(tmp_path / "hf")],
            f"model_type='bert' in {checkpoint / 'config.json'} is not supported", "'t5'")  # fmt: skip
    assert not (tmp_path / "hf").exists()


# ---- generate over files ------------------------------------------------------------------------------------


def _library_outputs(model_dir, texts, batch_size, **settings) -> list[str]:
    """What fastseq.generate's library calls give for `texts`, batch by batch."""
    from fastseq.tokenizers import load_tokenizer

    model, tok = fastseq.from_pretrained(model_dir), load_tokenizer(model_dir)
    outputs = []
    for start in range(0, len(texts), batch_size):
        enc = tok(texts[start : start + batch_size], padding=True)
        out = model.generate(enc["input_ids"], enc["attention_mask"], **settings)
        outputs += tok.batch_decode(out[:, 1:], skip_special_tokens=True)
    return outputs


@pytest.mark.slow  # several runs of the installed command
def test_generate_768_documents_from_a_file_and_from_stdin(tmp_path):
    """768 inputs (what failed as arguments with "Argument list too long") from --input-file into
    --output-file, and from stdin to stdout: one line each, in order, the library's outputs."""
    model_dir = _tiny_model_dir(tmp_path / "model")
    texts = [f"document {i}: " + "word " * (i % 7) for i in range(768)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    common = ["--model", str(model_dir), "--max-new-tokens", "3", "--batch-size", "128"]
    result = _fastseq("generate", *common, "--input-file", str(tmp_path / "in.txt"), "--output-file", str(out),
                      "--no-repeat-ngram-size", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "768 outputs" in result.stderr and "generate" in result.stderr  # the progress bar and the summary
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 769
    expected = _library_outputs(model_dir, texts, 128, max_new_tokens=3, no_repeat_ngram_size=1)
    assert lines[:-1] == [" ".join(text.splitlines()) for text in expected]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.txt")]  # no temporary file left
    argv = [shutil.which("fastseq"), "generate", *common, "--no-repeat-ngram-size", "1", "--quiet"]
    piped = subprocess.run(argv, input="\n".join(texts[:200]), capture_output=True, text=True, timeout=600, check=False)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.split("\n")[:-1] == lines[:200] and piped.stderr == ""


def test_generate_jsonl_with_a_nested_field_writes_the_records_back(tmp_path):
    import json

    model_dir = _tiny_model_dir(tmp_path / "model")
    records = [{"id": i, "translation": {"en": f"sentence number {i}", "de": "x"}} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    result = _fastseq("generate", "--model", str(model_dir), "--input-file", str(tmp_path / "in.jsonl"),
                      "--input-field", "translation.en", "--output-file", str(out), "--max-new-tokens", "4",
                      "--num-beams", "2", "--length-penalty", "0.5", "--min-new-tokens", "2",
                      "--repetition-penalty", "1.5", "--batch-size", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    texts = [r["translation"]["en"] for r in records]
    expected = _library_outputs(model_dir, texts, 2, max_new_tokens=4, num_beams=2, length_penalty=0.5,
                                min_new_tokens=2, repetition_penalty=1.5)  # fmt: skip
    assert written == [{**r, "prediction": e} for r, e in zip(records, expected, strict=True)]


@pytest.mark.slow
def test_label_smoothing_is_the_training_loss(tmp_path):
    """`--label-smoothing 0.1`: the first step's logged loss is CrossEntropyLoss(label_smoothing=0.1) of the
    model on that batch (the same as the model's forward with label_smoothing, and not the plain loss)."""
    import json

    import torch.nn.functional as F

    from fastseq.data import Seq2SeqCollator
    from fastseq.tokenizers import load_tokenizer

    model_dir = _tiny_model_dir(tmp_path / "model")
    example = ("translate: a small house", "ein kleines Haus")
    (tmp_path / "d.jsonl").write_text(json.dumps({"source": example[0], "target": example[1]}) + "\n")
    losses = {}
    for eps in ("0", "0.1"):
        out = tmp_path / f"run-{eps}"
        result = _fastseq("train", "--model", str(model_dir), "--data", str(tmp_path / "d.jsonl"), "--steps", "1",
                          "--batch-size", "1", "--optimizer", "adamw", "--lr", "1e-3", "--eval-examples", "0",
                          "--quiet", "--label-smoothing", eps, "--output-dir", str(out))  # fmt: skip
        assert result.returncode == 0, result.stderr
        losses[eps] = _metric_losses(out)[0]
    model = fastseq.from_pretrained(model_dir).train()
    batch = Seq2SeqCollator(load_tokenizer(model_dir))([example])
    with torch.no_grad():
        logits = model(**batch, return_logits=True).logits
        plain = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        smoothed = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), label_smoothing=0.1)
        fused = model(**batch, label_smoothing=0.1).loss
    assert abs(fused - smoothed) <= 1e-5 * smoothed and abs(smoothed - plain) > 1e-3
    assert abs(losses["0.1"] - smoothed.item()) <= 1e-5 * smoothed.item(), (losses, smoothed)
    assert abs(losses["0"] - plain.item()) <= 1e-5 * plain.item(), (losses, plain)


def test_train_pack_logs_the_real_token_fraction(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"source": f"copy: {i} " + "word " * (i % 7), "target": f"{i} " * (1 + i % 3)})
                            + "\n" for i in range(40)))  # fmt: skip
    out = tmp_path / "run"
    result = _fastseq("train", "--pack", "--data", str(data), "--steps", "3", "--batch-size", "2", "--log-every", "1",
                      "--max-source-length", "64", "--max-target-length", "24", "--quiet",
                      "--output-dir", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "real tokens/s" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(0.5 < r["real_token_fraction"] <= 1 and r["tokens_per_s"] > 0 for r in records), records


def test_pack_with_a_longt5_model_is_refused(tmp_path, capfd):
    from fastseq.tokenizers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path / "tokenizer")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    refused(capfd, ["train", "--pack", "--model", "google/long-t5-local-base", "--random-init", "--tokenizer",
                    str(tmp_path / "tokenizer"), "--data", str(data), "--output-dir", str(tmp_path / "run")],
            "--pack", "LongT5 model does not pack")  # fmt: skip
