"""What a run writes besides the model: its output directory, the identity of the run, and the
trainer state of a checkpoint (`trainer_state.json`, one `rng-RANK.safetensors` per rank).

A checkpoint records the run it belongs to (model config, tokenizer, data and task) and how it was
run (engine, ranks, optimizer); `--resume` refuses another run's, and a checkpoint whose state does
not check out, naming the file and the checkpoint to resume from instead. A fresh run refuses an
output directory that already holds files unless `--overwrite` is given, and then removes only what
a run writes there. The output directory is locked while a run uses it (`fastseq.files.DirectoryLock`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastseq.files import (
    LOCK_FILE,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    SHARD_RE,
    DirectoryLock,
    fingerprint,
    save_safetensors,
    write_json,
)
from fastseq.generation import PREDICTION_CONFIG, read_json_file
from fastseq.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fastseq.tokenizers import Tokenizer

from .args import TrainArgs

STATE_FILE = "trainer_state.json"
TEST_PREDICTIONS = "test_predictions.jsonl"  # --test-data's predictions, beside eval_predictions-STEP.jsonl
PREDICT_RESULTS = "predict_results.json"  # --test-data's scores, as HF's run_summarization.py names the file
WANDB_RUN_ID = "wandb_run_id.txt"  # the W&B run of OUTPUT's run, which a --resume continues
FORMAT = 2
# What a run writes at the top of its output directory (besides checkpoint-STEP/).
_RUN_FILES = {"metrics.jsonl", "loss.png", "config.json", "generation_config.json", SAFE_WEIGHTS, SAFE_INDEX,
              "spiece.model", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "generated_predictions.txt", "runs", PREDICTION_CONFIG, ADAPTER_CONFIG,
              ADAPTER_WEIGHTS, TEST_PREDICTIONS, PREDICT_RESULTS, "wandb", WANDB_RUN_ID}  # fmt: skip
log = logging.getLogger("fastseq.train")
_CHECKPOINT = re.compile(r"\.?checkpoint-\d+(\.tmp|\.old|\.abandoned(-\d+)?)?")
_PREDICTIONS = re.compile(r"eval_predictions-\d+\.jsonl")


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed by this run; the message says why and what to do."""


# ---- the output directory ----------------------------------------------------------------------


def _run_files(out: Path) -> list[Path]:
    return [
        p
        for p in out.iterdir()
        if p.name in _RUN_FILES or any(pattern.fullmatch(p.name) for pattern in (_CHECKPOINT, _PREDICTIONS, SHARD_RE))
    ]


def prepare_output_dir(args: TrainArgs) -> tuple[Path, DirectoryLock]:
    """Create the output directory (rank 0), lock it for this run, and check that this run may write
    there (nothing is removed yet: `clear_output_dir`); returns it and its lock (released by the
    caller when the run ends)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file; pass a directory")
    if out.is_symlink() and not out.exists():
        raise ValueError(f"--output-dir {out} is a link to {os.readlink(out)}, which does not exist; create that "
                         "directory, or pass another --output-dir")  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"--output-dir {out} is not writable ({err.strerror}); choose a directory you can write"
        ) from err
    lock = DirectoryLock.acquire(out)
    try:
        _check_output_dir(args, out)
    except BaseException:
        lock.release()
        raise
    return out, lock


def _check_output_dir(args: TrainArgs, out: Path) -> None:
    if args.continues_in_output_dir:
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    if entries and not args.overwrite:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise ValueError(
            f"--output-dir {out} already holds files ({shown}); pass --resume to continue that run, --overwrite "
            "to replace it, or choose an empty directory"
        )
    if entries:  # --overwrite: what it would remove under a checkpoint's name must be a run's checkpoint
        for path in _run_files(out):
            if _CHECKPOINT.fullmatch(path.name) and not path.name.startswith(".") and not _is_checkpoint(path):
                raise ValueError(
                    f"--output-dir {out} holds {path.name}, which is not a checkpoint of a run (no {STATE_FILE} of "
                    "fastseq's) and which --overwrite would remove; move it out of --output-dir, or choose another "
                    "directory"
                )


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint of `fastseq train`: its trainer_state.json records fastseq's format
    (another trainer writes a file of that name too)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "format" in state


def clear_output_dir(args: TrainArgs, out: Path) -> None:
    """`--overwrite`: remove the files an earlier run wrote in `out` (and nothing else). Called once
    every check that can refuse the run has passed (data, held-out data, model, checkpoint), just
    before the run writes its first file."""
    if args.continues_in_output_dir:
        return
    for path in _run_files(out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_prediction_settings(directory: Path, args: TrainArgs) -> None:
    """What `fastseq generate` needs to predict as the run evaluated, in a model directory the run wrote
    (after its model and tokenizer): the source prefix and the max source and target lengths in
    `prediction_config.json`; evaluation's `num_beams` and `max_new_tokens` in generation_config.json,
    where `transformers`' `generate` reads them; the max source length as tokenizer_config.json's
    `model_max_length`, what a `transformers` tokenizer cuts to with `truncation=True`."""
    write_json(directory / PREDICTION_CONFIG, {"source_prefix": args.source_prefix,
               "max_source_length": args.max_source_length, "max_target_length": args.max_target_length})  # fmt: skip
    updates = {"generation_config.json": {"num_beams": args.num_beams, "max_new_tokens": args.eval_max_new_tokens},
               "tokenizer_config.json": {"model_max_length": args.max_source_length}}  # fmt: skip
    for name, values in updates.items():
        if (directory / name).is_file():
            write_json(directory / name, {**read_json_file(directory / name), **values})


# ---- the identity of a run ---------------------------------------------------------------------


def _tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except OSError as err:
            err.add_note(f"the run's identity fingerprints the tokenizer's files, written to {tmp} (TMPDIR) for it: "
                         "raise the file-size limit (ulimit -f) or free space there, or set TMPDIR to another "
                         "directory")  # fmt: skip
            raise
        for file in sorted(Path(tmp).iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def _data_fingerprint(path: str) -> str:
    """The training data's fingerprint: a file's or a directory's whole contents; a pipe is read
    once, by the run, so it cannot be fingerprinted (reading it here would consume it)."""
    if not (Path(path).is_file() or Path(path).is_dir()):
        return "a pipe, not fingerprinted"
    return "sha256:" + fingerprint(path)


def run_identity(args: TrainArgs, model_config, tokenizer: Tokenizer, data_path: str | None = None) -> dict:
    """What makes a checkpoint this run's: the model, the tokenizer, the data (`data_path`: the
    training file, pipe or `datasets` directory; None: the synthetic task) and how it is read."""
    data = {
        "train": "synthetic" if data_path is None else _data_fingerprint(data_path),
        "task": args.task,
        "fields": [args.source_field, args.target_field],
        "seed": args.seed,
        "batch": [args.batch_size, args.max_tokens, args.buffer_size],
        "max_lengths": [args.max_source_length, args.max_target_length],
    }
    if args.source_prefix:
        data["prefix"] = args.source_prefix
    if args.pack:
        data["pack"] = True
    config = json.loads(json.dumps(model_config.to_hf_dict(), sort_keys=True))
    identity = {"model": config, "tokenizer": _tokenizer_fingerprint(tokenizer), "data": data}
    if args.lora is not None:  # the checkpoints hold the adapters only: the frozen base is part of the run
        from fastseq.checkpoint import weight_files

        base = {file.name: "sha256:" + fingerprint(file) for file in weight_files(args.model)}
        identity["lora"] = {**args.lora.record(), "base": base}
    return identity


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


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The `checkpoint-STEP` directories of `output_dir`, oldest first."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if match and p.is_dir():
            found.append((int(match[1]), p))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for _, p in _checkpoints(output_dir) if (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def earlier_checkpoint(path: Path) -> Path | None:
    """The newest checkpoint beside `path` from an earlier step, with its trainer state."""
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    step = int(match[1]) if match else None
    found = [p for s, p in _checkpoints(path.parent) if (step is None or s < step) and (p / STATE_FILE).is_file()]
    return found[-1] if found else None


def instead(path: Path) -> str:
    """What to resume from when checkpoint `path` cannot be resumed."""
    earlier = earlier_checkpoint(path)
    if earlier is None:
        return "no earlier checkpoint is left beside it: start a fresh run"
    return f"resume from the checkpoint before it: --resume {earlier}"


def find_checkpoint(args: TrainArgs) -> Path:
    out = Path(args.output_dir)
    if args.resume != "latest":
        path = Path(args.resume)
    else:
        found = _checkpoints(out)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint to resume from in {out}; run without --resume to start")
        path = found[-1][1]
        if not (path / STATE_FILE).is_file():  # not skipped: the run would go on from an older one, then replace it
            older = latest_checkpoint(out)
            hint = f"resume from {older.name} with --resume {older}" if older else "start a fresh run elsewhere"
            raise ResumeError(
                f"--resume: {path}, the latest checkpoint in {out}, has no {STATE_FILE} (it is incomplete or not "
                f"written by `fastseq train`); move it out of {out}, or {hint}"
            )
    if not (path / STATE_FILE).is_file():
        inside = latest_checkpoint(path)  # a run's output directory given for one of its checkpoints
        hint = f"; it is a run's output directory: pass --resume {inside} (its latest checkpoint)" if inside else ""
        raise FileNotFoundError(
            f"--resume: {path} has no {STATE_FILE}, so it is not a checkpoint of `fastseq train`{hint}"
        )
    return path


def write_state(directory: Path, state: dict) -> None:
    (directory / STATE_FILE).write_text(json.dumps({"format": FORMAT, **state}, indent=1, allow_nan=False) + "\n")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


# What each field of trainer_state.json must be: (check, what it must be). Optional fields are
# those older checkpoints of the same format do not have.
_FIELDS = {
    "step": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "run": (lambda v: isinstance(v, dict), "an object (the run's identity)"),
    "data": (lambda v: isinstance(v, dict), "an object (the data position)"),
    "engine": (lambda v: isinstance(v, dict), "an object (the engine's state)"),
    "world_size": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
}
_OPTIONAL = {
    "args": (lambda v: isinstance(v, dict), "an object (the run's options)"),
    "engine_kind": (lambda v: isinstance(v, str), "a string"),
    "optimizer": (
        lambda v: isinstance(v, dict) and isinstance(v.get("name"), str) and (v.get("lr") is None or _is_rate(v["lr"]))
        and _is_rate(v.get("weight_decay")),
        'an object {"name": ..., "lr": a rate >= 0 or null, "weight_decay": a rate >= 0}',
    ),
}  # fmt: skip


def read_state(path: Path) -> dict:
    """`path/trainer_state.json`, every field checked (types and ranges); an error names the file,
    the field and the checkpoint to resume from instead."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested beyond reason
        raise ResumeError(f"--resume: {file} is truncated or corrupted ({err}); {instead(path)}") from err
    if not isinstance(state, dict):
        raise ResumeError(f"--resume: {file} holds a JSON {type(state).__name__}, not an object; {instead(path)}")
    if state.get("format") != FORMAT:
        raise ResumeError(f"--resume: {path} was written in another checkpoint format; start a fresh run")
    for name, (check, meaning) in {**_FIELDS, **_OPTIONAL}.items():
        if name not in state and name in _OPTIONAL:
            continue
        if name not in state or not check(state[name]):
            found = "missing" if name not in state else f"{state[name]!r}"[:60]
            raise ResumeError(f"--resume: {file}: {name} is {found}, not {meaning}; the file was edited or damaged: "
                              f"{instead(path)}")  # fmt: skip
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if match and int(match[1]) != state["step"]:
        raise ResumeError(f"--resume: {file} records step {state['step']} in {path.name}; the file was edited or "
                          f"moved: {instead(path)}")  # fmt: skip
    return state


def engine_record(args: TrainArgs) -> dict:
    """The optimizer settings a checkpoint records, to check them on resume."""
    return {"name": args.optimizer, "lr": args.learning_rate(), "weight_decay": args.weight_decay}


def keep_global_batch(args: TrainArgs, data_parallel: int) -> str | None:
    """Before a ZeRO run on `data_parallel` ranks resumes a checkpoint written on another number:
    set --grad-accum so that a step takes the checkpoint's examples (micro-batch x accumulation x
    ranks); the data then continues from the same global example. Returns the line that says so,
    if --grad-accum changed. Nothing when the checkpoint cannot be read here (the resume says why,
    on every rank alike)."""
    try:
        path = find_checkpoint(args)
        state = read_state(path)
    except (OSError, ValueError):
        return None
    recorded, ranks = state.get("args") or {}, state["world_size"]
    if ranks == data_parallel or not _is_int(recorded.get("grad_accum")):
        return None
    examples = recorded["grad_accum"] * ranks
    if examples % data_parallel:
        raise ResumeError(f"--resume: {path} took {recorded['grad_accum']} micro-batches x {ranks} ranks a step, "
                          f"which {data_parallel} ranks cannot divide; resume on a number of ranks dividing "
                          f"{examples}")  # fmt: skip
    if args.grad_accum == examples // data_parallel:
        return None
    args.grad_accum = examples // data_parallel
    return (f"--resume: {path} ran {_ranks(ranks)} x --grad-accum {recorded['grad_accum']}; on {_ranks(data_parallel)} "
            f"--grad-accum {args.grad_accum} keeps its {examples} micro-batches a step")  # fmt: skip


def _ranks(count: int) -> str:
    return f"{count} rank{'s' * (count != 1)}"


def check_engine(path: Path, state: dict, engine, args: TrainArgs) -> None:
    """Refuse a checkpoint written by another engine or another number of ranks (its files and the
    data position depend on both), unless the engine re-partitions it (ZeRO)."""
    kind, world = engine.kind, engine.world
    if engine.repartitions(path, state):
        return
    recorded_world, recorded_kind = state["world_size"], state.get("engine_kind")
    if recorded_kind is None:  # older checkpoints: one process keeps its optimizer's state in trainer_state.json
        recorded_kind = "one process" if state["engine"] else "DeepSpeed"
    same_kind = recorded_kind == kind or (recorded_kind == "DeepSpeed" and kind.startswith("DeepSpeed"))
    if same_kind and recorded_world == world:
        return
    theirs = f"{recorded_kind} on {recorded_world} rank{'s' * (recorded_world != 1)}"
    ours = f"{kind} on {world} rank{'s' * (world != 1)}"
    config = (state.get("args") or {}).get("deepspeed")
    if recorded_kind.startswith("DeepSpeed") and not args.deepspeed:
        how = (f"resume it under the `deepspeed` launcher (--num_gpus {recorded_world}) with --deepspeed "
               f"{config or 'and the config it was written with'}")  # fmt: skip
    elif recorded_kind == "one process":
        how = "resume it without --deepspeed in one process"
    else:
        how = f"resume it with {recorded_world} ranks and --deepspeed {config or 'and the config it was written with'}"
    raise ResumeError(f"--resume: {path} was written by {theirs}, and this run is {ours}; {how}, or convert its "
                      "model and start a fresh run from it")  # fmt: skip


def check_rates(path: Path, state: dict, args: TrainArgs) -> tuple[float | None, float] | None:
    """The checkpoint's optimizer against this run's options: another optimizer (or Adafactor's
    relative step against a fixed rate) is refused, since its state means something else; another
    --lr or --weight-decay is what this run asks for (after a diverging run, a lower --lr is the
    fix): returned, with a line, for the engine to apply. None when nothing changes."""
    recorded = state.get("optimizer")
    if recorded is None:  # older checkpoints: from the options they recorded
        options = state.get("args") or {}
        recorded = {"name": options.get("optimizer", args.optimizer), "lr": options.get("lr", args.lr),
                    "weight_decay": options.get("weight_decay", args.weight_decay)}  # fmt: skip
    ours = engine_record(args)
    if recorded["name"] != ours["name"]:
        raise ResumeError(
            f"--resume: {path} was trained with --optimizer {recorded['name']} and this run asks for "
            f"--optimizer {ours['name']}; an optimizer's state does not carry over to another: resume with "
            f"--optimizer {recorded['name']}, or start a fresh run from its model"
        )
    if (recorded["lr"] is None) != (ours["lr"] is None):
        theirs = "its relative step size (no --lr)" if recorded["lr"] is None else f"a fixed --lr {recorded['lr']}"
        asked = "its relative step size (no --lr)" if ours["lr"] is None else f"a fixed --lr {ours['lr']}"
        keep = "without --lr" if recorded["lr"] is None else f"with --lr {recorded['lr']}"
        raise ResumeError(f"--resume: {path}'s Adafactor steps with {theirs} and this run asks for {asked}; resume "
                          f"{keep}, or start a fresh run from its model")  # fmt: skip
    if (recorded["lr"], recorded["weight_decay"]) == (ours["lr"], ours["weight_decay"]):
        return None
    for flag, old, new in (("--lr", recorded["lr"], ours["lr"]), ("--weight-decay", recorded["weight_decay"],
                                                                   ours["weight_decay"])):  # fmt: skip
        if old != new:
            log.warning("--resume: %s %s replaces the checkpoint's %s from step %d on", flag, new, old,
                        state["step"] + 1)  # fmt: skip
    return ours["lr"], ours["weight_decay"]


def args_record(args: TrainArgs) -> dict:
    return {k: v for k, v in dataclasses.asdict(args).items() if not (isinstance(v, float) and not math.isfinite(v))}


def rng_states() -> dict[str, torch.Tensor]:
    """This process's RNG states (CPU, and every CUDA device's)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def save_rng(directory: Path, rank: int, states: dict[str, torch.Tensor] | None = None) -> None:
    """`rng-RANK.safetensors`: `states` (default: the RNG states now)."""
    save_safetensors(states if states is not None else rng_states(), directory / rng_file(rank))


def check_rank_files(path: Path, state: dict, engine) -> None:
    """Every rank finds the files it reads in checkpoint `path` (its RNG states, where the checkpoint
    had this rank, and the engine's own partitions): a run on several nodes whose output directories
    are each node's own disk has each rank's files on its node only. Refused on every rank alike, in
    one line."""
    names = [rng_file(engine.rank)] if engine.rank < state["world_size"] else []
    names += engine.rank_files(path, state)
    mine = [name for name in names if not (path / name).is_file()]
    flags = [0.0] * engine.world
    flags[engine.rank] = float(bool(mine))
    lacking = [rank for rank, flag in enumerate(engine.sum_over_ranks(flags)) if flag]
    if lacking:
        example = f" (rank {engine.rank} lacks {', '.join(mine)})" if mine else ""
        raise ResumeError(
            f"--resume: {path} does not hold the files of rank(s) {', '.join(map(str, lacking))}{example}: every rank "
            "reads its own; give the nodes an --output-dir they share, or copy each node's "
            f"{path.name} into one directory on every node and resume from it"
        )


def load_rng(directory: Path, rank: int) -> None:
    """This rank's RNG states, where the checkpoint had this rank (a run resumed on more ranks starts
    the others' from the seed: only dropout draws from them)."""
    file = directory / rng_file(rank)
    if not file.is_file() and rank > 0:
        return
    if not file.is_file():
        raise ResumeError(f"--resume: {file} is missing: the checkpoint is incomplete; {instead(directory)}")
    tensors = read_tensors(file)
    if not isinstance(tensors.get("torch"), torch.Tensor) or tensors["torch"].dtype != torch.uint8:
        raise ResumeError(f"--resume: {file} holds no RNG state; {instead(directory)}")
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda/"))]
    try:
        torch.set_rng_state(tensors["torch"])
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except RuntimeError as err:  # a state of another size: torch says which
        raise ResumeError(f"--resume: {file} holds no RNG state of this torch ({err}); {instead(directory)}") from None


def check_optimizer_state(file: Path, tensors: dict[str, torch.Tensor], params: list[torch.Tensor]) -> None:
    """Each `optimizer/INDEX/NAME` tensor of `file` belongs to parameter INDEX and has the shape of one
    of its moments: the parameter's (AdamW, unfactored Adafactor), a factored row or column
    (Adafactor), or a scalar; else the first step would fail on the mismatch."""
    for key, value in tensors.items():
        _, index, _ = key.split("/", 2)
        if not index.isdigit() or int(index) >= len(params):
            raise ResumeError(f"--resume: {file}: {key} names no parameter of this model (it has {len(params)}); "
                              f"the file was edited or damaged: {instead(file.parent)}")  # fmt: skip
        shape = tuple(params[int(index)].shape)
        if tuple(value.shape) not in {(), shape, shape[:-1], shape[:-2] + shape[-1:]}:
            raise ResumeError(f"--resume: {file}: {key} has shape {tuple(value.shape)}, which fits no moment of its "
                              f"parameter of shape {shape}; the file was edited or damaged: "
                              f"{instead(file.parent)}")  # fmt: skip


def check_scheduler_state(file: Path, scheduler: dict) -> None:
    """The learning-rate schedule's counters whole numbers and its rates finite numbers."""
    counters = ("last_epoch", "_step_count")
    rates = ("base_lrs", "_last_lr")
    for name in counters:
        if name in scheduler and not (_is_int(scheduler[name]) and scheduler[name] >= -1):
            bad = f"{scheduler[name]!r}"[:60]
            raise ResumeError(f"--resume: {file}: scheduler.{name} is {bad}, not a whole number; the file was edited "
                              f"or damaged: {instead(file.parent)}")  # fmt: skip
    for name in rates:
        value = scheduler.get(name, [])
        if not isinstance(value, list) or not all(_is_rate(v) for v in value):
            raise ResumeError(f"--resume: {file}: scheduler.{name} is {value!r:.60}, not a list of rates >= 0; the "
                              f"file was edited or damaged: {instead(file.parent)}")  # fmt: skip


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint, with an error that says what to do when it is missing or
    damaged (and which checkpoint to resume from instead)."""
    if not file.is_file():
        raise ResumeError(f"--resume: {file} is missing: the checkpoint is incomplete; {instead(file.parent)}")
    try:
        return load_file(str(file))
    except OSError as err:
        raise ResumeError(f"--resume: {file} cannot be read ({err.strerror}); check its permissions") from err
    except Exception as err:  # safetensors has its own error types
        raise ResumeError(f"--resume: {file} is truncated or corrupted ({err}); {instead(file.parent)}") from err
