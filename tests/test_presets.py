"""Every preset builds on the meta device with the published parameter count."""

from __future__ import annotations

import pytest

from fastseq import presets

# Parameter counts of the published checkpoints (Hugging Face model cards and the papers).
PUBLISHED = {
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "t5-large": 737_668_096,
    "t5-3b": 2_851_598_336,
    "t5-11b": 11_307_321_344,
    "google/t5-v1_1-small": 76_961_152,
    "google/t5-v1_1-base": 247_577_856,
    "google/t5-v1_1-large": 783_150_080,
    "google/t5-v1_1-xl": 2_849_757_184,
    "google/t5-v1_1-xxl": 11_135_332_352,
    "google/flan-t5-small": 76_961_152,
    "google/flan-t5-base": 247_577_856,
    "google/flan-t5-large": 783_150_080,
    "google/flan-t5-xl": 2_849_757_184,
    "google/flan-t5-xxl": 11_135_332_352,
    "google/mt5-small": 300_176_768,
    "google/mt5-base": 582_401_280,
    "google/mt5-large": 1_229_581_312,
    "google/mt5-xl": 3_742_619_648,
    "google/mt5-xxl": 12_921_057_280,
    "google/byt5-small": 299_637_760,
    "google/byt5-base": 581_653_248,
    "google/byt5-large": 1_228_183_552,
    "google/byt5-xl": 3_737_801_728,
    "google/byt5-xxl": 12_906_899_328,
    "google/long-t5-local-base": 247_577_856,
    "google/long-t5-local-large": 783_150_080,
    "google/long-t5-local-xl": 2_849_757_184,
    "google/long-t5-tglobal-base": 247_587_456,
    "google/long-t5-tglobal-large": 783_175_168,
    "google/long-t5-tglobal-xl": 2_849_807_360,
    "facebook/blenderbot_small-90M": 87_508_992,
}


def test_every_preset_has_a_published_count():
    assert set(PUBLISHED) == set(presets.PRESETS)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count(name):
    model = presets.build(name, device="meta")
    assert model.num_parameters() == PUBLISHED[name]
    assert all(p.is_meta for p in model.parameters())


def test_rounded_sizes_from_the_issue():
    for name, size in [
        ("t5-small", 60.5e6),
        ("t5-base", 222.9e6),
        ("t5-large", 737.7e6),
        ("t5-3b", 2.85e9),
        ("t5-11b", 11.3e9),
        ("google/mt5-xxl", 12.9e9),
    ]:
        count = presets.build(name, device="meta").num_parameters()
        assert abs(count - size) / size < 0.002, (name, count)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="unknown preset 't5-huge'.*t5-small"):
        presets.config("t5-huge")


def test_encoder_only_and_overrides():
    model = presets.build("google/long-t5-tglobal-base", device="meta", encoder_only=True, num_layers=2)
    assert type(model).__name__ == "LongT5EncoderModel"
    assert len(model.encoder.block) == 2
    with pytest.raises(ValueError, match="no encoder-only model"):
        presets.build("facebook/blenderbot_small-90M", device="meta", encoder_only=True)


# The published config.json fields of the FLAN-T5 checkpoints (google/flan-t5-*): v1.1 layout, own head.
FLAN_T5 = {
    "small": dict(d_model=512, d_ff=1024, num_heads=6, num_layers=8),
    "base": dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12),
    "large": dict(d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    "xl": dict(d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
    "xxl": dict(d_model=4096, d_ff=10240, num_heads=64, num_layers=24),
}


@pytest.mark.parametrize("size", list(FLAN_T5))
def test_flan_t5_presets_are_the_published_configs(size):
    config = presets.config(f"google/flan-t5-{size}")
    published = dict(FLAN_T5[size], vocab_size=32128, d_kv=64, relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     decoder_start_token_id=0, eos_token_id=1)  # fmt: skip
    published["num_decoder_layers"] = published["num_layers"]
    assert {k: getattr(config, k) for k in published} == published
    assert config.scale_decoder_outputs is False  # an own head: no rescaling (transformers' scale_decoder_outputs)


def test_there_is_no_umt5_preset():
    """UMT5 keeps a bias table per layer, which the native T5 does not: fastseq runs it only patched."""
    assert not [name for name in presets.PRESETS if "umt5" in name]
