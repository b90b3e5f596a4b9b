"""`fastseq plan`: model-state memory agrees with DeepSpeed's own estimators; the activation and
optimizer figures agree with what a one-process run allocates; bad input is one line; the plan
recommends a strategy, a shipped config and a launch command that runs as printed."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastseq import presets
from fastseq.cli import main
from fastseq.distributed.plan import Cluster, Setup, end_to_end_state, model_sizes, plan
from fastseq.memory import GIB, host_memory_gib
from tests.conftest import refused
from tests.distributed.launch import free_port, shared_memory_left

ADAM = Setup(optimizer="adamw")  # DeepSpeed's estimators assume bf16 with Adam


def _rows(preset: str, gpus: int, per_node: int, setup: Setup = ADAM) -> dict:
    sizes = model_sizes(presets.config(preset))
    return {r.strategy: r for r in plan(sizes, Cluster(gpus, per_node, 80, 1000), setup)}


def _deepspeed_estimates(P: int, largest: int, gpus_per_node: int, nodes: int) -> dict[str, tuple[int, int]]:
    """strategy -> (CPU bytes per node, GPU bytes) from DeepSpeed's estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    z3 = {
        "ZeRO-3": dict(cpu_offload=False, cpu_offload_params=False),
        "ZeRO-3 + offload optimizer": dict(cpu_offload=True, cpu_offload_params=False),
        "ZeRO-3 + offload params+optimizer": dict(cpu_offload=True, cpu_offload_params=True),
    }
    out = {
        "ZeRO-2": estimate_zero2_model_states_mem_needs(P, gpus_per_node, nodes, cpu_offload=False),
        "ZeRO-2 + offload optimizer": estimate_zero2_model_states_mem_needs(P, gpus_per_node, nodes, cpu_offload=True),
    }
    for name, kw in z3.items():
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(P, largest, gpus_per_node, nodes, zero_init=True, **kw)
        out[name] = (cpu, gpu)
    return out


@pytest.mark.parametrize(("preset", "gpus", "per_node"), [("t5-11b", 8, 8), ("google/mt5-xxl", 16, 8),
                                                           ("google/t5-v1_1-base", 2, 2)])  # fmt: skip
def test_model_states_agree_with_deepspeed_within_5_percent(preset, gpus, per_node):
    rows = _rows(preset, gpus, per_node)
    sizes = model_sizes(presets.config(preset))
    for name, (cpu, gpu) in _deepspeed_estimates(sizes.params, sizes.largest, per_node, gpus // per_node).items():
        row = rows[name]
        states = row.params + row.grads + row.optimizer
        assert abs(states - gpu) <= 0.05 * gpu, f"{name}: GPU {states / GIB:.2f} GiB vs DeepSpeed {gpu / GIB:.2f}"
        assert abs(row.cpu_per_node - cpu) <= 0.05 * cpu, f"{name}: CPU {row.cpu_per_node / GIB:.2f} vs {cpu / GIB:.2f}"


def test_adafactor_under_zero_keeps_its_factored_moments():
    """Adafactor steps the matrices ZeRO's flat partitions are pieces of, so its state stays factored:
    for t5-11b on 8 GPUs, megabytes per GPU where a flat second moment took 4 B per parameter / 8
    (5.3 GiB): under ZeRO-3 every matrix's rows and columns and 1/8 of the vectors' moments, under
    ZeRO-1/2 the largest rank's share of both (about 1/8). The master weights (bf16) are AdamW's too."""
    adam, adafactor = _rows("t5-11b", 8, 8), _rows("t5-11b", 8, 8, Setup(optimizer="adafactor"))
    sizes = model_sizes(presets.config("t5-11b"))
    P = sizes.params
    assert sizes.factored_state / 2**20 == pytest.approx(43.6, abs=0.1)
    zero3 = adafactor["ZeRO-3"].optimizer - 4 * P / 8  # less the master weights
    assert zero3 == sizes.factored_state + sizes.vector_state / 8
    for name in ("ZeRO-1", "ZeRO-2"):
        state = adafactor[name].optimizer - 4 * P / 8
        assert state == max(end_to_end_state(sizes.shapes, 8))
        assert (sizes.factored_state + sizes.vector_state) / 8 <= state < 8 * 2**20
    for name in ("ZeRO-1", "ZeRO-2", "ZeRO-3"):
        assert adam[name].optimizer - adafactor[name].optimizer > 8 * P / 8 - 50 * 2**20
    for name in ("ZeRO-2 + offload optimizer", "ZeRO-3 + offload params+optimizer"):  # the config's CPU AdamW
        assert adam[name].cpu_per_node == adafactor[name].cpu_per_node


def _plan_output(capsys, *argv: str) -> str:
    assert main(["plan", *argv]) == 0
    return capsys.readouterr().out


def test_zero_1_2_adafactor_state_follows_the_partitions_of_the_parameters_laid_end_to_end():
    """A 4 x 6 matrix, a vector of 10 and a 3 x 5 matrix: 49 elements padded to 52, partitions of 26.
    Rank 0 holds the first matrix (rows + columns: 10 values) and 2 of the vector's elements; rank 1
    the vector's other 8 and the second matrix (8 values). One rank keeps everything."""
    shapes = ((4, 6), (10,), (3, 5))
    assert end_to_end_state(shapes, 2) == [4 * (10 + 2), 4 * (8 + 8)]
    assert end_to_end_state(shapes, 1) == [4 * (10 + 10 + 8)]
    assert end_to_end_state(shapes, 4) == [4 * 10, 4 * (10 + 4), 4 * (6 + 8), 4 * 8]  # 56 elements, 14 each


def test_t5_11b_on_8_x_80gb(capsys):
    zero3 = _rows("t5-11b", 8, 8)["ZeRO-3"]
    assert 23 <= (zero3.params + zero3.grads + zero3.optimizer) / GIB <= 25  # about 24 GiB of model states
    assert {"pipeline 2 stages x 4 data parallel", "pipeline 8 stages x 1 data parallel"} <= set(_rows("t5-11b", 8, 8))
    out = _plan_output(capsys, "--model", "t5-11b", "--gpus", "8", "--gpu-mem", "80", "--cpu-mem", "1000")
    assert "ZeRO-3 " in out and "fits:" in out and "11.31B parameters" in out
    lines = out.splitlines()
    recommended = [line for line in lines if line.startswith("recommended: ")]
    assert len(recommended) == 1, out
    # Everything fits on 8 x 80 GiB: the one with the least communication is chosen, and said why.
    assert recommended[0].startswith("recommended: ZeRO-1 (config ") and "least communication" in recommended[0]
    assert "zero1.json" in recommended[0]
    # No data was given: the command names the data options as placeholders to fill.
    assert lines[-1] == ("deepspeed --num_gpus 8 --module fastseq.train --deepspeed zero1 --model t5-11b --data "
                         "TRAIN.jsonl --eval-data EVAL.jsonl --batch-size 1")  # fmt: skip


def test_the_printed_command_carries_the_data_options_given(tmp_path, capsys):
    """The data options given go into the command as given; with none, a model fine-tuned on no data
    gets placeholders (`fastseq train` refuses it without data); --random-init and --data synthetic need none."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"source": "a", "target": "b"}\n')
    common = ["--model", "t5-11b", "--gpus", "8", "--gpu-mem", "80", "--cpu-mem", "1000"]
    last = _plan_output(capsys, *common, "--data", str(data), "--source-field", "source").splitlines()[-1]
    assert last.endswith(f"--model t5-11b --data {data} --source-field source --batch-size 1"), last
    last = _plan_output(capsys, *common, "--eval-data", str(data)).splitlines()[-1]
    assert last.endswith(f"--model t5-11b --data TRAIN.jsonl --eval-data {data} --batch-size 1"), last
    last = _plan_output(capsys, *common, "--dataset-name", "org/news").splitlines()[-1]
    assert last.endswith("--model t5-11b --dataset-name org/news --batch-size 1"), last
    for given in (["--random-init"], ["--data", "synthetic"]):
        last = _plan_output(capsys, *common, *given).splitlines()[-1]
        assert "TRAIN.jsonl" not in last and last.endswith(" ".join(given) + " --batch-size 1"), last


def test_more_than_one_node_prints_the_launches_without_ssh(capsys):
    """Two nodes: the hostfile command, then the one launcher per node of SLURM and Kubernetes jobs
    (DeepSpeed's --no_ssh, as tests/distributed/test_nodes.py runs it, and torchrun), same options."""
    out = _plan_output(capsys, "--model", "t5-11b", "--gpus", "16", "--gpus-per-node", "8", "--gpu-mem", "80",
                       "--cpu-mem", "1000", "--optimizer", "adafactor")  # fmt: skip
    lines = out.splitlines()
    options = (
        "--deepspeed zero1 --model t5-11b --data TRAIN.jsonl --eval-data EVAL.jsonl --batch-size 1 --optimizer "
        "adafactor"
    )
    train = f"--module fastseq.train {options}"
    assert lines[-4] == f"deepspeed --hostfile HOSTFILE --num_nodes 2 --num_gpus 8 {train}"
    assert lines[-3].startswith("or, without ssh between the nodes (SLURM, Kubernetes), on each node R = 0 ... 1")
    assert lines[-2] == ("deepspeed --hostfile HOSTFILE --no_ssh --num_nodes 2 --node_rank R --master_addr MASTER "
                         f"--master_port 29500 --num_gpus 8 {train}")  # fmt: skip
    assert lines[-1] == ("torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --master-addr MASTER "
                         f"--master-port 29500 -m fastseq.train {options}")  # fmt: skip
    one_node = _plan_output(capsys, "--model", "t5-11b", "--gpus", "8", "--gpu-mem", "80", "--cpu-mem", "1000")
    assert "--no_ssh" not in one_node and "torchrun" not in one_node


def test_the_table_names_each_column_once_over_its_numbers(capsys):
    out = _plan_output(
        capsys, "--model", "t5-11b", "--gpus", "16", "--gpus-per-node", "8", "--gpu-mem", "80", "--cpu-mem", "1000"
    )
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    names = ["strategy", "params", "grads", "optim", "acts", "per GPU", "GPU per node", "host per node", "fits",
             "config"]  # fmt: skip
    assert [n for n in names if n in lines[head]] == names and lines[head].count("per node") == 2
    row = next(line for line in lines[head + 2 :] if line.startswith("ZeRO-3 "))
    # Each figure ends under the end of its column's name: per GPU, x8 per node, then the host's.
    for name in ("per GPU", "GPU per node", "host per node"):
        end = lines[head].index(name) + len(name)
        assert row[end - 1] != " " and row[end] == " ", (name, lines[head], row)
    per_gpu, gpu_node = (float(row[lines[head].index(n) : lines[head].index(n) + len(n)]) for n in
                         ("per GPU", "GPU per node"))  # fmt: skip
    assert abs(gpu_node - 8 * per_gpu) <= 0.5


def test_a_change_of_options_that_makes_a_strategy_fit_is_shown_and_used(capsys):
    argv = ["--model", "t5-11b", "--gpus", "8", "--gpu-mem", "40", "--cpu-mem", "64", "--batch-size", "8",
            "--max-source-length", "1024", "--max-target-length", "256", "--optimizer", "adamw",
            "--lr", "1e-4"]  # fmt: skip
    out = _plan_output(capsys, *argv)
    assert "fits: nothing as asked" in out
    assert "ZeRO-3 needs" in out and "fits with --gradient-checkpointing" in out
    assert "recommended: ZeRO-3 " in out and "with --gradient-checkpointing it does" in out
    command = out.splitlines()[-1]
    assert command.startswith("deepspeed --num_gpus 8 --module fastseq.train --deepspeed zero3 ")
    assert "--gradient-checkpointing" in command.split() and "--batch-size 8" in command
    # The activations change as the option changes them in a run: checkpointing keeps each layer's input only.
    sizes = model_sizes(presets.config("t5-11b"))
    setup = Setup(batch_size=8, source_length=1024, target_length=256, optimizer="adamw")
    full = plan(sizes, Cluster(8, 8, 40, 64), setup)[0].activations
    checkpointed = plan(sizes, Cluster(8, 8, 40, 64), dataclasses.replace(setup, gradient_checkpointing=True))[0]
    assert checkpointed.activations < full / 5


def test_host_memory_is_the_machines_unless_given_and_is_never_exceeded(capsys):
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    machine = int(meminfo["MemTotal"].split()[0]) * 1024 / GIB
    assert host_memory_gib() == pytest.approx(machine)
    out = _plan_output(capsys, "--model", "t5-small", "--gpus", "4", "--gpu-mem", "24")
    assert f"{machine:.1f} GiB host memory per node (this machine's memory; --cpu-mem to change it)" in out
    # t5-11b on 4 x 24 GiB fits only with ZeRO-3's offloads, which need about 250-290 GiB of host memory.
    out = _plan_output(capsys, "--model", "t5-11b", "--gpus", "4", "--gpu-mem", "24", "--cpu-mem", "1000")
    assert "recommended: ZeRO-3 + offload optimizer (config " in out
    assert out.splitlines()[-1].startswith("deepspeed --num_gpus 4 --module fastseq.train --deepspeed "
                                           "zero3_offload_optimizer --model t5-11b --data TRAIN.jsonl --eval-data "
                                           "EVAL.jsonl --batch-size 1 --optimizer adamw "
                                           "--lr 0.0001")  # fmt: skip
    for cpu_mem in ("100", "280"):  # below both offloads' need, then between them: only LoRA fits
        out = _plan_output(capsys, "--model", "t5-11b", "--gpus", "4", "--gpu-mem", "24", "--cpu-mem", cpu_mem)
        recommended = next(line for line in out.splitlines() if line.startswith("recommended:"))
        assert "offload" not in recommended, out
        assert recommended.startswith("recommended: ZeRO-3 (config ") and "with --lora-r 16 it does" in recommended
        assert "ZeRO-3 + offload optimizer needs 252.7 GiB host memory per node" in out


_BAD = {
    "no GPUs": (["--gpus", "0"], "--gpus must be at least 1; got 0"),
    "negative GPUs": (["--gpus", "-8"], "--gpus must be at least 1; got -8"),
    "negative GPU memory": (["--gpus", "8", "--gpu-mem", "-80"], "--gpu-mem must be a positive number of GiB; got -80"),
    "NaN GPU memory": (["--gpus", "8", "--gpu-mem", "nan"], "--gpu-mem must be a positive number of GiB; got nan"),
    "negative CPU memory": (["--gpus", "8", "--cpu-mem", "-1"], "--cpu-mem must be a positive number of GiB; got -1"),
    "no GPUs per node": (["--gpus", "8", "--gpus-per-node", "0"], "--gpus-per-node must be at least 1; got 0"),
    "nodes that do not divide": (["--gpus", "6", "--gpus-per-node", "4"], "--gpus 6 is not a multiple of"),
    "empty batch": (["--gpus", "8", "--batch", "0"], "--batch-size must be at least 1; got 0"),
    "empty batch, train's name": (["--gpus", "8", "--batch-size", "0"], "--batch-size must be at least 1; got 0"),
    "empty source": (["--gpus", "8", "--seq", "0"], "--max-source-length must be at least 1; got 0"),
    "negative target": (["--gpus", "8", "--target", "-5"], "--max-target-length must be at least 1; got -5"),
    "adamw without a rate": (["--gpus", "8", "--optimizer", "adamw"], "--optimizer adamw needs a learning rate"),
    "unknown model": (
        ["--gpus", "8", "--model", "t5-smol"],
        "neither a directory nor a model in the Hugging Face cache",
    ),
    "unknown DeepSpeed config": (["--gpus", "8", "--deepspeed", "zero4"], "shipped config: pipeline, pipeline4"),
    "a config the GPUs cannot run": (["--gpus", "2", "--deepspeed", "pipeline8"], "8 pipeline stages do not divide"),
}


@pytest.mark.parametrize("name", sorted(_BAD))
def test_bad_input_is_one_line(capfd, name):
    argv, expected = _BAD[name]
    code = main(["plan", *(["--model", "t5-small"] if "--model" not in argv else []), *argv])
    err = capfd.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("fastseq ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fastseq plan: error: ") and expected in lines[0], lines[0]


_REFUSED_CONFIGS = {
    "pipeline with ZeRO-3": ({"pipeline": {"stages": 2}, "zero_optimization": {"stage": 3}},
                             "pipeline parallelism works only with ZeRO stage 0 or 1; the config asks for stage 3"),
    "a batch that is not micro x accumulation x ranks": (
        {"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
        "train_batch_size 7 is not train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 1 x 1"),
    "bf16 and fp16": ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "the config enables both bf16 and fp16"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_REFUSED_CONFIGS))
def test_plan_refuses_a_config_exactly_as_train_does(tmp_path, capfd, name):
    """`plan --deepspeed FILE` said "fits" and printed a command for configs that `train` refuses: both
    now run the same check (`fastseq.distributed.config.resolve_run`) and print the same line."""
    config, expected = _REFUSED_CONFIGS[name]
    file = tmp_path / "ds.json"
    file.write_text(json.dumps(config))
    options = ["--batch-size", "2", "--force-fp16", "--optimizer", "adamw", "--lr", "1e-3", "--deepspeed", str(file)]
    code = main(["plan", "--gpus", "1", "--cpu-mem", "8", *options])
    captured = capfd.readouterr()
    assert code == 2 and captured.out == "", captured
    planned = [line for line in captured.err.splitlines() if line.startswith("fastseq plan: error: ")]
    assert len(planned) == 1 and expected in planned[0], captured.err
    # `fastseq train` in one rank of a process group (what the launcher sets up), on the CPU.
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu", FASTSEQ_BACKEND="reference",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "fastseq.cli", "train", "--steps", "1", *options, "--output-dir",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    trained = [line for line in proc.stderr.splitlines() if line.startswith("fastseq train: error: ")]
    assert proc.returncode == 2 and len(trained) == 1, proc.stderr[-3000:]
    assert trained[0].removeprefix("fastseq train") == planned[0].removeprefix("fastseq plan")


def _model_dir(path: Path) -> Path:
    """A tiny T5 v1.1 with the ByT5 vocabulary, saved with its tokenizer."""
    from fastseq.models import T5ForConditionalGeneration
    from fastseq.tokenizers import ByT5Tokenizer
    from fastseq.train.engine import default_config

    config = dataclasses.replace(default_config(), d_model=32, d_kv=8, d_ff=64, extra={})
    T5ForConditionalGeneration(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def test_a_model_directory_and_a_chosen_config(tmp_path, capsys):
    model = _model_dir(tmp_path / "model")
    out = _plan_output(capsys, "--model", str(model), "--gpus", "2", "--gpu-mem", "1", "--cpu-mem", "8",
                       "--deepspeed", "zero3")  # fmt: skip
    assert f"{model}: 0.00B parameters" in out
    assert "recommended: ZeRO-3 (config " in out and "zero3.json): the config you chose fits" in out
    assert out.splitlines()[-1].startswith("deepspeed --num_gpus 2 --module fastseq.train --deepspeed zero3 --model ")
    out = _plan_output(capsys, "--model", "t5-11b", "--gpus", "8", "--gpu-mem", "40", "--deepspeed", "zero1")
    assert "recommended: none; the config you chose does not fit, whatever the options: ZeRO-1 needs" in out


# ---- the figures against a measured one-process run -------------------------------------------------------


class Allocated(TorchDispatchMode):
    """The bytes of CPU tensor storage allocated inside the mode and still alive, with a log of every
    allocation and release (deterministic: storages are freed by reference counting)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.log: list[tuple[int, int]] = []  # (allocation number, +bytes or -bytes)
        self._alive: dict[int, tuple[int, int]] = {}  # id(storage) -> (allocation number, data pointer)

    def _free(self, key: int, event: int, n: int) -> None:
        self._alive.pop(key, None)
        self.live -= n
        self.log.append((event, -n))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, n = id(storage), storage.nbytes()
            if n == 0 or key in self._alive or storage.data_ptr() in inputs:  # empty, seen, or a view
                continue
            event = len(self.log)
            self._alive[key] = (event, storage.data_ptr())
            self.live += n
            self.log.append((event, n))
            weakref.finalize(storage, self._free, key, event, n)
        return out

    def peak_since(self, start: int, excluding: set[int]) -> int:
        """The peak of the bytes allocated since log entry `start`, leaving out the storages still
        alive at the data pointers `excluding` (the gradients)."""
        skip = {event for event, pointer in self._alive.values() if pointer in excluding}
        live = top = 0
        for event, n in self.log[start:]:
            if event not in skip:
                live += n
                top = max(top, live)
        return top


def _measured(optimizer: str, checkpointing: bool, config=None, shape: tuple[int, int, int] = (8, 16, 8)) -> dict:
    """One step of `fastseq train`'s one-process engine on the CPU (fp32) for a micro-batch of `shape`
    (examples, source and target tokens): the bytes of the parameters, the activations at their peak
    (forward and backward, gradients left out), the gradients, and the optimizer's state."""
    from fastseq.train import TrainArgs
    from fastseq.train.engine import LocalEngine

    examples, source, target = shape
    args = TrainArgs(optimizer=optimizer, lr=1e-3, gradient_checkpointing=checkpointing, precision="fp32",
                     device="cpu", batch_size=examples)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(3, 384, (examples, source), generator=generator),
                 attention_mask=torch.ones(examples, source, dtype=torch.long),
                 labels=torch.randint(3, 384, (examples, target), generator=generator))  # fmt: skip
    torch.manual_seed(0)
    with Allocated() as memory:
        engine = LocalEngine(args, torch.device("cpu"))
        engine.build(config or _MEASURED_CONFIG)
        params, start = memory.live, len(memory.log)
        engine.forward_backward([batch])
        grads = {p.grad.data_ptr() for p in engine.model.parameters() if p.grad is not None}
        activations = memory.peak_since(start, grads)
        gradients = memory.live - params
        engine.step()  # frees the gradients, allocates the optimizer's state
        state = memory.live - params
    return {"params": params, "activations": activations, "grads": gradients, "optimizer": state}


def _measured_config():
    from fastseq.train.engine import default_config

    return dataclasses.replace(default_config(), d_model=128, d_kv=32, d_ff=256, extra={})


_MEASURED_CONFIG = _measured_config()


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_model_states_agree_with_a_measured_one_process_run(optimizer, monkeypatch):
    """Parameters, gradients and the optimizer's state within 1% of what a one-process CPU step
    allocates (fp32: on a GPU the same counts, bf16 adding autocast's 16-bit copy of the weights).
    Adafactor's factored second moments are a small fraction of AdamW's two moments."""
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    measured = _measured(optimizer, False)
    setup = Setup(batch_size=8, source_length=16, target_length=8, optimizer=optimizer, precision="fp32")
    row = plan(model_sizes(_MEASURED_CONFIG), Cluster(1, 1, 80, 64), setup)[0]
    assert row.strategy == "one process (no DeepSpeed)"
    for name in ("params", "grads", "optimizer"):
        planned = getattr(row, name)
        assert abs(planned - measured[name]) <= 0.01 * measured[name], (name, planned, measured[name])
    if optimizer == "adafactor":
        assert measured["optimizer"] < measured["params"] / 50


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_against_what_the_cpu_references_keep(checkpointing, monkeypatch):
    """The kernels' PyTorch references, which the CPU runs, keep what the kernels keep and more (the
    attention probabilities, the FFN's activation): without checkpointing the planned figure, the
    kernels', lies between half of their measured peak and all of it. With checkpointing every
    layer keeps only its input and the peak is the layer recomputed and differentiated: within 20%.
    (The kernels themselves: test_activations_agree_with_what_the_kernels_keep.)"""
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    measured = _measured("adamw", checkpointing)["activations"]
    setup = Setup(batch_size=8, source_length=16, target_length=8, optimizer="adamw", precision="fp32",
                  gradient_checkpointing=checkpointing)  # fmt: skip
    planned = plan(model_sizes(_MEASURED_CONFIG), Cluster(1, 1, 80, 64), setup)[0].activations
    if checkpointing:
        assert abs(planned - measured) <= 0.2 * measured, (planned, measured)
    else:
        assert 0.5 * measured <= planned <= measured, (planned, measured)


@pytest.mark.slow
def test_activations_agree_with_what_the_kernels_keep():
    """The activations at their peak of a one-process CPU step run through the Triton kernels
    (TRITON_INTERPRET=1: their autograd functions save what they save on a GPU), with and without
    gradient checkpointing, on two configurations: the planned figures within 10%."""
    import json
    import sys

    from tests.workers.plan_memory import CASES

    env = dict(os.environ, TRITON_INTERPRET="1", FASTSEQ_BACKEND="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "tests.workers.plan_memory"], cwd=Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=2400)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for (config, (examples, source, target)), found in zip(CASES, measured, strict=True):
        sizes = model_sizes(config)
        for flag in (False, True):
            setup = Setup(batch_size=examples, source_length=source, target_length=target, optimizer="adamw",
                          precision="fp32", gradient_checkpointing=flag)  # fmt: skip
            planned = plan(sizes, Cluster(1, 1, 80, 64), setup)[0].activations
            assert abs(planned - found[str(flag)]) <= 0.10 * found[str(flag)], (flag, planned, found)
        assert found["True"] < found["False"]


# ---- the printed command runs -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_printed_command_runs_with_two_cpu_ranks_and_converts(tmp_path, capsys):
    """`fastseq plan` for a tiny model directory on 2 "GPUs"; its last line, run as printed (on the CPU:
    DS_ACCELERATOR=cpu, and a free port instead of the default one that other runs may hold), trains;
    no checkpoint holds DeepSpeed's zero_to_fp32.py, and the converted checkpoint generates."""
    model = _model_dir(tmp_path / "model")
    out_dir = tmp_path / "run"
    out = _plan_output(capsys, "--model", str(model), "--gpus", "2", "--gpu-mem", "1", "--cpu-mem", "8", "--data",
                       "synthetic", "--steps", "2", "--save-every", "1", "--batch-size", "2", "--eval-examples", "0",
                       "--quiet", "--output-dir", str(out_dir))  # fmt: skip
    command = shlex.split(out.splitlines()[-1])
    assert command[:6] == ["deepspeed", "--num_gpus", "2", "--module", "fastseq.train", "--deepspeed"]
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", FASTSEQ_BACKEND="reference", OMP_NUM_THREADS="1")
    launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed console script is not installed"
    proc = subprocess.run([launcher, "--master_port", str(port), *command[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    for buffer in shared_memory_left(port):
        buffer.unlink()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoints = sorted(out_dir.glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    scripts = [p for p in out_dir.rglob("*.py")]
    assert not scripts, scripts  # DeepSpeed's zero_to_fp32.py / zero_to_torch.py are removed

    converted = tmp_path / "hf"
    assert main(["convert", "--from-deepspeed", str(checkpoints[-1]), "--to", str(converted)]) == 0
    assert {"tokenizer_config.json", "config.json"} <= {p.name for p in converted.iterdir()}
    assert main(["generate", "--model", str(converted), "abc", "--max-new-tokens", "4"]) == 0


# ---- LoRA ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_lora_states_agree_with_a_measured_one_process_run(optimizer, tmp_path, monkeypatch):
    """Under LoRA the frozen base has no gradients and no optimizer state: the planned parameters,
    gradients and state are, within 1%, what a one-process LoRA step allocates (fp32)."""
    from fastseq.models import T5ForConditionalGeneration
    from fastseq.train import TrainArgs
    from fastseq.train.engine import LocalEngine

    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    T5ForConditionalGeneration(_MEASURED_CONFIG).save_pretrained(tmp_path / "model")
    args = TrainArgs(model=str(tmp_path / "model"), optimizer=optimizer, lr=1e-3, precision="fp32", device="cpu",
                     lora_r=8, lora_targets="q,v,wi_0")  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batch = dict(input_ids=torch.randint(3, 384, (8, 16), generator=generator),
                 labels=torch.randint(3, 384, (8, 8), generator=generator))  # fmt: skip
    # A first step, unmeasured, makes what the ops keep from call to call (the bias's bucket tables): run
    # alone the test counted them as gradients, run after other tests it did not.
    warm = LocalEngine(args, torch.device("cpu"))
    warm.build(_MEASURED_CONFIG)
    warm.forward_backward([batch])
    del warm
    with Allocated() as memory:
        engine = LocalEngine(args, torch.device("cpu"))
        engine.build(_MEASURED_CONFIG)
        loaded = memory.live  # the adapters (the base's weights are read from the file, not allocated here)
        engine.forward_backward([batch])
        grads = memory.live - loaded
        engine.step()
        state = memory.live - loaded
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    setup = Setup(batch_size=8, source_length=16, target_length=8, optimizer=optimizer, precision="fp32", lora_r=8,
                  lora_targets=("q", "v", "wi_0"))  # fmt: skip
    sizes = model_sizes(_MEASURED_CONFIG)
    row = plan(sizes, Cluster(1, 1, 80, 64), setup)[0]
    adapters, _ = sizes.adapters(setup)
    assert adapters == sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    for name, measured in {"params": params, "grads": grads, "optimizer": state}.items():
        planned = getattr(row, name)
        assert abs(planned - measured) <= 0.01 * measured, (name, planned, measured)
    assert grads < params / 10  # the adapters' gradients only


def test_lora_is_offered_when_full_fine_tuning_does_not_fit(capsys):
    """FLAN-T5-XXL on one GPU: full fine-tuning fits nowhere; the plan recommends LoRA (r=16 on q, v)
    with the figures of a bf16 and of an 8-bit base, and its command. At 48 GiB LoRA alone fits; at
    24 GiB it needs gradient checkpointing too."""
    out = _plan_output(capsys, "--model", "google/flan-t5-xxl", "--gpus", "1", "--gpu-mem", "48", "--cpu-mem", "256")
    lines = out.splitlines()
    assert "fits: nothing as asked" in lines
    assert lines[-1] == (
        "fastseq train --model google/flan-t5-xxl --data TRAIN.jsonl --eval-data EVAL.jsonl --batch-size 1 --lora-r 16"
    )
    assert any(line.startswith("recommended: one process (no DeepSpeed): nothing fits as asked; with --lora-r 16")
               for line in lines)  # fmt: skip
    lora = next(line for line in lines if line.startswith("LoRA r=16 on q,v: "))
    bf16, int8 = (
        float(x) for x in re.findall(r"needs ([\d.]+) GiB with a bf16 base.* ([\d.]+) GiB with an 8-bit", lora)[0]
    )
    assert 20 < bf16 < 43.2 and 10 < int8 < bf16 - 9  # the base's 11.1B parameters at 2 B, then 1 B
    out = _plan_output(capsys, "--model", "google/flan-t5-xxl", "--gpus", "1", "--gpu-mem", "24", "--cpu-mem", "256")
    assert out.splitlines()[-1].endswith("--batch-size 1 --gradient-checkpointing --lora-r 16")
    # Asked for, LoRA's rows hold the adapters' gradients and state only.
    out = _plan_output(capsys, "--model", "google/flan-t5-xxl", "--gpus", "1", "--gpu-mem", "48", "--cpu-mem", "256",
                       "--lora-r", "8")  # fmt: skip
    one = next(line for line in out.splitlines() if line.startswith("one process"))
    params, grads, optim = (float(x) for x in one.split()[4:7])
    assert 20 < params < 22 and grads < 0.2 and optim < 0.2 and "yes" in one.split()


def test_the_plan_refuses_what_train_refuses_of_lora_and_offers_no_lora_on_random_weights(capfd):
    """LoRA on a layer the family lacks or on random weights is refused in train's line, not printed as a
    command that train then refuses; a --random-init model that fits nowhere is not offered LoRA."""
    base = ["plan", "--model", "google/flan-t5-xxl", "--gpus", "1", "--gpu-mem", "48", "--cpu-mem", "256"]
    refused(capfd, [*base, "--lora-r", "4", "--lora-targets", "q,bogus"], "--lora-targets", "bogus")
    refused(capfd, [*base, "--lora-r", "4", "--random-init"], "--lora-r trains adapters on a pretrained model's frozen "
            "weights, and this run's model has random weights")  # fmt: skip
    assert main([*base, "--random-init"]) == 0
    out = capfd.readouterr().out
    assert "fits: nothing as asked" in out.splitlines() and "--lora-r" not in out, out


def test_the_printed_lora_command_runs(tmp_path, capsys, monkeypatch):
    """A model only LoRA fits on: the plan's command, run as printed (with data), trains adapters."""
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    model = _model_dir(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"source": f"item {i}", "target": str(i)}) + "\n" for i in range(16)))
    out = _plan_output(capsys, "--model", str(model), "--gpus", "1", "--gpu-mem", "0.0006", "--cpu-mem", "0.0008",
                       "--max-source-length", "16", "--max-target-length", "8", "--data", str(data), "--steps", "2",
                       "--output-dir", str(tmp_path / "run"), "--quiet")  # fmt: skip
    command = shlex.split(out.splitlines()[-1])
    assert command[:2] == ["fastseq", "train"] and "--lora-r" in command, out
    assert main(command[1:]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
