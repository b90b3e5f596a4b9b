"""Hub ids (`--model ORG/NAME`) through the Hugging Face cache: a cache laid out under a temporary
HF_HOME (blobs, snapshot symlinks, refs/main, as `huggingface_hub` writes it), HF_HUB_OFFLINE=1, and the
installed `fastseq` command for `train`, `generate` and `convert`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastseq
from fastseq.cli import main
from fastseq.tokenizers import ByT5Tokenizer, load_tokenizer
from tests.conftest import refused

COMMIT = "3f1c0a2b9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a"
REPO = "tiny-org/tiny-t5"


def _model(path: Path, seed: int) -> Path:
    from fastseq.models import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def _cache(hf_home: Path, repo_id: str, source: Path) -> Path:
    """`source`'s files as huggingface_hub caches a download of `repo_id`: content-addressed blobs,
    a snapshot of relative symlinks to them, and refs/main naming the snapshot's commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _fastseq(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("fastseq")
    assert exe, "the fastseq console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600, check=False, env=env, cwd=cwd)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cached REPO under tmp/hf_home: the environment for a subprocess (HF_HOME, HF_HUB_OFFLINE=1), and
    this process pointed at the same cache (huggingface_hub reads HF_HOME when first imported)."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    source = _model(tmp_path / "source", seed=0)
    snapshot = _cache(hf_home, REPO, source)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", FASTSEQ_BACKEND="reference")
    env.pop("HF_HUB_CACHE", None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return env, source, snapshot


def _cli(capfd, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def test_the_layout_is_what_huggingface_hub_reads(hub, tmp_path):
    from huggingface_hub import scan_cache_dir

    _, source, snapshot = hub
    info = scan_cache_dir(tmp_path / "hf_home" / "hub")
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and set(repo.refs) == {"main"}
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT
    assert {f.file_name for f in revision.files} == {p.name for p in source.iterdir()}


def _same_weights(a: Path, b: Path, atol: float = 0.0) -> bool:
    x, y = fastseq.from_pretrained(a).state_dict(), fastseq.from_pretrained(b).state_dict()
    return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=atol, rtol=0) for k in x)


@pytest.mark.slow  # several runs of the installed command
def test_train_and_generate_a_hub_id_from_the_cache_of_hf_home(hub, tmp_path):
    """The installed command, with HF_HOME and HF_HUB_OFFLINE=1 in its environment."""
    env, source, _ = hub
    out = tmp_path / "out"
    # AdamW at a vanishing rate: the trained model is the model it started from, to 1e-6.
    quick = ["--steps", "2", "--batch-size", "4", "--eval-examples", "4", "--quiet", "--optimizer", "adamw",
             "--lr", "1e-20", "--data", "synthetic"]  # fmt: skip
    result = _fastseq(env, tmp_path, "train", "--model", REPO, *quick, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert "random weights" not in result.stdout
    assert _same_weights(out, source, atol=1e-6)
    result = _fastseq(env, tmp_path, "generate", "--model", REPO, "reverse: abc", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    model, tok = fastseq.from_pretrained(source), load_tokenizer(source)
    batch = tok(["reverse: abc"])
    expected = tok.batch_decode(model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)[:, 1:],
                                skip_special_tokens=True)  # fmt: skip
    assert result.stdout.splitlines() == expected


def test_convert_and_the_library_read_a_hub_id(hub, tmp_path, capfd):
    _, source, snapshot = hub
    code, _, err = _cli(capfd, "convert", REPO, str(tmp_path / "converted"))
    assert code == 0, err
    assert _same_weights(tmp_path / "converted", source)
    assert isinstance(load_tokenizer(REPO), ByT5Tokenizer)
    from fastseq.hub import model_directory

    assert model_directory(REPO) == snapshot


def test_a_directory_wins_over_a_hub_id_of_the_same_name(hub, tmp_path, capfd):
    _, source, _ = hub
    local = _model(tmp_path / REPO, seed=1)  # ./tiny-org/tiny-t5, other weights
    assert not _same_weights(local, source)
    out = tmp_path / "out"
    code, _, err = _cli(capfd, "train", "--model", REPO, "--data", "synthetic", "--steps", "1", "--batch-size", "2",
                        "--eval-examples", "2", "--quiet", "--optimizer", "adamw", "--lr", "1e-20", "--output-dir",
                        str(out))  # fmt: skip
    assert code == 0, err
    assert _same_weights(out, local, atol=1e-6)


def test_names_that_are_not_there_are_one_line_with_both_options(hub, tmp_path, capfd):
    cases = {
        "tiny-org/missing": ("neither a directory nor a model in the Hugging Face cache",
                             str(tmp_path / "hf_home" / "hub"), "HF_HUB_OFFLINE=1", "name a preset with --random-init"),
        "google/t5-v1_1-small": ("neither a directory nor a model in the Hugging Face cache",
                                 "add --random-init to train preset google/t5-v1_1-small"),
        "no/such/path": ("is not a directory, nor a Hugging Face Hub id",),
    }  # fmt: skip
    for name, expected in cases.items():
        commands = [["train", "--model", name, "--data", "synthetic", "--output-dir", str(tmp_path / "out")]]
        if name == "tiny-org/missing":
            commands += [["generate", "--model", name, "text"], ["convert", name, str(tmp_path / "dst")]]
        for command in commands:
            code, _, err = _cli(capfd, *command)
            lines = [line for line in err.splitlines() if line.startswith("fastseq ")]
            assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
            for text in expected if command[0] == "train" else expected[:1]:
                assert text in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "dst").exists()


def test_random_init_is_explicit_and_said(hub, tmp_path, capfd, caplog):
    _, source, _ = hub
    caplog.set_level("INFO", logger="fastseq.train")
    out = tmp_path / "out"
    code, stdout, err = _cli(capfd, "train", "--model", str(source), "--random-init", "--seed", "7", "--steps", "1",
                             "--batch-size", "2", "--eval-examples", "2", "--quiet", "--optimizer", "adamw",
                             "--lr", "1e-20", "--output-dir", str(out))  # fmt: skip
    assert code == 0, err
    assert "random weights" in stdout.splitlines()[1]  # the summary, after the settings line
    assert "with random weights (--random-init)" in caplog.text
    assert not _same_weights(out, source, atol=1e-3)  # the directory's config, not its weights
    assert json.loads((out / "config.json").read_text())["d_model"] == 32
    # A preset with --random-init trains that preset (it needs a tokenizer: the preset path was taken).
    code, _, err = _cli(capfd, "train", "--model", "t5-small", "--random-init", "--output-dir", str(out / "x"))
    assert code == 2 and "preset 't5-small' is built with random weights and needs a tokenizer" in err
    code, _, err = _cli(capfd, "train", "--model", "t5-smol", "--random-init", "--output-dir", str(out / "x"))
    assert code == 2 and "is neither a directory nor a preset" in err


def test_a_tokenizer_given_as_a_hub_id_comes_from_the_cache(hub, tmp_path, capfd):
    """A model directory without tokenizer files trains with `--tokenizer ORG/NAME` from the cache."""
    _, source, _ = hub
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    common = ["--steps", "1", "--batch-size", "2", "--eval-examples", "2", "--quiet", "--data", "synthetic"]
    code, _, err = _cli(capfd, "train", "--model", str(bare), *common, "--output-dir", str(tmp_path / "o1"))
    assert code == 2, err  # the directory holds no tokenizer
    code, _, err = _cli(capfd, "train", "--model", str(bare), "--tokenizer", REPO, *common,
                        "--output-dir", str(tmp_path / "o2"))  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "o2" / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("ByT5")
    code, _, err = _cli(capfd, "train", "--tokenizer", "tiny-org/missing", "--output-dir", str(tmp_path / "o3"))
    lines = [line for line in err.splitlines() if line.startswith("fastseq ")]
    assert code == 2 and len(lines) == 1 and "tiny-org/missing" in lines[0], err


def _files(root: Path) -> dict[str, tuple[bool, bytes]]:
    """Every entry under `root`: whether it is a link, and its bytes (a file's)."""
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}  # fmt: skip


def test_the_hub_cache_is_an_input_and_never_written(hub, tmp_path, capfd):
    """A hub id's snapshot is the model the run reads: train --overwrite into it deleted its config,
    weights and tokenizer; convert into it replaced its links with files; an --output-dir anywhere in
    the cache wrote there. Each is one line, and the cache is as it was."""
    env, source, snapshot = hub
    cache = tmp_path / "hf_home" / "hub"
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"source": f"copy {w}", "target": w}) + "\n" for w in "abcd"))
    before = _files(cache)
    quick = ["--steps", "1", "--batch-size", "2", "--quiet", "--data", str(data)]
    cases = [
        (["train", "--model", REPO, *quick, "--output-dir", str(snapshot), "--overwrite"],
         f"--output-dir {snapshot} lies inside the Hugging Face cache"),
        (["train", *quick, "--output-dir", str(snapshot / "run")], "lies inside the Hugging Face cache"),
        (["train", *quick, "--output-dir", str(cache)], "lies inside the Hugging Face cache"),
        (["train", "--model", REPO, *quick, "--output-dir", str(tmp_path / "hf_home"), "--overwrite"],
         f"holds --model {REPO} ({snapshot})"),
        (["convert", REPO, str(snapshot)], f"DST {snapshot} lies inside the Hugging Face cache"),
        (["convert", str(source), str(snapshot.parent / "other")], "lies inside the Hugging Face cache"),
        (["convert", "--from-deepspeed", str(snapshot), "--to", str(snapshot)], "lies inside the Hugging Face cache"),
        (["generate", "--model", REPO, "x", "--output-file", str(snapshot / "out.txt")],
         f"--output-file {snapshot / 'out.txt'} lies inside the Hugging Face cache"),
    ]  # fmt: skip
    for argv, expected in cases:
        refused(capfd, argv, expected, "huggingface_hub owns" if "Hugging Face cache" in expected else REPO)
        assert _files(cache) == before, argv
    # The installed command, in a process of its own that reads HF_HOME from its environment.
    result = _fastseq(env, tmp_path, "train", "--model", REPO, *quick, "--output-dir", str(snapshot), "--overwrite")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fastseq train: error: --output-dir"), result.stderr
    assert _files(cache) == before
