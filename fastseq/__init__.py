"""fastseq: fast training of T5-family encoder-decoder models.

The names below are imported when first used, so that `import fastseq` (and the `fastseq` command,
which installs its signal handlers first) does not wait for torch."""

import importlib
import sys
import types

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    "CheckpointError": "checkpoint",
    "from_pretrained": "checkpoint",
    "save_pretrained": "checkpoint",
    "patch": "patch",
    "patch_transformers": "patch",
    "unpatch": "patch",
    "unpatch_transformers": "patch",
}

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


def __getattr__(name: str):
    if name == "presets":
        return importlib.import_module(".presets", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`fastseq.patch` is the function `fastseq.patch(model)`; the module stays importable as
    `fastseq.patch` (in sys.modules), as when the function was imported over it eagerly."""

    def __setattr__(self, name: str, value) -> None:
        if name == "patch" and isinstance(value, types.ModuleType):
            value = value.patch
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
