"""fastseq: fast training of T5-family encoder-decoder models."""

from . import presets
from .checkpoint import CheckpointError, from_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = ["CheckpointError", "from_pretrained", "presets", "save_pretrained", "__version__"]
