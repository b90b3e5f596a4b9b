"""`fastseq train`: one training loop (`loop.train`) on an engine (`engine.LocalEngine`, or the
DeepSpeed engines of `fastseq.distributed`), configured by a `TrainArgs`.

With no arguments it runs the embedded default: a small T5 v1.1 with the ByT5 tokenizer, trained
on a synthetic text-to-text task generated in memory (reverse a word), on whatever device is
there. `python -m fastseq.train ...` is `fastseq train ...` (what the `deepspeed` launcher runs)."""

from .args import TrainArgs
from .loop import evaluate, train

__all__ = ["TrainArgs", "evaluate", "train"]
