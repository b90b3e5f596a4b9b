"""DeepSpeed configs: read `configs/deepspeed/*.json`, fill the "auto" values from the model and the
training options, and refuse what cannot work with an error that says what to change."""

from __future__ import annotations

import copy
import json
from pathlib import Path

_T5_FAMILY = ("t5", "mt5", "longt5", "umt5")


def load(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = Path(path_or_dict)
    if not path.is_file():
        shipped = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / f"{path.name}"
        hint = f"; the shipped ones are in {shipped.parent}" if shipped.parent.is_dir() else ""
        raise FileNotFoundError(f"--deepspeed {path}: no such file{hint}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--deepspeed {path}: not valid JSON ({err}); fix the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed {path}: a DeepSpeed config is a JSON object, not a {type(config).__name__}")
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def pipeline_stages(config: dict) -> int:
    """Pipeline stages the config asks for (0: no pipeline)."""
    section = config.get("pipeline")
    if not section:
        return 0
    stages = section.get("stages", 0)
    if stages in ("auto", None):
        raise ValueError('the "pipeline" section needs "stages": N (a number of pipeline stages)')
    return int(stages)


def precision(config: dict) -> str:
    """What a resolved config trains in: "bf16", "fp16" or "fp32"."""
    if config.get("bf16", {}).get("enabled") is True:
        return "bf16"
    return "fp16" if config.get("fp16", {}).get("enabled") is True else "fp32"


def _fill(section: dict, key: str, value) -> None:
    if section.get(key) == "auto":
        section[key] = value


def resolve(
    config: dict,
    *,
    model_config,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    clip: float,
    precision: str,
    force_fp16: bool = False,
    lr: float | None = None,
    weight_decay: float = 0.0,
    on_gpu: bool = True,
    num_layers: int | None = None,
) -> dict:
    """A copy of `config` with every "auto" value filled and the combination checked.

    micro_batch_size: examples per rank per forward; grad_accum: micro-batches per optimizer step;
    precision: auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16."""
    config = copy.deepcopy(config)
    stage = zero_stage(config)
    stages = pipeline_stages(config)
    if stages and stage > 1:
        raise ValueError(
            f"pipeline parallelism works only with ZeRO stage 0 or 1; the config asks for stage {stage} "
            '(set "zero_optimization": {"stage": 1} or drop the "pipeline" section)'
        )
    if stages < 0 or (stages and world_size % stages):
        raise ValueError(f"{stages} pipeline stages do not divide the {world_size} ranks")
    if stages and num_layers is not None and stages > num_layers:
        raise ValueError(
            f"{stages} pipeline stages for a model of {num_layers} layers: each stage needs at least one layer; "
            f"use at most {num_layers} stages"
        )
    data_parallel = world_size // stages if stages else world_size

    _fill(config, "train_micro_batch_size_per_gpu", micro_batch_size)
    _fill(config, "gradient_accumulation_steps", grad_accum)
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    _fill(config, "train_batch_size", None if micro is None or accum is None else micro * accum * data_parallel)
    total = config.get("train_batch_size")
    if micro is not None and accum is not None and total is not None and total != micro * accum * data_parallel:
        raise ValueError(
            f"train_batch_size {total} is not train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
            f"{accum} x {data_parallel} data-parallel ranks = {micro * accum * data_parallel}; fix one of them "
            '(or set them to "auto")'
        )
    if micro is None and total is not None and accum is not None and total % (accum * data_parallel):
        raise ValueError(
            f"train_batch_size {total} does not divide into gradient_accumulation_steps {accum} x "
            f"{data_parallel} data-parallel ranks"
        )
    _fill(config, "gradient_clipping", clip)

    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    bf16 = config.setdefault("bf16", {})
    fp16 = config.setdefault("fp16", {})
    bf16.setdefault("enabled", "auto")
    fp16.setdefault("enabled", "auto")
    _fill(fp16, "enabled", precision == "fp16")
    _fill(bf16, "enabled", precision == "bf16" and not fp16["enabled"])  # a config asking for fp16 gets it
    t5 = getattr(model_config, "model_type", "") in _T5_FAMILY
    if fp16.get("enabled") and t5 and not force_fp16:
        raise ValueError(
            "fp16 is refused for T5-family models: their activations overflow fp16's range in pretrained "
            'checkpoints and the loss turns to NaN. Use bf16 ("bf16": {"enabled": true}) or fp32, or pass '
            "--force-fp16 to train in fp16 anyway"
        )
    if bf16.get("enabled") and fp16.get("enabled"):
        raise ValueError("the config enables both bf16 and fp16; pick one")

    d = model_config.d_model
    zero = config.setdefault("zero_optimization", {})
    # The sizes the transformers integration uses: buckets of d_model^2 elements.
    _fill(zero, "reduce_bucket_size", d * d)
    _fill(zero, "allgather_bucket_size", d * d)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * d * d))
    _fill(zero, "stage3_param_persistence_threshold", 10 * d)

    optimizer = config.get("optimizer")
    if optimizer:
        params = optimizer.setdefault("params", {})
        if params.get("lr") == "auto":
            if lr is None:
                raise ValueError('the config\'s optimizer has "lr": "auto": pass --lr')
            params["lr"] = lr
        _fill(params, "weight_decay", weight_decay)
    leftover = _autos(config)
    if leftover:
        raise ValueError(f'the config has "auto" values fastseq cannot fill: {", ".join(leftover)}')
    return config


def _autos(value, path: str = "") -> list[str]:
    if value == "auto":
        return [path or "<root>"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _autos(v, f"{path}.{k}" if path else k)]
    return []
