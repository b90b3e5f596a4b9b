"""Files written so that a crash never leaves a half-written one under its real name, and the
safetensors half of a Hugging Face model directory. Nothing here knows the models: a model is
anything with `state_dict()`, `tied_parameters()`, `hf_config()`."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def parse_size(size: int | str) -> int:
    """Bytes from 5GB, 500MB, 2GiB or an int."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; write it like 5GB, 500MB or 2GiB")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary name beside `target`, synced, then renamed onto it."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(target: Path, data: dict) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def atomic_directory(target: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a temporary directory beside `target`, which then replaces `target`."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    publish_directory(tmp, target)


def publish_directory(tmp: Path, target: Path) -> None:
    """Rename a finished temporary directory onto `target` (an older `target` is removed after)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_pretrained(model, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors weights that `transformers` and fastseq both load.

    Tied aliases are not stored (as Hugging Face does). Weights above
    `max_shard_size` are split into `model-0000k-of-0000n.safetensors` with an index.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    aliases = model.tied_parameters()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in aliases}
    shards = _shards(tensors, parse_size(max_shard_size))
    metadata = {"format": "pt"}
    written: set[str] = set()
    if len(shards) == 1:
        atomic_write(path / SAFE_WEIGHTS, lambda tmp: save_file(shards[0], str(tmp), metadata=metadata))
        written.add(SAFE_WEIGHTS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=metadata))
            weight_map.update(dict.fromkeys(shard, name))
            written.add(name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(path / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(SAFE_INDEX)
    write_json(path / "config.json", model.hf_config())
    # Weights of an earlier save in another layout would shadow or contradict this one.
    for stale in path.iterdir():
        if stale.name not in written and (stale.name in (SAFE_WEIGHTS, SAFE_INDEX) or SHARD_RE.fullmatch(stale.name)):
            stale.unlink()
