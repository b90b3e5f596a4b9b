"""fastseq: fast training of T5-family encoder-decoder models."""

from . import presets
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .patch import patch, unpatch  # `fastseq.patch(model)`; the module stays importable as fastseq.patch

__version__ = "0.1.0"

__all__ = ["CheckpointError", "from_pretrained", "patch", "presets", "save_pretrained", "unpatch", "__version__"]
