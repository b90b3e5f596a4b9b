"""Hugging Face model directories: read them into native models, write native models back.

A directory holds `config.json` and the weights as `model.safetensors`, or as
shards listed by `model.safetensors.index.json`. Legacy `pytorch_model.bin`
files are read only through `torch.load(weights_only=True)`, which refuses
arbitrary pickled objects. Every file is written to a temporary name in the
same directory and renamed into place, so an interrupted save never leaves a
half-written file under a real name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .files import SAFE_INDEX, SAFE_WEIGHTS, save_pretrained, utf8_problem
from .hub import model_directory
from .models import FAMILIES, PreTrainedModel

log = logging.getLogger(__name__)

BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
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
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise CheckpointError(f"{config_file} is not valid JSON ({err}); re-save the model") from err
    except OSError as err:
        raise _unreadable(config_file, err) from err
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{config_file} holds a JSON {type(data).__name__}, not an object of settings; re-save the model"
        )
    return data


def _unreadable(file: Path, err: OSError) -> CheckpointError:
    """An OS error reading a file that exists: say which (permissions, a directory, ...), not "corrupted"."""
    reason = err.strerror or type(err).__name__
    fix = "make it readable (chmod u+r)" if isinstance(err, PermissionError) else "check the file"
    return CheckpointError(f"{file} exists but cannot be read ({reason}); {fix}")


def _readable(files: list[Path]) -> list[Path]:
    """`files`, each checked to open: permissions and the like first, since safetensors reports
    every failure alike."""
    for file in files:
        try:
            with open(file, "rb"):
                pass
        except OSError as err:
            raise _unreadable(file, err) from err
    return files


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator:
    """`safe_open` of a weights file on the CPU, for reading tensors inside the block. A file that is
    not readable safetensors (truncated, a garbage header), found on opening it or reading a tensor,
    is a CheckpointError naming it."""
    _readable([file])
    if problem := utf8_problem(file):  # an intact file that safetensors cannot open by this name
        raise CheckpointError(f"{problem}; rename the directory (or copy the model to a UTF-8 path)")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}); it is truncated or corrupted: "
            "re-download or re-save it"
        ) from err


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    with open_safetensors(file) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def refused_load(err: BaseException) -> str:
    """What `torch.load(weights_only=True)` refused, without torch's advice to load the file again with
    `weights_only=False` (which runs whatever the file holds): its unpickler's own reason."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1]
        for advice in ("Check the documentation of torch.load", ". Please use", "Please use"):  # not fastseq's to take
            reason = reason.split(advice)[0]
        return "refused by the weights-only unpickler: " + " ".join(reason.split())
    return " ".join(text.splitlines()[0].split()) if text else type(err).__name__


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    _readable([file])
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{file} could not be read with torch.load(weights_only=True) ({refused_load(err)}); fastseq never "
            "unpickles arbitrary objects: convert the file to safetensors with a trusted tool first"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file} does not hold a flat dict of tensors; it is not a model state dict")
    return state


def _weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}")
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{index_file} is not a valid shard index (no weight_map): {err}") from err
    except OSError as err:
        raise _unreadable(index_file, err) from err
    return weight_map


def shard_files(index_file: Path) -> list[Path]:
    """The shards an index lists, each a file of the index's own directory: a name with a directory
    part, `..` or an absolute path is refused, so loading never reads outside the model directory."""
    return _shard_paths(index_file, _weight_map(index_file))


def _shard_paths(index_file: Path, weight_map: dict[str, str]) -> list[Path]:
    shards = sorted(set(map(str, weight_map.values())))
    for shard in shards:
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{index_file} lists shard {shard!r}, which is not a file name inside {index_file.parent}; "
                "fastseq reads only the model directory's own files: fix the index's weight_map"
            )
    missing = [s for s in shards if not (index_file.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index_file} lists shard {missing[0]}, which is missing from {index_file.parent}")
    return [index_file.parent / s for s in shards]


def _read_index(index_file: Path, reader: Callable[[Path], dict]) -> dict[str, torch.Tensor]:
    weight_map = _weight_map(index_file)
    state: dict[str, torch.Tensor] = {}
    for shard_file in _shard_paths(index_file, weight_map):
        state.update(reader(shard_file))
    listed = set(weight_map)
    if listed != set(state):
        missing = sorted(listed - set(state))[:10]
        raise CheckpointError(f"{index_file} lists keys that no shard holds: {missing}")
    return state


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory (one file or the shards of its index), for readers
    that stream tensors one at a time (ZeRO-3 partitions, pipeline stages)."""
    path = Path(path)
    if (path / SAFE_WEIGHTS).is_file():
        return _readable([path / SAFE_WEIGHTS])
    if (path / SAFE_INDEX).is_file():
        return _readable(shard_files(path / SAFE_INDEX))
    raise FileNotFoundError(
        f"{path} holds no safetensors weights ({SAFE_WEIGHTS} or {SAFE_INDEX}); re-save the model with "
        "`fastseq convert SRC DST`"
    )


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


_T5_FAMILY = ("t5", "mt5", "longt5")


def _embedding_keys(config) -> tuple[str, dict[str, str]]:
    """The shared embedding's key and {stack: its token-embedding key} of a config's family."""
    prefix = "model." if config.model_type == "blenderbot-small" else ""
    return f"{prefix}shared.weight", {s: f"{prefix}{s}.embed_tokens.weight" for s in ("encoder", "decoder")}


_COMPARE_ROWS = 4096  # rows of two stored matrices compared at a time (mT5-xxl's embedding: 64 MiB a block)


def stored_embeddings(path: str | os.PathLike, config) -> tuple[set[str], Callable[[str, str], bool]]:
    """The embedding and head keys a directory stores, and whether two of them differ, compared a
    block of rows at a time from safetensors (stopping at the first difference): what `fit_embeddings`
    needs, without loading the model or a whole matrix."""
    shared, stacks = _embedding_keys(config)
    wanted = {shared, *stacks.values(), "lm_head.weight"}
    try:
        files = weight_files(path)
    except FileNotFoundError:  # legacy pickled weights: read them whole (weights_only)
        state = {k: v for k, v in read_state_dict(path).items() if k in wanted}
        return set(state), lambda a, b: not torch.equal(state[a], state[b])
    where: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as handle:
            where.update({key: file for key in handle.keys() if key in wanted})

    def differs(a: str, b: str) -> bool:
        with open_safetensors(where[a]) as ha, open_safetensors(where[b]) as hb:
            sa, sb = ha.get_slice(a), hb.get_slice(b)
            if sa.get_shape() != sb.get_shape() or sa.get_dtype() != sb.get_dtype():
                return True
            rows = sa.get_shape()[0] if sa.get_shape() else 0
            return any(not torch.equal(sa[r : r + _COMPARE_ROWS], sb[r : r + _COMPARE_ROWS])
                       for r in range(0, rows, _COMPARE_ROWS))  # fmt: skip

    return set(where), differs


def fit_embeddings(config, stored: set[str], differs: Callable[[str, str], bool]) -> None:
    """Set the config's tying to what a checkpoint stores (`stored`: its keys, at least the embedding
    and head ones; `differs(a, b)`: whether two stored tensors differ), as `transformers` 5 loads it: a
    stack's token embedding or an LM head stored with values other than the shared embedding's is a
    matrix of its own, never aliased to it; one that is absent or equal is tied. A T5-family head is
    tied whenever the checkpoint has none, whatever `tie_word_embeddings` says (transformers 5 forces
    the tie for that family)."""
    shared_key, stacks = _embedding_keys(config)
    has_shared, has_head = shared_key in stored, "lm_head.weight" in stored

    def distinct(key: str) -> bool:
        return key in stored and has_shared and differs(key, shared_key)

    config.separate_embeddings = [stack for stack, key in stacks.items() if distinct(key)]
    if distinct("lm_head.weight"):
        config.tie_word_embeddings = False
    elif config.model_type in _T5_FAMILY and (not has_head or has_shared):
        config.tie_word_embeddings = True
    separate = [f"{stack}.embed_tokens" for stack in config.separate_embeddings]
    separate += [] if config.tie_word_embeddings else ["lm_head"]
    if config.separate_embeddings:  # an untied LM head alone is every T5 v1.1's: nothing to say
        log.info("matrices of their own (not tied to %s): %s", shared_key, ", ".join(separate))


def read_model_config(path: str | os.PathLike, architecture: str | None = None):
    """The config object and model class of a model directory, every field checked: an error names
    config.json, the field, its value and the allowed range."""
    path = Path(path)
    data = read_config(path)
    config_cls, model_cls = _model_class(data, path / "config.json", architecture)
    try:
        config = config_cls.from_hf_dict(data)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path / 'config.json'}: {err}; fix the file or use the model's own") from err
    return config, model_cls


def _model_class(data: dict, config_file: Path, architecture: str | None):
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        hint = "; UMT5 runs as a transformers model patched by fastseq.patch" if model_type == "umt5" else ""
        raise CheckpointError(
            f"model_type={model_type!r} in {config_file} is not supported; fastseq reads {sorted(FAMILIES)}{hint}"
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


def match_state(model: PreTrainedModel, state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Fill tied aliases, then check keys and shapes against the model; raise on any mismatch."""
    state = dict(state)
    for alias, source in model.tied_parameters().items():
        if alias in state and source in state and not torch.equal(state[alias], state[source]):
            raise CheckpointError(
                f"{where} stores {alias} with values other than {source}, but the model ties them; load it with "
                "fastseq.from_pretrained, which keeps such a matrix separate"
            )
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


def check_weights(state: dict[str, torch.Tensor], model: PreTrainedModel, where: Path) -> None:
    """Floating-point weights where the model has them, and every one finite (a NaN or infinity
    would only show as a NaN loss later): one tensor at a time, so the check costs one pass."""
    expected = model.state_dict()
    for key, value in state.items():
        if expected[key].is_floating_point() and not value.is_floating_point():
            raise CheckpointError(
                f"{where}: weight {key} is stored as {str(value.dtype).removeprefix('torch.')}; model weights are "
                "floating point (float32, bfloat16, float16): re-save the model from its floating-point weights"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"{where}: weight {key} holds {bad} NaN or infinite value(s); the model is damaged (saved by a run "
                "that diverged?): use an earlier checkpoint or the original model"
            )


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    architecture: str | None = None,
) -> PreTrainedModel:
    """Load a Hugging Face model directory (or a hub id, through `huggingface_hub`'s cache or a
    download) into the native model of its `model_type`.

    dtype: floating tensors are cast to it (default float32, the dtype to train in).
    device: where the parameters live (default CPU). architecture: a Hugging Face
    class name overriding config.json's `architectures` (e.g. "T5EncoderModel").
    The model is returned in eval mode, as Hugging Face does.
    """
    path = model_directory(path)
    config, model_cls = read_model_config(path, architecture)
    state = read_state_dict(path)
    fit_embeddings(config, set(state), lambda a, b: not torch.equal(state[a], state[b]))
    with torch.device("meta"):
        model = model_cls(config)
    state = match_state(model, state, path)
    check_weights(state, model, path)
    target = resolve_dtype(dtype)
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = {k: (v.to(dtype=target) if v.is_floating_point() else v).to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


__all__ = ["save_pretrained"]
