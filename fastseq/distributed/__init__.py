"""DeepSpeed for fastseq: ZeRO stages 1-3 with offload, pipeline stages for the encoder-decoder,
checkpoints that resume exactly and convert back to Hugging Face directories, and a memory planner.

Everything here runs under the `deepspeed` launcher (`DS_ACCELERATOR=cpu` and gloo on a CPU)."""

from .config import load as load_config
from .config import resolve as resolve_config

__all__ = ["load_config", "resolve_config"]
