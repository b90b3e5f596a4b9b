"""fastseq.kernels: the fused ops of fastseq, each with its PyTorch reference.

Every public function dispatches on `FASTSEQ_BACKEND` (see `_backend`).
"""

from . import _versions
from ._backend import backend, interpreting
from .bucketed_attention import PositionBias, bucketed_attention, relative_position_bucket
from .gated_gelu import gated_ffn, gated_gelu, relu_ffn
from .global_aggregate import global_aggregate, global_block_ids
from .linear_cross_entropy import linear_cross_entropy
from .local_attention import local_attention
from .rms_norm import rms_norm

if interpreting():
    _versions.fix_interpreter()

__all__ = [
    "PositionBias",
    "backend",
    "bucketed_attention",
    "gated_ffn",
    "gated_gelu",
    "global_aggregate",
    "global_block_ids",
    "linear_cross_entropy",
    "local_attention",
    "relative_position_bucket",
    "relu_ffn",
    "rms_norm",
]
