"""fastseq.patch on real transformers models: same numbers, kernels really called, undoable."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import fastseq
from tests.conftest import KINDS, assert_close, batch, hf_model

fpatch = importlib.import_module("fastseq.patch")  # the module (`fastseq.patch` is the function)

PATCHABLE = [k for k, (model_type, _) in KINDS.items() if model_type in fpatch.REGISTRY]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", PATCHABLE)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_equals_unpatched(kind, backend, monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", backend)
    ref = hf_model(kind).train()
    ours = fastseq.patch(copy.deepcopy(ref))
    inputs = batch(kind)
    torch.manual_seed(0)
    out_ref = ref(**inputs)
    torch.manual_seed(0)
    out = ours(**inputs)
    assert_close(out.logits, out_ref.logits, what="logits")
    assert_close(out.loss, out_ref.loss, what="loss")
    out_ref.loss.backward()
    out.loss.backward()
    a, b = _grads(ours), _grads(ref)
    assert a.keys() == b.keys()
    for name in b:
        assert_close(a[name], b[name], floor=1e-3 * max(g.abs().max().item() for g in b.values()), what=name)
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("kind", ["t5_v10_tied", "t5_v11_untied"])
def test_the_patch_really_calls_the_kernels_and_unpatch_restores(kind, monkeypatch):
    model = hf_model(kind)
    calls = {"rms_norm": 0, "gated_ffn": 0, "relu_ffn": 0}
    for name in calls:
        real = getattr(fpatch.kernels, name)

        def counting(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(fpatch.kernels, name, counting)
    fpatch.patch(model)
    names = fpatch.patched_modules(model)
    layers = model.config.num_layers + model.config.num_decoder_layers
    ffn = "gated_ffn" if model.config.is_gated_act else "relu_ffn"
    # Per layer: the FFN and its norm, the self-attention norm, and the cross-attention norm in the decoder;
    # plus the two final norms.
    assert len(names) == layers * 3 + model.config.num_decoder_layers + 2
    with torch.no_grad():
        model(**batch(kind))
    assert calls[ffn] == layers
    assert calls["rms_norm"] == layers * 2 + model.config.num_decoder_layers + 2
    fpatch.unpatch(model)
    assert fpatch.patched_modules(model) == []
    before = dict(calls)
    with torch.no_grad():
        model(**batch(kind))
    assert calls == before  # the originals run again


def test_generate_and_fallbacks(monkeypatch):
    model = hf_model("t5_v11_untied")
    inputs = batch("t5_v11_untied")
    args = dict(attention_mask=inputs["attention_mask"], max_new_tokens=6, do_sample=False)
    expected = model.generate(inputs["input_ids"], num_beams=2, **args)
    fpatch.patch(model)
    assert torch.equal(model.generate(inputs["input_ids"], num_beams=2, **args), expected)
    # An output projection kept in another dtype (FLAN-T5 keeps `wo` in fp32): the module's own forward.
    ffn = model.encoder.block[0].layer[-1].DenseReluDense
    ffn.wo.to(torch.float64)
    x = torch.randn(2, 3, model.config.d_model)
    assert ffn(x).dtype == torch.float64


def test_refusals():
    with pytest.raises(ValueError, match="'blenderbot-small' is not supported"):
        fpatch.patch(hf_model("blenderbot_small"))
    with pytest.raises(NotImplementedError, match="attention=False"):
        fpatch.patch(hf_model("t5_v10_tied"), attention=True)


def test_umt5_patched_equals_unpatched():
    import transformers as tf

    from tests.conftest import T5_BASE

    torch.manual_seed(0)
    fields = dict(T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    ref = tf.UMT5ForConditionalGeneration(tf.UMT5Config(**fields)).train()
    ours = fastseq.patch(copy.deepcopy(ref))
    assert len(fpatch.patched_modules(ours)) > 0
    inputs = batch("t5_v11_untied")
    torch.manual_seed(0)
    expected = ref(**inputs)
    torch.manual_seed(0)
    got = ours(**inputs)
    assert_close(got.logits, expected.logits, what="logits")
    expected.loss.backward()
    got.loss.backward()
    a, b = _grads(ours), _grads(ref)
    floor = 1e-3 * max(g.abs().max().item() for g in b.values())
    for name in b:
        assert_close(a[name], b[name], floor=floor, what=name)
