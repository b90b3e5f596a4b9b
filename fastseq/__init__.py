"""fastseq: fast training of T5-family encoder-decoder models."""

from . import presets
from .checkpoint import CheckpointError, from_pretrained, save_pretrained

# `fastseq.patch(model)`; the module stays importable as fastseq.patch
from .patch import patch, patch_transformers, unpatch, unpatch_transformers

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "from_pretrained",
    "patch",
    "patch_transformers",
    "presets",
    "save_pretrained",
    "unpatch",
    "unpatch_transformers",
    "__version__",
]
