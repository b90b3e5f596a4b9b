"""DeepSpeed configs: "auto" values filled from the model and the options, bad combinations refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fastseq import presets
from fastseq.distributed import config as ds_config
from tests.conftest import refused

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "deepspeed"
SHIPPED = ["pipeline", "pipeline4", "pipeline8", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload",
           "zero3_offload_optimizer"]  # fmt: skip


def _resolve(name_or_dict, **kw):
    model_config = presets.config("google/t5-v1_1-small")
    options = dict(model_config=model_config, world_size=2, micro_batch_size=4, grad_accum=2, clip=1.0,
                   precision="auto", lr=1e-4, on_gpu=True, num_layers=16)  # fmt: skip
    options.update(kw)
    raw = ds_config.load(CONFIGS / f"{name_or_dict}.json" if isinstance(name_or_dict, str) else name_or_dict)
    return ds_config.resolve(raw, **options)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_resolve_with_no_auto_left(name):
    stages = ds_config.pipeline_stages(ds_config.load(name))
    config = _resolve(name, world_size=stages or 2)
    assert "auto" not in str(config)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    data_parallel = 1 if stages else 2  # as many ranks as pipeline stages: one data-parallel group
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
    with pytest.raises(FileNotFoundError, match="does not exist; pass the path of a JSON file or a shipped config: "
                                                "pipeline, pipeline4"):  # fmt: skip
        ds_config.load(CONFIGS / "zero4.json")


# ---- shipped with the package ------------------------------------------------------------------------------


def test_the_configs_are_package_data_and_the_repository_folder_is_theirs():
    shipped = ds_config.shipped_dir()
    assert shipped == ROOT / "fastseq" / "configs" / "deepspeed"
    assert ds_config.shipped() == SHIPPED
    assert CONFIGS.resolve() == shipped  # configs/deepspeed/ of a clone is the package's folder
    for name in SHIPPED:
        assert ds_config.find(name) == shipped / f"{name}.json" == ds_config.find(f"{name}.json")
        assert ds_config.load(name) == json.loads((CONFIGS / f"{name}.json").read_text())


def test_a_built_wheel_holds_every_config(tmp_path):
    """What a `pip install fastseq` user gets: the wheel built from this checkout's sources."""
    source = tmp_path / "src"
    for name in ("fastseq",):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "wheel"),
    ]
    proc = subprocess.run([*argv, str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("fastseq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"fastseq/configs/deepspeed/{name}.json" for name in SHIPPED} <= names
    # One importable name: transformers >= 5.25 imports Hugging Face's `kernels`, which a shipped
    # top-level package of another name could shadow as the old top-level kernels/ did.
    assert {name.split("/")[0] for name in names if not name.startswith("fastseq-")} == {"fastseq"}
    assert "fastseq/kernels/__init__.py" in names


# ---- bad configs and a missing launcher, through the command ---------------------------------------------


_BAD = {
    "zero_optimization a string": ({"zero_optimization": "abc"}, '"zero_optimization" is "abc"; it must be an object'),
    "stage a word": ({"zero_optimization": {"stage": "three"}}, '"zero_optimization.stage" is "three"; it must be 0'),
    "stage 4": ({"zero_optimization": {"stage": 4}}, '"zero_optimization.stage" is 4'),
    "unknown optimizer": ({"optimizer": {"type": "Adamm", "params": {"lr": 1e-4}}},
                          '"optimizer.type" is "Adamm"; it must be one of DeepSpeed\'s optimizers'),
    "optimizer a string": ({"optimizer": "adam"}, '"optimizer" is "adam"; it must be an object'),
    "optimizer params a list": ({"optimizer": {"type": "AdamW", "params": [1]}}, '"optimizer.params" is [1]'),
    "lr a word": ({"optimizer": {"type": "AdamW", "params": {"lr": "fast"}}}, '"optimizer.params.lr" is "fast"'),
    "micro-batch a word": ({"train_micro_batch_size_per_gpu": "four"}, '"train_micro_batch_size_per_gpu" is "four"'),
    "accumulation zero": ({"gradient_accumulation_steps": 0}, '"gradient_accumulation_steps" is 0'),
    "clipping negative": ({"gradient_clipping": -1}, '"gradient_clipping" is -1; it must be a number >= 0'),
    "bf16 a number": ({"bf16": 5}, '"bf16" is 5; it must be an object such as {"enabled": true}'),
    "bf16 enabled a word": ({"bf16": {"enabled": "yes"}}, '"bf16.enabled" is "yes"; it must be true, false'),
    "offload a string": ({"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}},
                         '"zero_optimization.offload_optimizer" is "cpu"; it must be an object'),
    "offload to a GPU": ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
                         '"zero_optimization.offload_param.device" is "gpu"'),
    "bucket a word": ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}},
                      '"zero_optimization.reduce_bucket_size" is "big"'),
    "stages a word": ({"pipeline": {"stages": "two"}}, '"pipeline.stages" is "two"; it must be an integer >= 1'),
    "pipeline a list": ({"pipeline": [2]}, '"pipeline" is [2]; it must be an object'),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_BAD))
def test_a_config_of_the_wrong_types_is_one_line_naming_file_key_and_value(tmp_path, capfd, monkeypatch, name):
    monkeypatch.setenv("RANK", "0")  # as under the launcher: the config is read before anything else is needed
    config, expected = _BAD[name]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(capfd, ["train", "--deepspeed", str(path), "--output-dir", str(out)], f"--deepspeed {path}: ", expected)
    assert not out.exists()


def test_deepspeeds_optimizer_names_in_any_case_and_torch_optim_classes_are_accepted():
    for kind in ("AdamW", "adamw", "Lamb", "SGD", "Adagrad"):
        ds_config.load({"optimizer": {"type": kind, "params": {"lr": 1e-3}}})


def test_without_the_launcher_says_how_to_start_it(tmp_path):
    """`fastseq train --deepspeed` started as a plain command: DeepSpeed would look for MPI (mpi4py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    exe = shutil.which("fastseq")
    assert exe, "the fastseq console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "train", "--deepspeed", "zero2", "--steps", "2", "--output-dir", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastseq ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "start it with `deepspeed --num_gpus N --module fastseq.train ARGS`" in lines[0]
    assert "mpi4py" not in proc.stderr and not (tmp_path / "out").exists()


def test_adafactor_the_default_optimizer_is_allowed_under_zero():
    """DeepSpeed refuses an optimizer it has not tested under ZeRO ("untested ZeRO Optimizer") unless
    the config allows it: fastseq's Adafactor, train's default, is allowed; the rest is unchanged."""
    assert _resolve("zero2", client_optimizer="adafactor")["zero_allow_untested_optimizer"] is True
    assert _resolve("pipeline", client_optimizer="adafactor")["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in _resolve("zero2", client_optimizer="adamw")
    assert "zero_allow_untested_optimizer" not in _resolve("zero3_offload", client_optimizer="adafactor")
    assert "zero_allow_untested_optimizer" not in _resolve({"zero_optimization": {"stage": 0}},
                                                            client_optimizer="adafactor")  # fmt: skip
    assert _resolve({"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": False},
                    client_optimizer="adafactor")["zero_allow_untested_optimizer"] is False  # fmt: skip
