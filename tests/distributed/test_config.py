"""DeepSpeed configs: "auto" values filled from the model and the options, bad combinations refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastseq import presets
from fastseq.distributed import config as ds_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
SHIPPED = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload", "pipeline"]


def _resolve(name_or_dict, **kw):
    model_config = presets.config("google/t5-v1_1-small")
    options = dict(model_config=model_config, world_size=2, micro_batch_size=4, grad_accum=2, clip=1.0,
                   precision="auto", lr=1e-4, on_gpu=True, num_layers=16)  # fmt: skip
    options.update(kw)
    raw = ds_config.load(CONFIGS / f"{name_or_dict}.json" if isinstance(name_or_dict, str) else name_or_dict)
    return ds_config.resolve(raw, **options)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_resolve_with_no_auto_left(name):
    config = _resolve(name)
    assert "auto" not in str(config)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    data_parallel = 1 if name == "pipeline" else 2  # 2 ranks in 2 pipeline stages: one data-parallel group
    assert config["train_batch_size"] == 4 * 2 * data_parallel
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    d = 512
    assert config["zero_optimization"]["reduce_bucket_size"] == d * d
    if ds_config.zero_stage(config) == 3:
        assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * d
    if "optimizer" in config:
        assert config["optimizer"]["params"]["lr"] == 1e-4


def test_fp32_on_the_cpu_and_a_deepspeed_config_validates_it():
    from deepspeed.runtime.config import DeepSpeedConfig

    config = _resolve("zero3", on_gpu=False, world_size=1)
    assert config["bf16"]["enabled"] is False
    DeepSpeedConfig(config)  # DeepSpeed's own parser accepts the filled config


def test_refusals():
    with pytest.raises(ValueError, match="pipeline parallelism works only with ZeRO stage 0 or 1; the config asks "
                                         "for stage 3"):  # fmt: skip
        _resolve({"zero_optimization": {"stage": 3}, "pipeline": {"stages": 2}})
    with pytest.raises(ValueError, match="fp16 is refused for T5-family models"):
        _resolve({"fp16": {"enabled": True}})
    assert _resolve({"fp16": {"enabled": True}}, force_fp16=True)["fp16"]["enabled"] is True
    with pytest.raises(ValueError, match="4 pipeline stages for a model of 3 layers"):
        _resolve({"pipeline": {"stages": 4}}, world_size=4, num_layers=3)
    with pytest.raises(ValueError, match="train_batch_size 12 is not train_micro_batch_size_per_gpu 4 x "
                                         "gradient_accumulation_steps 2 x 2 data-parallel ranks = 16"):  # fmt: skip
        _resolve({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    with pytest.raises(ValueError, match="train_batch_size 10 does not divide"):
        _resolve({"train_batch_size": 10, "gradient_accumulation_steps": 2})
    with pytest.raises(ValueError, match="3 pipeline stages do not divide the 2 ranks"):
        _resolve({"pipeline": {"stages": 3}})
    with pytest.raises(ValueError, match="pass --lr"):
        _resolve("zero2_offload", lr=None)
    with pytest.raises(ValueError, match='"auto" values fastseq cannot fill: zero_optimization.sub_group_size'):
        _resolve({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}})
    with pytest.raises(FileNotFoundError, match="no such file"):
        ds_config.load(CONFIGS / "zero4.json")
