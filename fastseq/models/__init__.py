"""Native models, and the registry that maps a config.json to a model class."""

from __future__ import annotations

from .base import EncoderOutput, PreTrainedModel, Seq2SeqOutput
from .blenderbot_small import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
from .longt5 import LongT5Config, LongT5EncoderModel, LongT5ForConditionalGeneration
from .t5 import T5Config, T5EncoderModel, T5ForConditionalGeneration

_CONFIGS = {"t5": T5Config, "mt5": T5Config, "longt5": LongT5Config, "blenderbot-small": BlenderbotSmallConfig}
# The seq2seq class first: it is a family's default.
_CLASSES = (
    T5ForConditionalGeneration,
    T5EncoderModel,
    LongT5ForConditionalGeneration,
    LongT5EncoderModel,
    BlenderbotSmallForConditionalGeneration,
)
# model_type -> (config class, {architecture name: model class}, default architecture), from each class's
# `hf_architectures`.
FAMILIES: dict[str, tuple[type, dict[str, type], str]] = {}
for _type, _config in _CONFIGS.items():
    _named = {cls.hf_architectures[_type]: cls for cls in _CLASSES if _type in cls.hf_architectures}
    FAMILIES[_type] = (_config, _named, next(iter(_named)))


__all__ = [
    "FAMILIES",
    "BlenderbotSmallConfig",
    "BlenderbotSmallForConditionalGeneration",
    "EncoderOutput",
    "LongT5Config",
    "LongT5EncoderModel",
    "LongT5ForConditionalGeneration",
    "PreTrainedModel",
    "Seq2SeqOutput",
    "T5Config",
    "T5EncoderModel",
    "T5ForConditionalGeneration",
]
