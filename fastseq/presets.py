"""Named configurations of the published checkpoints (their config.json hyperparameters).

UMT5 (`google/umt5-*`) has no preset: its attention keeps a bias table in every layer, which the
native T5 model does not; `fastseq.patch` runs UMT5 models of `transformers`.

`PRESETS[name]` is the family and the config fields; `config(name)` builds the
config object and `build(name)` the model (pass `device="meta"` to build an
11B model without allocating it).
"""

from __future__ import annotations

from typing import Any

import torch

from .models import FAMILIES, PreTrainedModel

_T5_V10 = dict(feed_forward_proj="relu", tie_word_embeddings=True, vocab_size=32128)
_T5_V11 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=32128)
_MT5 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=250112, model_type="mt5")
_BYT5 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, vocab_size=384)
_LONGT5 = dict(
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    vocab_size=32128,
    local_radius=127,
    global_block_size=16,
)


def _t5(d_model, d_ff, d_kv, heads, layers, decoder_layers=None, **base) -> dict[str, Any]:
    return dict(
        base,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv,
        num_heads=heads,
        num_layers=layers,
        num_decoder_layers=decoder_layers if decoder_layers is not None else layers,
    )


# name -> (model_type, config fields)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "t5-small": ("t5", _t5(512, 2048, 64, 8, 6, **_T5_V10)),
    "t5-base": ("t5", _t5(768, 3072, 64, 12, 12, **_T5_V10)),
    "t5-large": ("t5", _t5(1024, 4096, 64, 16, 24, **_T5_V10)),
    "t5-3b": ("t5", _t5(1024, 16384, 128, 32, 24, **_T5_V10)),
    "t5-11b": ("t5", _t5(1024, 65536, 128, 128, 24, **_T5_V10)),
    "google/t5-v1_1-small": ("t5", _t5(512, 1024, 64, 6, 8, **_T5_V11)),
    "google/t5-v1_1-base": ("t5", _t5(768, 2048, 64, 12, 12, **_T5_V11)),
    "google/t5-v1_1-large": ("t5", _t5(1024, 2816, 64, 16, 24, **_T5_V11)),
    "google/t5-v1_1-xl": ("t5", _t5(2048, 5120, 64, 32, 24, **_T5_V11)),
    "google/t5-v1_1-xxl": ("t5", _t5(4096, 10240, 64, 64, 24, **_T5_V11)),
    # FLAN-T5: T5 v1.1's architecture and vocabulary (32,128 ids for 32,100 tokens), instruction-tuned.
    "google/flan-t5-small": ("t5", _t5(512, 1024, 64, 6, 8, **_T5_V11)),
    "google/flan-t5-base": ("t5", _t5(768, 2048, 64, 12, 12, **_T5_V11)),
    "google/flan-t5-large": ("t5", _t5(1024, 2816, 64, 16, 24, **_T5_V11)),
    "google/flan-t5-xl": ("t5", _t5(2048, 5120, 64, 32, 24, **_T5_V11)),
    "google/flan-t5-xxl": ("t5", _t5(4096, 10240, 64, 64, 24, **_T5_V11)),
    "google/mt5-small": ("mt5", _t5(512, 1024, 64, 6, 8, **_MT5)),
    "google/mt5-base": ("mt5", _t5(768, 2048, 64, 12, 12, **_MT5)),
    "google/mt5-large": ("mt5", _t5(1024, 2816, 64, 16, 24, **_MT5)),
    "google/mt5-xl": ("mt5", _t5(2048, 5120, 64, 32, 24, **_MT5)),
    "google/mt5-xxl": ("mt5", _t5(4096, 10240, 64, 64, 24, **_MT5)),
    "google/byt5-small": ("t5", _t5(1472, 3584, 64, 6, 12, 4, **_BYT5)),
    "google/byt5-base": ("t5", _t5(1536, 3968, 64, 12, 18, 6, **_BYT5)),
    "google/byt5-large": ("t5", _t5(1536, 3840, 64, 16, 36, 12, **_BYT5)),
    "google/byt5-xl": ("t5", _t5(2560, 6720, 64, 32, 36, 12, **_BYT5)),
    "google/byt5-xxl": ("t5", _t5(4672, 12352, 64, 64, 36, 12, **_BYT5)),
    "google/long-t5-local-base": ("longt5", _t5(768, 2048, 64, 12, 12, encoder_attention_type="local", **_LONGT5)),
    "google/long-t5-local-large": ("longt5", _t5(1024, 2816, 64, 16, 24, encoder_attention_type="local", **_LONGT5)),
    "google/long-t5-local-xl": ("longt5", _t5(2048, 5120, 64, 32, 24, encoder_attention_type="local", **_LONGT5)),
    "google/long-t5-tglobal-base": (
        "longt5",
        _t5(768, 2048, 64, 12, 12, encoder_attention_type="transient-global", **_LONGT5),
    ),
    "google/long-t5-tglobal-large": (
        "longt5",
        _t5(1024, 2816, 64, 16, 24, encoder_attention_type="transient-global", **_LONGT5),
    ),
    "google/long-t5-tglobal-xl": (
        "longt5",
        _t5(2048, 5120, 64, 32, 24, encoder_attention_type="transient-global", **_LONGT5),
    ),
    "facebook/blenderbot_small-90M": (
        "blenderbot-small",
        dict(
            vocab_size=54944,
            max_position_embeddings=512,
            d_model=512,
            encoder_layers=8,
            decoder_layers=8,
            encoder_attention_heads=16,
            decoder_attention_heads=16,
            encoder_ffn_dim=2048,
            decoder_ffn_dim=2048,
            activation_function="gelu",
            dropout=0.1,
            attention_dropout=0.0,
            activation_dropout=0.0,
            scale_embedding=True,
            init_std=0.02,
        ),
    ),
}


def _lookup(name: str) -> tuple[str, dict[str, Any]]:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def config(name: str, **overrides: Any):
    """The config object of a preset, with fields overridden by keyword."""
    model_type, fields = _lookup(name)
    config_cls, _, _ = FAMILIES[model_type]
    return config_cls(**{**fields, **overrides})


def build(
    name: str, *, device: torch.device | str | None = None, encoder_only: bool = False, **overrides: Any
) -> PreTrainedModel:
    """A freshly initialised model of a preset (on `device`; "meta" allocates nothing)."""
    model_type, _ = _lookup(name)
    _, classes, default = FAMILIES[model_type]
    cls = classes[default]
    if encoder_only:
        encoders = [c for n, c in classes.items() if n.endswith("EncoderModel")]
        if not encoders:
            raise ValueError(f"preset {name!r} ({model_type}) has no encoder-only model")
        cls = encoders[0]
    with torch.device(device or "cpu"):
        return cls(config(name, **overrides))
