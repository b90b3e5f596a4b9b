"""The DeepSpeed engines of the training loop: `DeepSpeedEngine` (what ZeRO and pipeline stages
share: the process group, checkpoints through DeepSpeed, collectives) and `ZeroEngine`
(ZeRO stages 1-3, with offload).

    deepspeed --num_gpus 8 --module fastseq.train --deepspeed configs/deepspeed/zero3.json \\
        --model google/t5-v1_1-xl --tokenizer DIR --data train.jsonl --batch-size 8 --lr 1e-4

Data parallelism: every rank reads the same stream and takes every world-th micro-batch, so the
stream position in a checkpoint is the same on every rank, and N ranks with accumulation A see the
micro-batches one process would see with accumulation N x A.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR

from fastseq.checkpoint import from_pretrained, resolve_dtype
from fastseq.optim import make_optimizer
from fastseq.train.args import TrainArgs
from fastseq.train.engine import (
    Engine,
    NonFiniteError,
    add_lora,
    apply_rates,
    copy_model_files,
    model_class,
    schedule,
    trained_parameters,
)
from fastseq.train.state import keep_global_batch

from . import config as ds_config
from . import reshard, zero
from .convert import safe_torch_load, write_model
from .partitions import layouts, parameter_names, spread_adafactor

log = logging.getLogger("fastseq.distributed")

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # what DeepSpeed's save_checkpoint adds


def remove_recovery_scripts(directory: Path) -> None:
    """Remove the copies of DeepSpeed's consolidation scripts that its save_checkpoint writes beside
    every ZeRO checkpoint (into the directory holding it; it has no option to leave them out).
    `fastseq convert --from-deepspeed` does their job without unpickling. Only DeepSpeed's own copies
    go: a file of that name with other contents is kept."""
    import deepspeed

    for script in RECOVERY_SCRIPTS:
        copy, original = directory / script, Path(deepspeed.__file__).parent / "utils" / script
        if copy.is_file() and original.is_file() and copy.read_bytes() == original.read_bytes():
            copy.unlink()


def release_shared_memory() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce once every rank has mapped
    every buffer (DeepSpeed maps them all while it initializes and never unlinks them: each
    two-rank run left 2 x 66 MB in /dev/shm until the tmpfs filled and the OOM killer ended runs).
    The mappings stay valid; only the name goes. Call it on every rank after
    `deepspeed.init_distributed` on the CPU (the engines here do)."""
    torch.distributed.barrier()
    rank = torch.distributed.get_rank()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}"
    buffer = Path("/dev/shm") / f"{name}_{rank}"
    if buffer.exists():
        buffer.unlink()


class DeepSpeedEngine(Engine):
    """The process group (NCCL on GPUs, gloo on the CPU) and the resolved DeepSpeed config."""

    def __init__(self, args: TrainArgs, model_config, raw_config: dict):
        import deepspeed

        self.args = args
        on_gpu = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.node_first = int(os.environ.get("LOCAL_RANK", 0)) == 0
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if on_gpu else torch.device("cpu")
        if on_gpu:
            torch.cuda.set_device(self.device)
        else:
            release_shared_memory()
        if args.resume and not ds_config.pipeline_stages(raw_config):
            line = keep_global_batch(args, self.world)
            if line and self.rank == 0:
                log.warning(line)
        self.config = ds_config.resolve_run(raw_config, args, model_config, self.world, on_gpu=on_gpu)
        self.data_parallel, self.data_rank = self.world, self.rank
        self.model_config = model_config
        self.engine = None

    def on_first_rank(self, fn, *args):
        outcome = [None, None]
        if self.rank == 0:
            try:
                outcome[0] = fn(*args)
            except (ValueError, OSError) as err:
                outcome[1] = err
        torch.distributed.broadcast_object_list(outcome, src=0)
        if outcome[1] is not None:
            raise outcome[1]
        return outcome[0]

    def sum_over_ranks(self, values):
        summed = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(summed)
        return summed.tolist()

    def barrier(self):
        torch.distributed.barrier()

    def close(self):
        """Leave the process group: its communication threads are joined now, not torn down by the
        interpreter's exit (a rank once aborted there with "terminate called without an active
        exception" after a finished ZeRO-3 run, and the launcher counted the run as failed)."""
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

    def learning_rate(self):
        return self.lr_scheduler.get_last_lr()[0]

    def save(self, directory):
        """DeepSpeed's files (model, optimizer and schedule, each rank its partitions) and config.json;
        under LoRA the model's files hold the adapters only (the base is `--model`'s)."""
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, save_latest=False,
                                    exclude_frozen_parameters=self.adapters is not None)  # fmt: skip
        if self.rank == 0:
            self.write_config(directory)
            remove_recovery_scripts(directory.parent)
        return {}

    def save_model_of(self, checkpoint, out):
        """Rank 0 writes the model of `checkpoint` at `out` from its files, as `fastseq convert
        --from-deepspeed` does (the fp32 weights of every rank's partitions, or the pipeline stages'
        layers); under LoRA the checkpoint holds its adapters in peft's format: they are copied."""
        if self.rank != 0:
            return
        if self.adapters is not None:
            copy_model_files(checkpoint, out)
            return
        write_model(checkpoint, out)

    def write_config(self, directory: Path) -> None:
        import json

        (directory / "config.json").write_text(json.dumps(self.model_config.to_hf_dict(), indent=2) + "\n")

    def set_rates(self, lr, weight_decay):
        apply_rates(self.engine.optimizer, self.lr_scheduler, lr, weight_decay)

    def load(self, directory, meta):
        with safe_torch_load():  # DeepSpeed's readers unpickle: only tensors and plain values
            # Under LoRA the files hold the adapters only (the run's identity, checked before, holds their settings).
            path, _ = self.engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                                  load_lr_scheduler_states=True,
                                                  load_module_strict=self.adapters is None)  # fmt: skip
        if path is None:
            raise FileNotFoundError(f"--resume: DeepSpeed found no engine checkpoint in {directory}")


class ZeroEngine(DeepSpeedEngine):
    """ZeRO stages 1-3 (with CPU/NVMe offload). Under ZeRO-3 the model is built inside
    `deepspeed.zero.Init` (each rank holds its partitions only) and filled from the checkpoint
    directory or initialized module by module."""

    def __init__(self, args: TrainArgs, model_config, raw_config: dict):
        super().__init__(args, model_config, raw_config)
        self.stage = ds_config.zero_stage(self.config)
        self.name = f"DeepSpeed ZeRO-{self.stage}, {self.world} ranks"
        self.kind = f"DeepSpeed ZeRO-{self.stage}"

    def save_adapters(self, directory: Path) -> None:
        """Under LoRA, rank 0 writes the adapters in peft's format (gathered under ZeRO-3; every rank calls this)."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(trained_parameters(self.model), enabled=self.stage == 3):
            if self.rank == 0:
                self.save_weights(directory)

    def save(self, directory):
        """DeepSpeed's files, and this rank's `layout-RANK.json` (what re-partitioning reads); under
        LoRA also the adapters in peft's format, as one process's checkpoints have them."""
        meta = super().save(directory)
        if self.adapters is not None:
            self.save_adapters(directory)
        reshard.write_layouts(directory, self.rank, layouts(self.engine.optimizer, parameter_names(self.model)))
        return {**meta, "ranks": self.world, "stage": self.stage, "layouts": True}

    def repartitions(self, directory, state) -> bool:
        """Whether this run resumes the ZeRO checkpoint `directory` (its trainer state `state`) by
        re-partitioning it: another number of ranks or another stage, and the layouts to do it."""
        return (state.get("engine_kind") or "").startswith("DeepSpeed ZeRO") and self._repartitions(state["engine"])

    def _repartitions(self, meta: dict) -> bool:
        """Whether the checkpoint whose engine state is `meta` was written on other ranks or another
        stage, with the layouts that re-partitioning reads."""
        other = (meta.get("ranks"), meta.get("stage")) != (self.world, self.stage)
        return other and meta.get("layouts") is True

    def rank_files(self, directory, state):
        """DeepSpeed's files this rank reads: its partition of the optimizer (and under ZeRO-3 of the
        model), and under ZeRO-1/2 the model that rank 0 wrote; re-partitioning reads every saved
        rank's optimizer partition and layout."""
        if self.repartitions(directory, state):
            ranks = range(state["world_size"])
            optimizer = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks]
            return optimizer + [reshard.layout_file(r) for r in ranks]
        own = f"zero_pp_rank_{self.rank}_mp_rank_00"
        if self.stage == 3:
            return [f"{own}_optim_states.pt", f"{own}_model_states.pt"]
        return [f"{own}_optim_states.pt", "mp_rank_00_model_states.pt"]

    def load(self, directory, meta):
        if not self._repartitions(meta):
            super().load(directory, meta)
            return
        states = reshard.load(directory, meta["ranks"], self.engine.optimizer, self.model)
        self.lr_scheduler.load_state_dict(states["lr_scheduler"])
        if isinstance(self.lr_scheduler, LambdaLR):
            for group, lr in zip(self.engine.optimizer.param_groups, self.lr_scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        engine = self.engine
        engine.global_steps, engine.global_samples = states["global_steps"], states["global_samples"]
        engine.skipped_steps = states["skipped_steps"]

    def build(self, model_config) -> None:
        import deepspeed

        args, config = self.args, self.config
        model = self.build_model(model_config)
        model.gradient_checkpointing_enable(args.gradient_checkpointing)
        self.adapters = add_lora(args, model, None)  # DeepSpeed casts the model to the config's precision
        optimizer = None
        if "optimizer" not in config:
            optimizer = make_optimizer(args.optimizer, trained_parameters(model), lr=args.learning_rate(),
                                       weight_decay=args.weight_decay)  # fmt: skip
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=None if optimizer else trained_parameters(model),
            lr_scheduler=schedule(args), config=config,
        )  # fmt: skip
        spread_adafactor(self.engine.optimizer, model)
        self.engine.train()
        self.model = model

    def build_model(self, model_config):
        """The model, on this rank's device (under ZeRO-3: this rank's partitions)."""
        import deepspeed

        cls = model_class(model_config)
        pretrained = self.args.pretrained
        if self.stage == 3:
            # dtype=None: zero.Init then takes the precision from the config's bf16/fp16 sections. An explicit
            # dtype goes through DeepSpeed's accelerator probe instead (`dtype or fp16 if is_fp16_supported()
            # else bf16 ...`), which on a CPU without oneDNN fp16 support builds an fp32 run's parameters in bf16.
            with deepspeed.zero.Init(config_dict_or_path=self.config, dtype=None):
                model = cls(model_config)
            zero.check_dtype(model, resolve_dtype(ds_config.precision(self.config)))
            if pretrained:
                zero.load_partitioned(model, self.args.model)
            else:
                zero.init_partitioned(model)
            zero.register_external_parameters(model)
            return model
        if pretrained:
            model = from_pretrained(self.args.model)
        else:
            with torch.device(self.device):
                model = cls(model_config)
        return model.to(self.device)

    def forward_backward(self, micro_batches):
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            loss = self.engine(**batch, label_smoothing=self.args.label_smoothing).loss
            self.engine.backward(loss)
            if i < len(micro_batches) - 1:  # within accumulation: DeepSpeed only counts the micro-step
                self.engine.step()
            total += loss.detach().float() / len(micro_batches)
        return total

    def step(self):
        self.engine.step()  # the accumulation boundary: the optimizer steps
        norm = self.engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        if norm is not None and not math.isfinite(norm):
            raise NonFiniteError(f"the gradient norm is {norm}")
        return norm

    def save_model(self, out, checkpoint):
        """Rank 0 writes the model as a Hugging Face directory; under ZeRO-3 the parameters are
        gathered one at a time into rank 0's CPU memory. Under LoRA: the adapters."""
        if self.adapters is not None:
            self.save_adapters(out)
            return
        state = zero.gathered_state_dict(self.model) if self.stage == 3 else None
        if self.rank != 0:
            return
        if state is None:
            self.model.save_pretrained(out)
            return
        with torch.device("meta"):
            full = model_class(self.model_config)(self.model_config)
        full.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
        full.tie_weights()
        full.save_pretrained(out)
