"""DeepSpeed for fastseq: ZeRO stages 1-3 with offload, pipeline stages for the encoder-decoder,
checkpoints that resume exactly and convert back to Hugging Face directories, and a memory planner.

Everything here runs under the `deepspeed` launcher (`DS_ACCELERATOR=cpu` and gloo on a CPU)."""

from __future__ import annotations

from .config import load as load_config
from .config import resolve as resolve_config


def deepspeed_engine(args, model_config):
    """The engine `--deepspeed CONFIG` asks for: pipeline stages when the config has a "pipeline"
    section, ZeRO otherwise. It joins the process group; the model is built by `engine.build`."""
    from . import config as ds_config

    raw = ds_config.load(args.deepspeed)
    ds_config.require_launcher()
    if ds_config.pipeline_stages(raw):
        from .pipeline import PipelineEngine

        if args.lora_r:
            raise ValueError(
                f"--lora-r: LoRA runs on one process or under ZeRO, not on pipeline stages ({args.deepspeed}); "
                "pass --deepspeed zero2 or zero3 (the frozen base is partitioned under ZeRO-3)"
            )
        return PipelineEngine(args, model_config, raw)
    from .engine import ZeroEngine

    return ZeroEngine(args, model_config, raw)


__all__ = ["deepspeed_engine", "load_config", "resolve_config"]
