"""LoRA through `peft`: low-rank adapters on a model's linear layers, trained while the base stays
frozen, and saved in peft's format (`adapter_config.json`, `adapter_model.safetensors`), which
`transformers` + `peft` load with `PeftModel.from_pretrained` onto the Hugging Face model.

The adapters are peft's own layers, put in place of the targeted `nn.Linear` modules of a native
model (whose module names are Hugging Face's): attention runs its fused kernel on their outputs.
The feed-forward block of a T5-family model runs fused (one kernel that reads its three weight
matrices) unless one of its layers carries an adapter; that block then runs layer by layer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_NAME = "default"  # the one adapter a fastseq model carries

# The linear layers a LoRA target may name, by model family. The others are read as plain tensors by
# fused kernels (the embeddings and the LM head by the fused loss, the bias tables by attention, the
# norms by rms_norm), so an adapter there would never run.
_T5 = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
TARGETS = {
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "longt5": _T5,
    "blenderbot-small": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
DEFAULT_TARGETS = ("q", "v")  # T5's usual targets (--lora-targets)
DEFAULT_DROPOUT = 0.05  # --lora-dropout's default


@dataclass(frozen=True)
class LoraSettings:
    r: int  # the adapters' rank
    alpha: float  # their scale is alpha / r
    dropout: float  # dropout on an adapter's input
    targets: tuple[str, ...]  # the names of the linear layers that get one ("q", "v")

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


def peft_module():
    try:
        import peft
    except ImportError:
        raise ValueError(
            'LoRA runs through the peft package, which is not installed; pip install "fastseq[finetune]"'
        ) from None
    return peft


def check_targets(model_type: str, targets: tuple[str, ...]) -> None:
    """Raises a one-line ValueError for a target the model family has no adapter-capable layer of."""
    allowed = TARGETS.get(model_type)
    if allowed is None:
        raise ValueError(f"LoRA is not available for model type {model_type!r}; it is for {', '.join(TARGETS)}")
    if not targets:
        raise ValueError(f"--lora-targets names no layer; pass some of {','.join(allowed)}")
    unknown = [t for t in targets if t not in allowed]
    if unknown:
        raise ValueError(
            f"--lora-targets {','.join(unknown)}: not a linear layer a {model_type} adapter can sit on; use some of "
            f"{','.join(allowed)} (embeddings, the LM head, bias tables and norms are read by fused kernels)"
        )


def _lora_config(settings: LoraSettings, base: str | None):
    peft = peft_module()
    return peft.LoraConfig(
        task_type="SEQ_2_SEQ_LM", r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.targets), base_model_name_or_path=base,
    )  # fmt: skip


def add_adapters(model: nn.Module, settings: LoraSettings, base: str | None, *, seed: int = 0):
    """Put adapters on `model`'s target layers, in place, and freeze everything else; returns the peft
    wrapper that saves them (`save_adapters`). `base` is what `adapter_config.json` names as the base
    model (`base_model_name_or_path`). The adapters' initial values depend on `seed` only: peft draws
    each A (kaiming-uniform) from the global generator, here seeded in a fork of it (B starts at zero),
    so one process and ZeRO-3 (whose partitioned build draws for the base) start from the same ones."""
    peft = peft_module()
    check_targets(model.config.model_type, settings.targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.PeftModel(model, _lora_config(settings, base), adapter_name=PEFT_NAME)


def save_adapters(wrapper, directory: Path) -> None:
    """`adapter_config.json` and `adapter_model.safetensors` in `directory`, each written atomically:
    peft's state dict (keys `base_model.model.<layer>.lora_A.weight`) and config, what
    `PeftModel.save_pretrained` writes (without its model card, so a run writes no README.md)."""
    from fastseq.files import atomic_write, save_safetensors

    peft = peft_module()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # No embedding layer is ever a target: peft would otherwise probe the base model (on the hub, too).
    state = peft.get_peft_model_state_dict(wrapper, adapter_name=PEFT_NAME, save_embedding_layers=False)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_safetensors(state, tmp, {"format": "pt"}))
    config = wrapper.peft_config[PEFT_NAME].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # peft keeps a set
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def adapter_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(directory) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS}; pass a directory LoRA training wrote")
    return load_file(str(file))


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^]]*\])\)")  # fmt: skip


def load_adapters(wrapper, directory: Path) -> None:
    """The adapter weights saved in `directory` into `wrapper`'s adapters; every one must be there."""
    peft = peft_module()
    state = adapter_state(directory)
    try:
        result = peft.set_peft_model_state_dict(wrapper, state, adapter_name=PEFT_NAME)
    except RuntimeError as err:  # torch's load_state_dict lists every adapter of another shape, a line each
        sizes = _SIZE_MISMATCH.findall(str(err))
        if not sizes:
            raise
        name, saved, expected = sizes[0]
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} does not fit this base model ({len(sizes)} adapters differ in shape, e.g. "
            f"{name}: {saved} saved, {expected} here); pass the base model they were trained on, with the --lora-* "
            "options they were trained with"
        ) from None
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        wrong = missing or result.unexpected_keys
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} does not hold this run's adapters ({len(wrong)} keys differ, e.g. "
            f"{wrong[0]}); resume with the --lora-* options it was trained with"
        )


def is_adapter_directory(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: Path) -> dict:
    try:
        config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{directory / ADAPTER_CONFIG} is not readable JSON ({err}); pass a LoRA output directory"
        ) from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ValueError(f"{directory / ADAPTER_CONFIG} is not a LoRA adapter's config (peft_type LORA)")
    return config


def settings_of(config: dict) -> LoraSettings:
    targets = config.get("target_modules")
    if isinstance(targets, str) or not isinstance(targets, list):
        raise ValueError(f"adapter_config.json's target_modules is {targets!r}; fastseq reads a list of layer names")
    return LoraSettings(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                        dropout=float(config.get("lora_dropout", 0.0)), targets=tuple(targets))  # fmt: skip


def merged_model(directory: str | Path, *, base: str | None = None, dtype: torch.dtype | None = None):
    """The model of a LoRA output directory with its adapters merged into the base weights: a plain
    native model, whose every layer runs fused again. `base` (a model directory or hub id) replaces
    the `base_model_name_or_path` the adapter config names."""
    from fastseq.checkpoint import from_pretrained
    from fastseq.hub import model_directory

    directory = Path(directory)
    config = read_adapter_config(directory)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{directory / ADAPTER_CONFIG} names no base model; pass --base MODEL")
    model = from_pretrained(model_directory(base))
    wrapper = add_adapters(model, settings_of(config), str(base))
    load_adapters(wrapper, directory)
    merged = wrapper.merge_and_unload()
    return merged.to(dtype) if dtype is not None else merged
