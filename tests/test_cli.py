"""The `fastseq` command, run through its installed console script."""

from __future__ import annotations

import shutil
import subprocess

import torch

import fastseq
from tests.conftest import batch, hf_model


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
