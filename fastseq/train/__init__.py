"""`fastseq train`: one training loop (`loop.train`) on an engine (`engine.LocalEngine`, or the
DeepSpeed engines of `fastseq.distributed`), configured by a `TrainArgs`.

With no arguments it runs the embedded default: a small T5 v1.1 with the ByT5 tokenizer, trained
on a synthetic text-to-text task generated in memory (reverse a word), on whatever device is
there. `python -m fastseq.train ...` is `fastseq train ...` (what the `deepspeed` launcher runs).
The names below are imported when first used (`fastseq.train.signals` is read before torch)."""

import importlib

_LAZY = {"TrainArgs": "args", "evaluate": "loop", "train": "loop"}  # name -> the module that defines it

__all__ = ["TrainArgs", "evaluate", "train"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
