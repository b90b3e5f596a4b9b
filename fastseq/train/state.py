"""What a run writes besides the model: its output directory, the identity of the run, and the
trainer state of a checkpoint (`trainer_state.json`, one `rng-RANK.safetensors` per rank).

A checkpoint records the run it belongs to (model config, tokenizer, data and task); `--resume`
refuses another run's. A fresh run refuses an output directory that already holds files unless
`--overwrite` is given, and then removes only what a run writes there."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastseq.files import SAFE_INDEX, SAFE_WEIGHTS, SHARD_RE
from fastseq.tokenizers import Tokenizer

from .args import TrainArgs

STATE_FILE = "trainer_state.json"
FORMAT = 2
# What a run writes at the top of its output directory (besides checkpoint-STEP/).
_RUN_FILES = {"metrics.jsonl", "loss.png", "config.json", SAFE_WEIGHTS, SAFE_INDEX, "spiece.model", "vocab.json",
              "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"}  # fmt: skip
_CHECKPOINT = re.compile(r"\.?checkpoint-\d+(\.tmp|\.old)?")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run; the message says why and what to do."""


# ---- the output directory ----------------------------------------------------------------------


def _run_files(out: Path) -> list[Path]:
    return [
        p for p in out.iterdir() if p.name in _RUN_FILES or _CHECKPOINT.fullmatch(p.name) or SHARD_RE.fullmatch(p.name)
    ]


def prepare_output_dir(args: TrainArgs) -> Path:
    """Create the output directory (rank 0) and check that this run may write there."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"--output-dir {out} is not writable ({err.strerror}); choose a directory you can write"
        ) from err
    if args.continues_in_output_dir:
        return out
    entries = sorted(p.name for p in out.iterdir())
    if entries and not args.overwrite:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ValueError(
            f"--output-dir {out} already holds files ({shown}); pass --resume to continue that run, --overwrite "
            "to replace it, or choose an empty directory"
        )
    for path in _run_files(out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


# ---- the identity of a run ---------------------------------------------------------------------


def _file_fingerprint(path: str) -> str:
    """Size and SHA-256 of the first and last MiB: cheap for a corpus of any size, and it does not
    depend on where the file is. A directory (a `datasets` one): its files', sorted by name. A
    pipe is read once, by the run: it cannot be fingerprinted."""
    file = Path(path)
    if file.is_dir():
        digest = hashlib.sha256(b"directory")
        for part in sorted(p for p in file.rglob("*") if p.is_file()):
            digest.update(str(part.relative_to(file)).encode() + _file_fingerprint(str(part)).encode())
        return digest.hexdigest()[:16]
    if not file.is_file():
        return "a pipe, not fingerprinted"
    size = file.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with file.open("rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(size - 2**20, 0))
        digest.update(f.read(2**20))
    return digest.hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def run_identity(args: TrainArgs, model_config, tokenizer: Tokenizer, data_path: str | None = None) -> dict:
    """What makes a checkpoint this run's: the model, the tokenizer, the data (`data_path`: the
    training file, pipe or `datasets` directory; None: the synthetic task) and how it is read."""
    data = {
        "train": "synthetic" if data_path is None else _file_fingerprint(data_path),
        "task": args.task,
        "fields": [args.source_field, args.target_field],
        "seed": args.seed,
        "batch": [args.batch_size, args.max_tokens, args.buffer_size],
        "max_lengths": [args.max_source_length, args.max_target_length],
    }
    if args.source_prefix:
        data["prefix"] = args.source_prefix
    config = json.loads(json.dumps(model_config.to_hf_dict(), sort_keys=True))
    return {"model": config, "tokenizer": _tokenizer_fingerprint(tokenizer), "data": data}


def _differences(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} there, {b!r} here")
    return out


def check_identity(path: Path, recorded: dict | None, identity: dict) -> None:
    if recorded is None:
        raise ResumeError(f"--resume: {path} records no run identity (an older format); start a fresh run")
    differences = _differences(recorded, identity)
    if differences:
        raise ResumeError(
            f"--resume: {path} belongs to another run ({'; '.join(differences[:3])}); resume it with that run's "
            "--model, --tokenizer, --data and options, or start a fresh run in another --output-dir"
        )


# ---- checkpoints -------------------------------------------------------------------------------


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if match and (p / STATE_FILE).is_file():
            found.append((int(match[1]), p))
    return max(found)[1] if found else None


def find_checkpoint(args: TrainArgs) -> Path:
    out = Path(args.output_dir)
    path = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint to resume from in {out}; run without --resume to start")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: {path} has no {STATE_FILE}, so it is not a checkpoint of `fastseq train`")
    return path


def write_state(directory: Path, state: dict) -> None:
    (directory / STATE_FILE).write_text(json.dumps({"format": FORMAT, **state}, indent=1, allow_nan=False) + "\n")


def read_state(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step recorded")
    except (ValueError, UnicodeDecodeError) as err:
        raise ResumeError(
            f"--resume: {path / STATE_FILE} is truncated or corrupted ({err}); resume from an earlier checkpoint "
            "(--resume OUTPUT/checkpoint-STEP)"
        ) from err
    if state.get("format") != FORMAT:
        raise ResumeError(f"--resume: {path} was written in another checkpoint format; start a fresh run")
    return state


def args_record(args: TrainArgs) -> dict:
    return {k: v for k, v in dataclasses.asdict(args).items() if not (isinstance(v, float) and not math.isfinite(v))}


def save_rng(directory: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(directory / f"rng-{rank}.safetensors"))


def load_rng(directory: Path, rank: int) -> None:
    file = directory / f"rng-{rank}.safetensors"
    if not file.is_file():
        raise ResumeError(f"--resume: {file} is missing: the checkpoint was written by fewer ranks; resume with "
                          "as many ranks as wrote it")  # fmt: skip
    tensors = read_tensors(file)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint, with an error that says what to do when it is damaged."""
    try:
        return load_file(str(file))
    except OSError as err:
        raise ResumeError(f"--resume: {file} cannot be read ({err.strerror}); check its permissions") from err
    except Exception as err:  # safetensors has its own error types
        raise ResumeError(
            f"--resume: {file} is truncated or corrupted ({err}); resume from an earlier checkpoint "
            "(--resume OUTPUT/checkpoint-STEP)"
        ) from err
