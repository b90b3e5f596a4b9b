"""Checkpoint rotation: the best checkpoint by `--metric-for-best-model` (keep-best), the oldest
ones removed past `--save-total-limit`, and the checkpoints of a branch that `--resume` left.

A run resumed from an earlier checkpoint of its output directory (`--resume OUT/checkpoint-2` where
`checkpoint-6` exists) starts another branch. At its first checkpoint, the other branch's
checkpoints (those past the one resumed) are renamed `checkpoint-STEP.abandoned`: nothing of them is
lost (nor replaced by this branch's checkpoint of the same step), and none of them is this run's
latest checkpoint for a later `--resume`, nor counted or removed by `--save-total-limit`.
`--overwrite` removes them with the rest of the old run; `--resume OUT/checkpoint-6.abandoned`
still continues that branch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .args import TrainArgs

log = logging.getLogger("fastseq.train")


ABANDONED = ".abandoned"


def _numbered(out: Path) -> list[Path]:
    """The `checkpoint-STEP` directories of `out`, oldest first."""
    found = (p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit())
    return sorted(found, key=lambda p: int(p.name[11:]))


def set_aside(out: Path, resumed: int) -> list[Path]:
    """Rename the checkpoints of `out` past step `resumed` (the branch a `--resume` left) to
    `checkpoint-STEP.abandoned` (`.abandoned-2` ... when that name is taken); returns the new names."""
    moved = []
    for path in _numbered(out):
        if int(path.name[11:]) <= resumed:
            continue
        target, n = path.with_name(path.name + ABANDONED), 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}{ABANDONED}-{n}")
        path.rename(target)
        log.warning("%s is of the branch that --resume left at step %d: kept as %s (not resumed by --resume "
                    "alone, not counted by --save-total-limit; --overwrite removes it)", path, resumed,
                    target.name)  # fmt: skip
        moved.append(target)
    return moved


def prune_checkpoints(out: Path, limit: int, keep: set[Path]) -> list[Path]:
    """Remove the oldest `checkpoint-STEP` directories of `out` so that at most `limit` remain, never
    one of `keep` nor the newest (HF's `save_total_limit`: with a limit of 1 and a best checkpoint
    that is not the newest, both stay). Each goes under a temporary name first, so a crash never
    leaves a half-removed checkpoint under its real name. Returns the removed ones."""
    found = _numbered(out)
    if not found:
        return []
    protected = {p.resolve() for p in keep | {found[-1]}}
    removable = [p for p in found if p.resolve() not in protected][: max(len(found) - limit, 0)]
    for path in removable:
        doomed = path.with_name(f".{path.name}.old")
        path.rename(doomed)
        shutil.rmtree(doomed)
    return removable


def best_checkpoint(out: Path, evaluated: dict[int, dict], key: str, greater: bool) -> tuple[Path, float] | None:
    """The checkpoint of `out` whose step's evaluation (`evaluated`: step -> scores) has the best
    `key`, and that score; the earliest of equal scores, as HF's Trainer keeps its first best."""
    sign = 1.0 if greater else -1.0
    candidates = []
    for step, scores in evaluated.items():
        path = out / f"checkpoint-{step}"
        if isinstance(scores.get(key), (int, float)) and path.is_dir():
            candidates.append((sign * scores[key], -step, path))
    if not candidates:
        return None
    value, _, path = max(candidates)
    return path, sign * value


def rotate(out: Path, args: TrainArgs, evaluated: dict[int, dict], current: Path) -> tuple[Path, float] | None:
    """After checkpoint `current` is published: the best checkpoint of `out` by --metric-for-best-model
    among the evaluated ones (`evaluated`: step -> scores) and its score (None without that option),
    then --save-total-limit applied, never to the best nor to `current`."""
    best = None
    if args.best_model_key is not None:
        best = best_checkpoint(out, evaluated, args.best_model_key, args.best_is_greater)
    if args.save_total_limit is not None:
        keep = {current} | ({best[0]} if best is not None else set())
        for removed in prune_checkpoints(out, args.save_total_limit, keep):
            log.info("removed %s (--save-total-limit %d)", removed, args.save_total_limit)
    return best
