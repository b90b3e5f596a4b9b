"""DeepSpeed configs: read the shipped `fastseq/configs/deepspeed/*.json` (also at the repository's
`configs/deepspeed/`) or a user's file, check the types of what fastseq and DeepSpeed read, fill the
"auto" values from the model and the training options, and refuse what cannot work with an error
that says what to change."""

from __future__ import annotations

import copy
import json
import math
import os
from importlib import resources
from pathlib import Path

_T5_FAMILY = ("t5", "mt5", "longt5", "umt5")
_OFFLOAD_DEVICES = ("cpu", "nvme", "none")


def shipped_dir() -> Path:
    """The folder of the configs installed with fastseq (package data)."""
    return Path(str(resources.files("fastseq") / "configs" / "deepspeed"))


def shipped() -> list[str]:
    """Names of the shipped configs (`zero3` for zero3.json)."""
    return sorted(p.stem for p in shipped_dir().glob("*.json"))


def find(name_or_path: str | os.PathLike) -> Path:
    """`--deepspeed X`: the file X, or the shipped config named X (`zero3` or `zero3.json`)."""
    path = Path(name_or_path)
    if path.is_dir():
        raise ValueError(
            f"--deepspeed {path} is a directory; pass a JSON file or a shipped name ({', '.join(shipped())})"
        )
    if path.is_file():
        return path
    if path.parent == Path(".") and path.name.removesuffix(".json") in shipped():
        return shipped_dir() / f"{path.name.removesuffix('.json')}.json"
    raise FileNotFoundError(
        f"--deepspeed {path} does not exist; pass the path of a JSON file or a shipped config: {', '.join(shipped())}"
    )


def load(path_or_dict) -> dict:
    """A config as a dict (a copy), from a dict, a file or a shipped name, with its types checked."""
    if isinstance(path_or_dict, dict):
        config = copy.deepcopy(path_or_dict)
        check(config, "the DeepSpeed config")
        return config
    path = find(path_or_dict)
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise ValueError(f"--deepspeed {path}: not valid JSON ({err}); fix the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed {path}: a DeepSpeed config is a JSON object, not a {type(config).__name__}")
    check(config, f"--deepspeed {path}")
    return config


def require_launcher(environ=os.environ) -> None:
    """`--deepspeed` needs the process group that DeepSpeed's launcher (or torchrun) describes in
    RANK, WORLD_SIZE and LOCAL_RANK; without them DeepSpeed falls back to MPI discovery (mpi4py)."""
    if any(k in environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE")):
        return
    raise ValueError(
        "--deepspeed runs under DeepSpeed's launcher (RANK, WORLD_SIZE and LOCAL_RANK are not set): start it with "
        "`deepspeed --num_gpus N --module fastseq.train ARGS` (on a CPU: `DS_ACCELERATOR=cpu deepspeed ...`), "
        "or drop --deepspeed to train in one process"
    )


# ---- types ------------------------------------------------------------------------------------------


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bad(source: str, key: str, value, want: str) -> ValueError:
    return ValueError(f'{source}: "{key}" is {_show(value)}; it must be {want}')


def _check_counts(section: dict, keys: tuple[str, ...], prefix: str, source: str, low: int) -> None:
    for key in keys:
        if key in section and section[key] != "auto" and not (_is_int(section[key]) and section[key] >= low):
            raise _bad(source, prefix + key, section[key], f'an integer >= {low} or "auto"')


def _object(config: dict, key: str, source: str, example: str, prefix: str = "") -> dict:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise _bad(source, prefix + key, value, f"an object such as {example}")
    return value


def check(config: dict, source: str) -> None:
    """Raise a ValueError naming `source`, the key and the value for the first entry of a type that
    fastseq or DeepSpeed cannot use (a string for a stage, a word for a count, an unknown optimizer)."""
    _check_counts(config, ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"), "",
                  source, 1)  # fmt: skip
    clip = config.get("gradient_clipping", "auto")
    if clip != "auto" and not (_is_number(clip) and clip >= 0):
        raise _bad(source, "gradient_clipping", clip, 'a number >= 0 or "auto"')
    for name in ("bf16", "fp16"):
        section = _object(config, name, source, '{"enabled": true}')
        if section.get("enabled", "auto") not in (True, False, "auto"):
            raise _bad(source, f"{name}.enabled", section["enabled"], 'true, false or "auto"')
    zero = _object(config, "zero_optimization", source, '{"stage": 2}')
    stage = zero.get("stage", 0)
    if not (_is_int(stage) and 0 <= stage <= 3):
        raise _bad(source, "zero_optimization.stage", stage, "0, 1, 2 or 3")
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                "sub_group_size"):  # fmt: skip
        if key in zero and zero[key] != "auto" and not (_is_number(zero[key]) and zero[key] >= 0):
            raise _bad(source, f"zero_optimization.{key}", zero[key], 'a number >= 0 or "auto"')
    for key in ("offload_optimizer", "offload_param"):
        offload = _object(zero, key, source, '{"device": "cpu"}', "zero_optimization.")
        device = offload.get("device", "none")
        if device not in _OFFLOAD_DEVICES:
            raise _bad(
                source, f"zero_optimization.{key}.device", device, " or ".join(map(json.dumps, _OFFLOAD_DEVICES))
            )
    _check_optimizer(config, source)
    pipeline = _object(config, "pipeline", source, '{"stages": 2}')
    _check_counts(pipeline, ("stages",), "pipeline.", source, 1)
    _object(config, "scheduler", source, '{"type": "WarmupLR", "params": {...}}')


def _check_optimizer(config: dict, source: str) -> None:
    if "optimizer" not in config:
        return
    optimizer = _object(config, "optimizer", source, '{"type": "AdamW", "params": {"lr": "auto"}}')
    kind = optimizer.get("type")
    if not isinstance(kind, str) or not _known_optimizer(kind):
        raise _bad(source, "optimizer.type", kind, f"one of DeepSpeed's optimizers ({', '.join(_optimizer_names())}) "
                   "or a torch.optim class name; or drop the \"optimizer\" section to use --optimizer")  # fmt: skip
    params = _object(optimizer, "params", source, '{"lr": "auto"}', "optimizer.")
    for key in ("lr", "weight_decay"):
        if key in params and params[key] != "auto" and not (_is_number(params[key]) and params[key] >= 0):
            raise _bad(source, f"optimizer.params.{key}", params[key], 'a number >= 0 or "auto"')


def _optimizer_names() -> list[str]:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    return list(DEEPSPEED_OPTIMIZERS)


def _known_optimizer(kind: str) -> bool:
    """As DeepSpeed resolves "type": its own optimizers in any case, else a torch.optim class."""
    import torch

    return kind.lower() in _optimizer_names() or isinstance(getattr(torch.optim, kind, None), type)


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


def num_layers(model_config) -> int:
    """The model's layers, encoder and decoder together."""
    if model_config.model_type == "blenderbot-small":
        return model_config.encoder_layers + model_config.decoder_layers
    return model_config.num_layers + model_config.num_decoder_layers


def resolve_run(config: dict, args, model_config, world_size: int, *, on_gpu: bool = True) -> dict:
    """`resolve` with a run's options (`TrainArgs`) on `world_size` ranks: what `fastseq train
    --deepspeed` runs with, and the check `fastseq plan --deepspeed` makes of the same config."""
    return resolve(config, model_config=model_config, world_size=world_size, micro_batch_size=args.batch_size,
                   grad_accum=args.grad_accum, clip=args.clip, precision=args.precision, force_fp16=args.force_fp16,
                   lr=args.learning_rate(), weight_decay=args.weight_decay, on_gpu=on_gpu,
                   num_layers=num_layers(model_config), client_optimizer=args.optimizer)  # fmt: skip


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
    client_optimizer: str | None = None,
) -> dict:
    """A copy of `config` with every "auto" value filled and the combination checked.

    micro_batch_size: examples per rank per forward; grad_accum: micro-batches per optimizer step;
    precision: auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16; client_optimizer: the
    optimizer fastseq builds (--optimizer) when the config has no "optimizer" section."""
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

    if "optimizer" not in config and client_optimizer == "adafactor" and stage > 0:
        # DeepSpeed refuses an optimizer it has not tested under ZeRO unless told; fastseq's Adafactor
        # steps ZeRO's flat partitions as the matrices they are pieces of (`partitions.spread_adafactor`).
        config.setdefault("zero_allow_untested_optimizer", True)
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
