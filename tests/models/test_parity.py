"""Native models against `transformers` in fp32: logits, loss and every gradient.

Each test builds a tiny random Hugging Face model, saves it with
`save_pretrained`, loads the directory through `fastseq.from_pretrained` and
runs both on the same batch (padding on the right, on the left and inside a row).
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import fastseq
from tests.conftest import KINDS, assert_close, batch, hf_model

SEQ2SEQ = list(KINDS)
ENCODERS = ["t5_v11_untied", "mt5_like", "longt5_local", "longt5_tglobal"]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare_seq2seq(ref, ours, inputs, *, train: bool) -> None:
    ref.train(train)
    ours.train(train)
    out_ref = ref(**inputs)
    out = ours(**inputs, return_logits=True)
    assert_close(out.loss, out_ref.loss, what="loss")
    assert_close(out.logits, out_ref.logits, what="logits")
    out_ref.loss.backward()
    out.loss.backward()
    ref_grads, grads = _grads(ref), _grads(ours)
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert_close(grads[name], g, floor=floor, what=f"grad of {name}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_seq2seq_parity(kind, train, tmp_path, reference_backend):
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path)
    ours = fastseq.from_pretrained(tmp_path)
    assert set(ours.state_dict()) == set(ref.state_dict())
    _compare_seq2seq(ref, ours, batch(kind), train=train)


KERNEL_OPS = ["bucketed_attention", "local_attention", "global_aggregate", "gated_gelu", "rms_norm",
              "linear_cross_entropy"]  # fmt: skip


@pytest.fixture
def triton_kernels(monkeypatch) -> list[str]:
    """Every op that has a Triton kernel runs it (GPU, or the interpreter on the CPU); the others
    their reference."""
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    ops = [op for op in KERNEL_OPS if importlib.import_module(f"fastseq.kernels.{op}").HAS_TRITON_KERNEL]
    for op in ops:
        monkeypatch.setenv(f"FASTSEQ_BACKEND_{op.upper()}", "triton")
    assert {"bucketed_attention", "rms_norm"} <= set(ops)
    return ops


# The interpreter runs of whole models: each model type and attention variant. ByT5 is v1.1's modules
# at other sizes; T5 v1.0's ReLU FFN goes through the interpreter in tests/test_patch.py and
# tests/test_autocast.py. The quick run's interpreter case of a whole model is tests/test_patch.py's.
TRITON_SEQ2SEQ = ["t5_v11_untied", "mt5_like", "longt5_local", "longt5_tglobal", "blenderbot_small"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", TRITON_SEQ2SEQ)
def test_seq2seq_parity_with_triton_kernels(kind, tmp_path, triton_kernels):
    """Every Triton kernel on at once, in train mode with gradients. Attention: encoder and decoder
    self-attention with the shared layer-0 table, cross-attention without a bias, BlenderbotSmall's
    scaled attention."""
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path)
    ours = fastseq.from_pretrained(tmp_path)
    _compare_seq2seq(ref, ours, batch(kind), train=True)


@pytest.mark.parametrize("kind", ["t5_v11_untied", "longt5_tglobal"])
def test_longer_inputs_and_default_masks(kind, tmp_path, reference_backend):
    """No masks at all, and an encoder several times longer than max_distance."""
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path)
    ours = fastseq.from_pretrained(tmp_path)
    inputs = batch(kind, B=2, Le=67, Ld=30)
    inputs = {"input_ids": inputs["input_ids"].clamp(min=3), "labels": inputs["labels"].clamp(min=3)}
    _compare_seq2seq(ref, ours, inputs, train=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5_v11_untied", "longt5_tglobal"])
def test_longer_inputs_with_triton_kernels(kind, tmp_path, triton_kernels):
    """Key tiles wholly beyond max_distance (one bias per head) next to band tiles; for LongT5 many
    local windows and global blocks; with gradients."""
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path)
    ours = fastseq.from_pretrained(tmp_path)
    _compare_seq2seq(ref, ours, batch(kind, B=2, Le=67, Ld=30), train=True)


@pytest.mark.parametrize("kind", ENCODERS)
def test_encoder_parity(kind, tmp_path, reference_backend):
    ref = hf_model(kind, encoder_only=True)
    ref.save_pretrained(tmp_path)
    ours = fastseq.from_pretrained(tmp_path)
    assert type(ours).__name__.endswith("EncoderModel")
    inputs = batch(kind)
    mask = inputs["attention_mask"]
    h_ref = ref(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
    h = ours(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
    keep = mask.bool()  # outputs at padded positions are not part of the contract
    assert_close(h[keep], h_ref[keep], what="last_hidden_state")
    weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(0)) * keep[..., None]
    (h_ref * weights).sum().backward()
    (h * weights).sum().backward()
    ref_grads, grads = _grads(ref), _grads(ours)
    assert set(grads) == set(ref_grads)
    floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert_close(grads[name], g, floor=floor, what=f"grad of {name}")


@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_fastseq_checkpoint_loads_in_transformers(kind, tmp_path, reference_backend):
    import transformers

    ref = hf_model(kind)
    ref.save_pretrained(tmp_path / "hf")
    ours = fastseq.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "fs")
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fs", attn_implementation="eager").eval()
    inputs = batch(kind)
    with torch.no_grad():
        expected = ours(**inputs).logits
        got = back(**inputs).logits
    assert torch.equal(got, ref(**inputs).logits.detach())
    assert_close(got, expected, what="logits of transformers loading fastseq's save")


@pytest.mark.parametrize("kind", SEQ2SEQ)
def test_round_trip_is_bit_identical(kind, tmp_path, reference_backend):
    """fastseq -> transformers -> fastseq keeps every tensor bit for bit."""
    import transformers

    first = fastseq.from_pretrained(_saved(kind, tmp_path / "hf"))
    first.save_pretrained(tmp_path / "a")
    middle = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "a")
    middle.save_pretrained(tmp_path / "b")
    second = fastseq.from_pretrained(tmp_path / "b")
    fields = [f.name for f in dataclasses.fields(first.config) if f.name != "extra"]
    assert {f: getattr(first.config, f) for f in fields} == {f: getattr(second.config, f) for f in fields}
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k


def _saved(kind, path):
    hf_model(kind).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["t5_v11_untied", "longt5_tglobal"])
def test_bias_tables_and_masks_are_made_once_per_stack(kind, tmp_path, monkeypatch, reference_backend):
    """Each stack makes its bias tables as the kernels read them once per forward (`PositionBias`) and
    its padding masks bool, and every layer reads those same objects."""
    from fastseq.kernels.bucketed_attention import launch
    from fastseq.models import longt5, t5

    made, seen = [], []
    distance_table = launch.distance_table

    def counted(*args, **kwargs):
        made.append(1)
        return distance_table(*args, **kwargs)

    def recorder(module, name):
        attend = getattr(module, name)

        def record(q, k, v, table, **kwargs):
            global_table = kwargs.get("global_bias_table")
            seen.append((table, global_table, kwargs.get("key_padding_mask")))
            return attend(q, k, v, table, **kwargs)

        monkeypatch.setattr(module, name, record)

    monkeypatch.setattr(launch, "distance_table", counted)
    recorder(t5, "bucketed_attention")
    recorder(longt5, "local_attention")
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path)
    ours = fastseq.from_pretrained(tmp_path).train()
    ours(**batch(kind)).loss.backward()
    layers = ours.config.num_layers
    tables = [t for t, _, _ in seen if t is not None]
    assert len(tables) == 2 * layers  # every self-attention layer of the encoder, then the decoder's
    assert all(isinstance(t, fastseq.kernels.PositionBias) for t in tables)
    encoder, decoder = tables[:layers], tables[layers:]
    assert all(t is encoder[0] for t in encoder) and all(t is decoder[0] for t in decoder)
    assert encoder[0].bidirectional and not decoder[0].bidirectional
    globals_ = [g for _, g, _ in seen if g is not None]
    assert len(made) == 2 + (1 if globals_ else 0)  # one per table per stack, none in the layers
    assert all(g is globals_[0] for g in globals_)
    masks = [m for _, _, m in seen if m is not None]
    assert masks and all(m.dtype == torch.bool for m in masks)
