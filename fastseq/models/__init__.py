"""Native models, and the registry that maps a config.json to a model class."""

from __future__ import annotations

from .base import EncoderOutput, PreTrainedModel, Seq2SeqOutput
from .blenderbot_small import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration
from .longt5 import LongT5Config, LongT5EncoderModel, LongT5ForConditionalGeneration
from .t5 import T5Config, T5EncoderModel, T5ForConditionalGeneration

# model_type -> (config class, {architecture name: model class}, default architecture)
FAMILIES: dict[str, tuple[type, dict[str, type], str]] = {
    "t5": (
        T5Config,
        {"T5ForConditionalGeneration": T5ForConditionalGeneration, "T5EncoderModel": T5EncoderModel},
        "T5ForConditionalGeneration",
    ),
    "mt5": (
        T5Config,
        {"MT5ForConditionalGeneration": T5ForConditionalGeneration, "MT5EncoderModel": T5EncoderModel},
        "MT5ForConditionalGeneration",
    ),
    "longt5": (
        LongT5Config,
        {
            "LongT5ForConditionalGeneration": LongT5ForConditionalGeneration,
            "LongT5EncoderModel": LongT5EncoderModel,
        },
        "LongT5ForConditionalGeneration",
    ),
    "blenderbot-small": (
        BlenderbotSmallConfig,
        {"BlenderbotSmallForConditionalGeneration": BlenderbotSmallForConditionalGeneration},
        "BlenderbotSmallForConditionalGeneration",
    ),
}


def architecture_name(model: PreTrainedModel) -> str:
    """The Hugging Face architecture name to write into config.json for a model."""
    _, classes, _ = FAMILIES[model.config.model_type]
    for name, cls in classes.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a model of family {model.config.model_type!r}")


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
    "architecture_name",
]
