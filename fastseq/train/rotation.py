"""Checkpoint rotation: the best checkpoint by `--metric-for-best-model` (keep-best) and the oldest
ones removed past `--save-total-limit`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .args import TrainArgs

log = logging.getLogger("fastseq.train")


def prune_checkpoints(out: Path, limit: int, keep: set[Path]) -> list[Path]:
    """Remove the oldest `checkpoint-STEP` directories of `out` so that at most `limit` remain, never
    one of `keep` nor the newest (HF's `save_total_limit`: with a limit of 1 and a best checkpoint
    that is not the newest, both stay). Each goes under a temporary name first, so a crash never
    leaves a half-removed checkpoint under its real name. Returns the removed ones."""
    found = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]))  # fmt: skip
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


def rotate(out: Path, args: TrainArgs, evaluated: dict[int, dict]) -> tuple[Path, float] | None:
    """After a checkpoint is published: the best checkpoint of `out` by --metric-for-best-model among
    the evaluated ones (`evaluated`: step -> scores) and its score (None without that option), then
    --save-total-limit applied, never to the best."""
    best = None
    if args.best_model_key is not None:
        best = best_checkpoint(out, evaluated, args.best_model_key, args.best_is_greater)
    if args.save_total_limit is not None:
        keep = {best[0]} if best is not None else set()
        for removed in prune_checkpoints(out, args.save_total_limit, keep):
            log.info("removed %s (--save-total-limit %d)", removed, args.save_total_limit)
    return best
