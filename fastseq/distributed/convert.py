"""`fastseq convert --from-deepspeed CKPT --to DIR`: a Hugging Face model directory (sharded
safetensors, config.json, tokenizer files) from a DeepSpeed checkpoint written by `fastseq train
--deepspeed`: ZeRO stages 1-3 (the fp32 master weights, gathered from every rank's partition) or
pipeline stages (one file per layer).

DeepSpeed writes its checkpoints with pickle. They are read here with `torch.load(weights_only=True)`
and an allowlist of DeepSpeed's own plain records (its ZeRO stage enum, loss-scaler state and
fragment addresses), so
no checkpoint can run code when it is converted.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from fastseq.checkpoint import CheckpointError, match_state, read_model_config, refused_load
from fastseq.files import SAFE_INDEX, SAFE_WEIGHTS, copy_file

# What a model directory holds beside its weights and config.json, copied as they are so that the
# converted directory generates and fine-tunes like its source.
SIDE_FILES = ("spiece.model", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json",
              "prediction_config.json")  # fmt: skip


def _allowed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def safe_torch_load():
    """Every torch.load inside (DeepSpeed's readers included) runs with weights_only=True."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_allowed_globals()):
                return original(*args, **kwargs)
        except Exception as err:
            raise CheckpointError(
                f"{args[0] if args else kwargs.get('f')}: not readable with torch.load(weights_only=True) "
                f"({refused_load(err)}); "
                "fastseq never unpickles arbitrary objects"
            ) from err

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files, generation_config.json and prediction_config.json of `source` into `dest`;
    their names."""
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file():
            copy_file(source / name, dest / name)
            copied.append(name)
    return copied


def _layer_files(ckpt: Path) -> list[tuple[int, Path]]:
    found = []
    for path in ckpt.glob("layer_*-model_states.pt"):
        match = re.fullmatch(r"layer_(\d+)-model_states\.pt", path.name)
        if match:
            found.append((int(match[1]), path))
    return sorted(found)


def deepspeed_state_dict(ckpt: Path, model_config) -> dict[str, torch.Tensor]:
    """The fp32 state dict (Hugging Face names) of a fastseq DeepSpeed checkpoint directory."""
    layers = _layer_files(ckpt)
    with safe_torch_load():
        if layers:
            from .stages import state_dict_from_layers

            return state_dict_from_layers(model_config, {i: torch.load(p, map_location="cpu") for i, p in layers})
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k.removeprefix("module."): v for k, v in state.items()}


def convert(ckpt: str | Path, dest: str | Path, *, max_shard_size: str | int = "5GB", dtype=None) -> Path:
    ckpt, dest = Path(ckpt), Path(dest)  # a run writes its model beside its checkpoints: OUTPUT holds CKPT
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--from-deepspeed {ckpt}: not a directory (pass OUTPUT/checkpoint-STEP)")
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt} has no config.json: pass a checkpoint directory written by `fastseq train --deepspeed` "
            "(OUTPUT/checkpoint-STEP)"
        )
    read_model_config(ckpt)  # its model type and every field first: what the states are read into
    # ZeRO writes mp_rank_*_model_states.pt, the pipeline stages layer_*-model_states.pt.
    if not any(ckpt.glob("*model_states.pt")):
        if (ckpt / SAFE_WEIGHTS).is_file() or (ckpt / SAFE_INDEX).is_file():
            raise ValueError(
                f"--from-deepspeed {ckpt} holds a Hugging Face model and no DeepSpeed states: it is a checkpoint of "
                f"a run without DeepSpeed; convert it with `fastseq convert {ckpt} DST`"
            )
        raise FileNotFoundError(
            f"--from-deepspeed {ckpt} holds no DeepSpeed model states (*model_states.pt): pass a checkpoint "
            "directory written by `fastseq train --deepspeed` (OUTPUT/checkpoint-STEP)"
        )
    model, copied = write_model(ckpt, dest, max_shard_size=max_shard_size, dtype=dtype)
    meta = ckpt / "trainer_state.json"
    step = json.loads(meta.read_text()).get("step") if meta.is_file() else None
    print(f"fastseq convert: {ckpt} (step {step}) -> {dest} ({model.num_parameters():,} parameters; "
          f"{_side_note(copied)})")  # fmt: skip
    return dest


def write_model(ckpt: Path, dest: Path, *, max_shard_size: str | int = "5GB", dtype=None):
    """The model of DeepSpeed checkpoint `ckpt` as a Hugging Face directory at `dest` (its weights
    in `dtype`, fp32 by default), with the checkpoint's tokenizer files, generation_config.json and
    prediction_config.json; returns the model and the names of the files copied."""
    model_config, model_cls = read_model_config(ckpt)  # every field checked, the model type too
    state = deepspeed_state_dict(ckpt, model_config)
    with torch.device("meta"):
        model = model_cls(model_config)
    state = match_state(model, state, ckpt)
    target = dtype or torch.float32
    model.load_state_dict({k: v.to(target) if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)  # fmt: skip
    model.tie_weights()
    model.save_pretrained(dest, max_shard_size=max_shard_size)
    return model, copy_side_files(ckpt, dest)


def _side_note(copied: list[str]) -> str:
    return f"copied {', '.join(copied)}" if copied else "no tokenizer files to copy: pass --tokenizer DIR to generate"
