"""Shared helpers: tiny random Hugging Face models of every family, batches with padding, comparisons."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never reach the Hugging Face Hub (huggingface_hub reads this when it is first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Without a GPU the Triton kernels run on the CPU through Triton's interpreter. Triton reads this
# when a kernel is decorated, so it is set before anything imports fastseq.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Every configuration the parity tests cover. Sizes are tiny; lengths exceed
# max_distance so the logarithmic buckets are exercised.
T5_BASE = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
KINDS = {
    "t5_v10_tied": ("t5", dict(T5_BASE, feed_forward_proj="relu")),
    "t5_v11_untied": ("t5", dict(T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mt5_like": (
        "mt5",
        dict(
            T5_BASE,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            vocab_size=151,
            num_layers=3,
            num_decoder_layers=2,
        ),
    ),
    "byt5_like": (
        "t5",
        dict(
            T5_BASE,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            vocab_size=384,
            num_layers=3,
            num_decoder_layers=1,
        ),
    ),
    "longt5_local": (
        "longt5",
        dict(
            T5_BASE,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            encoder_attention_type="local",
            local_radius=3,
            global_block_size=4,
        ),
    ),
    "longt5_tglobal": (
        "longt5",
        dict(
            T5_BASE,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            encoder_attention_type="transient-global",
            local_radius=3,
            global_block_size=4,
        ),
    ),
    "blenderbot_small": (
        "blenderbot-small",
        dict(
            vocab_size=97,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
    ),
}


def hf_model(kind: str, *, encoder_only: bool = False, seed: int = 0):
    """A tiny random `transformers` model of `kind`, eager attention, eval mode."""
    import transformers as tf

    model_type, fields = KINDS[kind]
    torch.manual_seed(seed)
    if model_type in ("t5", "mt5"):
        cfg_cls = tf.MT5Config if model_type == "mt5" else tf.T5Config
        prefix = "MT5" if model_type == "mt5" else "T5"
    elif model_type == "longt5":
        cfg_cls, prefix = tf.LongT5Config, "LongT5"
    else:
        cfg_cls, prefix = tf.BlenderbotSmallConfig, "BlenderbotSmall"
    config = cfg_cls(**fields)
    config._attn_implementation = "eager"
    cls = getattr(tf, f"{prefix}EncoderModel" if encoder_only else f"{prefix}ForConditionalGeneration")
    model = cls(config)
    if not fields.get("tie_word_embeddings", True) and hasattr(model, "lm_head"):
        # transformers 5 keeps T5 heads tied in memory; give the model a head of its own, as v1.1 has.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    if model_type == "blenderbot-small" and not encoder_only:
        model.final_logits_bias.normal_()
    # Random norms, so a mix-up of two norm weights cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight") or "layernorm" in name or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def batch(kind: str, *, B: int = 3, Le: int = 23, Ld: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """Encoder inputs with right padding, left padding and padding inside a row; labels padded with -100."""
    _, fields = KINDS[kind]
    vocab = fields["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (B, Le), generator=g)
    mask = torch.ones(B, Le, dtype=torch.long)
    mask[0, Le - 5 :] = 0  # right padding
    if B > 1:
        mask[1, :4] = 0  # left padding
    if B > 2:
        mask[2, 9:13] = 0  # a hole in the middle
    input_ids = input_ids.masked_fill(mask == 0, 0)
    labels = torch.randint(3, vocab, (B, Ld), generator=g)
    dmask = torch.ones(B, Ld, dtype=torch.long)
    dmask[0, Ld - 3 :] = 0
    labels = labels.masked_fill(dmask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": dmask}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, rel: float = 1e-5, floor: float = 0.0, what: str = ""
) -> None:
    """max |actual - expected| <= rel * max(max |expected|, floor).

    `floor` is the scale for tensors whose exact value is zero (a key bias has
    no gradient through softmax; only rounding noise is left to compare).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), floor)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"{what}: max abs error {err:.3e} > {rel} x scale {scale:.3e}"


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")


@pytest.fixture
def triton_backend(monkeypatch):
    """Every op that has a Triton kernel runs it (on the GPU, or through the interpreter)."""
    monkeypatch.setenv("FASTSEQ_BACKEND", "triton")


@pytest.fixture
def chunked_tiles(monkeypatch):
    """The interpreter's backward on the tiles that sm_90 takes at D = 256, scaled down: dK/dV with fewer
    query rows than keys (16 x 32, scores and dP key-major) and every backward tile writing half of the
    head dim per program (`head_chunk`). The backward plans cached for other tiles are dropped before and
    after (the forward's tile comes from `tiles._fwd_config`, which this leaves as it is)."""
    from fastseq.kernels.bucketed_attention import launch, tiles

    def chunked(D, dtype, device):
        half = tiles._block_d(D) // 2
        plain = tiles._INTERPRET_TILE
        return tiles.Tiles(plain, plain, (*plain, half), (16, 32, 4, 1, half), (*plain, half), (16, 32, 4, 1, half))

    launch._backward_plan.cache_clear()
    monkeypatch.setattr(launch, "_tiles", chunked)
    yield
    launch._backward_plan.cache_clear()


def refused(capfd, argv: list[str], *expected: str) -> str:
    """Run the `fastseq` CLI in this process: it must exit 2 with exactly one error line, no
    traceback, holding every string of `expected`; returns that line."""
    from fastseq.cli import main

    code = main(argv)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastseq ")]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
