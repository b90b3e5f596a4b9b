"""Hugging Face model directories: read them into native models, write native models back.

A directory holds `config.json` and the weights as `model.safetensors`, or as
shards listed by `model.safetensors.index.json`. Legacy `pytorch_model.bin`
files are read only through `torch.load(weights_only=True)`, which refuses
arbitrary pickled objects. Every file is written to a temporary name in the
same directory and renamed into place, so an interrupted save never leaves a
half-written file under a real name.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .models import FAMILIES, PreTrainedModel, architecture_name

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class CheckpointError(ValueError):
    """A model directory that cannot be loaded as it is; the message says why and what to do."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype or its name ("bf16", "float32", ...); None is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not understood; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; write it like 5GB, 500MB or 2GiB")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "B").lower()])


# ---------------------------------------------------------------- reading


def read_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of a model directory, with errors that say what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a directory; pass a Hugging Face model directory holding config.json and weights"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing; a model directory needs the config.json written by save_pretrained"
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err}); re-save the model") from err


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for every malformed file
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}); it is truncated or corrupted: "
            "re-download or re-save it"
        ) from err


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{file} could not be read with torch.load(weights_only=True) ({err}); fastseq never unpickles "
            "arbitrary objects: convert the file to safetensors with a trusted tool first"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors; it is not a model state dict")
    return state


def _read_index(index_file: Path, reader: Callable[[Path], dict]) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_file} is not a valid shard index (no weight_map): {err}") from err
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = index_file.parent / shard
        if not shard_file.is_file():
            raise CheckpointError(f"{index_file} lists shard {shard}, which is missing from {index_file.parent}")
        state.update(reader(shard_file))
    listed = set(weight_map)
    if listed != set(state):
        missing = sorted(listed - set(state))[:10]
        raise CheckpointError(f"{index_file} lists keys that no shard holds: {missing}")
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, on the CPU, as stored."""
    path = Path(path)
    if (path / SAFE_WEIGHTS).is_file():
        return _read_safetensors(path / SAFE_WEIGHTS)
    if (path / SAFE_INDEX).is_file():
        return _read_index(path / SAFE_INDEX, _read_safetensors)
    if (path / BIN_WEIGHTS).is_file():
        return _read_bin(path / BIN_WEIGHTS)
    if (path / BIN_INDEX).is_file():
        return _read_index(path / BIN_INDEX, _read_bin)
    raise FileNotFoundError(
        f"{path} holds no weights: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


def _model_class(data: dict, config_file: Path, architecture: str | None):
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"model_type={model_type!r} in {config_file} is not supported; fastseq reads {sorted(FAMILIES)}"
        )
    config_cls, classes, default = FAMILIES[model_type]
    name = architecture or (data.get("architectures") or [default])[0]
    if name in classes:
        return config_cls, classes[name]
    if architecture is not None:
        raise ValueError(f"architecture={architecture!r} is not one of {sorted(classes)}")
    # Other heads of the same family (T5Model, T5WithLMHeadModel, ...) load into the seq2seq or encoder model.
    fallback = [n for n in classes if n.endswith("EncoderModel") == name.endswith("EncoderModel")]
    return config_cls, classes[fallback[0] if fallback else default]


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _match_state(model: PreTrainedModel, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Fill tied aliases, then check keys and shapes against the model; raise on any mismatch."""
    state = dict(state)
    for alias, source in model.tied_parameters().items():
        if source not in state and alias in state:
            state[source] = state[alias]
        state.pop(alias, None)
        if source in state:
            state[alias] = state[source]
    expected = model.state_dict()
    ignored = model.ignored_checkpoint_keys
    unexpected = sorted(k for k in state if k not in expected and not any(fnmatch.fnmatch(k, p) for p in ignored))
    missing = sorted(k for k in expected if k not in state)
    problems = []
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if problems:
        raise CheckpointError(
            f"the weights in {where} do not fit {type(model).__name__} built from its config.json "
            f"({'; '.join(problems)}); check that config.json belongs to these weights"
        )
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"shape mismatch between the weights in {where} and its config.json: {_format_keys(mismatched, 10)}"
        )
    return {k: state[k] for k in expected}


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    architecture: str | None = None,
) -> PreTrainedModel:
    """Load a Hugging Face model directory into the native model of its `model_type`.

    dtype: floating tensors are cast to it (default float32, the dtype to train in).
    device: where the parameters live (default CPU). architecture: a Hugging Face
    class name overriding config.json's `architectures` (e.g. "T5EncoderModel").
    The model is returned in eval mode, as Hugging Face does.
    """
    path = Path(path)
    data = read_config(path)
    config_cls, model_cls = _model_class(data, path / "config.json", architecture)
    config = config_cls.from_hf_dict(data)
    state = read_state_dict(path)
    with torch.device("meta"):
        model = model_cls(config)
    head, tied_to = "lm_head.weight", model.tied_parameters().get("lm_head.weight")
    if tied_to and head in state and tied_to in state and not torch.equal(state[head], state[tied_to]):
        log.info("%s holds an lm_head distinct from the input embedding; loading it untied", path)
        config.tie_word_embeddings = False
        with torch.device("meta"):
            model = model_cls(config)
    state = _match_state(model, state, path)
    target = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = {k: (v.to(dtype=target) if v.is_floating_point() else v).to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------- writing


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


def _write_json(target: Path, data: dict) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


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


def save_pretrained(model: PreTrainedModel, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and safetensors weights that `transformers` and fastseq both load.

    Tied aliases are not stored (as Hugging Face does). Weights above
    `max_shard_size` are split into `model-0000k-of-0000n.safetensors` with an index.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    aliases = model.tied_parameters()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in aliases}
    shards = _shards(tensors, _parse_size(max_shard_size))
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
        _write_json(path / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.add(SAFE_INDEX)
    config = model.config.to_hf_dict()
    config["architectures"] = [architecture_name(model)]
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    config["dtype"] = str(floating[0]).removeprefix("torch.") if floating else "float32"
    _write_json(path / "config.json", config)
    # Weights of an earlier save in another layout would shadow or contradict this one.
    for stale in path.iterdir():
        if stale.name not in written and (stale.name in (SAFE_WEIGHTS, SAFE_INDEX) or _SHARD_RE.fullmatch(stale.name)):
            stale.unlink()
