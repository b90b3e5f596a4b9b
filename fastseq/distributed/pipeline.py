"""Pipeline stages as an engine of the training loop: `PipelineEngine` runs DeepSpeed's pipeline
schedule over the layers of `fastseq.distributed.stages`, each rank building only its stage."""

from __future__ import annotations

from pathlib import Path

import torch

from fastseq.optim import make_optimizer
from fastseq.train.engine import schedule

from .config import pipeline_stages
from .convert import convert
from .engine import DeepSpeedEngine
from .partitions import spread_adafactor
from .stages import init_random, load_directory, pipeline_module, stage_inputs


class PipelineEngine(DeepSpeedEngine):
    """`stages` pipeline stages x (ranks / stages) data-parallel replicas. One `train_batch` runs a
    step's micro-batches through the schedule, backward and the optimizer step included, so the
    loss is known only after the step (a non-finite one still stops the run before any save).
    Held-out evaluation needs the whole model on one rank: evaluate the converted directory."""

    def __init__(self, args, model_config, raw_config: dict):
        super().__init__(args, model_config, raw_config)
        self.stages = pipeline_stages(self.config)
        self.data_parallel = self.world // self.stages
        self.name = f"DeepSpeed pipeline, {self.stages} stages x {self.data_parallel} data-parallel"
        self.kind = f"DeepSpeed pipeline of {self.stages} stages"

    def build(self, model_config) -> None:
        import deepspeed

        args = self.args
        interval = int(self.config["pipeline"].get("activation_checkpoint_interval", 0))
        if args.gradient_checkpointing and not interval:
            interval = 1
        module = pipeline_module(model_config, self.stages, activation_checkpoint_interval=interval,
                                 label_smoothing=args.label_smoothing)  # fmt: skip
        if args.pretrained:
            load_directory(module, model_config, args.model)
        else:
            init_random(module, model_config)
        module.to(self.device)
        optimizer = make_optimizer(args.optimizer, [p for p in module.parameters() if p.requires_grad],
                                   lr=args.learning_rate(), weight_decay=args.weight_decay)  # fmt: skip
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule(args), config=self.config
        )
        spread_adafactor(self.engine.optimizer, module)
        self.data_rank = self.engine.grid.data_parallel_id
        self.model_config = model_config

    def forward_backward(self, micro_batches):
        inputs = iter((stage_inputs(self.model_config, b), b["labels"]) for b in micro_batches)
        return self.engine.train_batch(data_iter=inputs)  # the mean over the data-parallel ranks, on every stage

    def step(self):
        return None  # `train_batch` has stepped

    def save_model(self, out: Path, checkpoint: Path) -> None:
        """The model as a Hugging Face directory, written by rank 0 from the checkpoint's layer files."""
        if self.rank == 0:
            convert(checkpoint, out)
        torch.distributed.barrier()
