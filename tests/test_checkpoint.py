"""Checkpoint I/O: layouts, dtypes, atomic writes and the errors a user sees."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastseq
from fastseq import CheckpointError
from fastseq.models import T5EncoderModel
from tests.conftest import batch, hf_model


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model"
    hf_model("t5_v11_untied").save_pretrained(path)
    return path


def _edit_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        fastseq.from_pretrained(tmp_path / "nowhere")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        fastseq.from_pretrained(saved)


def test_unknown_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "bart"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type='bart'.*not supported"):
        fastseq.from_pretrained(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        fastseq.from_pretrained(saved)


def test_missing_and_unexpected_keys_are_listed(saved):
    def edit(state):
        del state["encoder.block.1.layer.0.SelfAttention.q.weight"]
        state["encoder.block.9.extra.weight"] = torch.zeros(2)

    _edit_weights(saved, edit)
    with pytest.raises(CheckpointError) as err:
        fastseq.from_pretrained(saved)
    assert "missing keys: encoder.block.1.layer.0.SelfAttention.q.weight" in str(err.value)
    assert "unexpected keys: encoder.block.9.extra.weight" in str(err.value)


def test_shape_mismatch_names_key_and_shapes(saved):
    config = json.loads((saved / "config.json").read_text())
    config["d_ff"] = 50
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"DenseReluDense.wi_0.weight: checkpoint \(48, 32\) vs model \(50, 32\)"):
        fastseq.from_pretrained(saved)


def test_truncated_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) - 64])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        fastseq.from_pretrained(saved)


def test_corrupted_header(saved):
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (saved / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        fastseq.from_pretrained(saved)


def test_ignored_legacy_key_loads(saved):
    _edit_weights(
        saved,
        lambda s: s.__setitem__(
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", torch.randn(16, 4)
        ),
    )
    fastseq.from_pretrained(saved)


def test_dtype_and_device(saved):
    model = fastseq.from_pretrained(saved, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype='float8'"):
        fastseq.from_pretrained(saved, dtype="float8")


def test_encoder_only_from_seq2seq_checkpoint(saved):
    model = fastseq.from_pretrained(saved, architecture="T5EncoderModel")
    assert isinstance(model, T5EncoderModel)


def test_sharded_save_loads_everywhere_and_resave_cleans_up(tmp_path):
    import transformers

    model = fastseq.from_pretrained(_hf(tmp_path))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    again = fastseq.from_pretrained(tmp_path / "sharded")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "sharded").eval()
    inputs = batch("t5_v11_untied")
    with torch.no_grad():
        assert torch.allclose(hf(**inputs).logits, model(**inputs).logits, atol=1e-5)
    model.save_pretrained(tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]  # fmt: skip


def test_missing_shard(tmp_path):
    model = fastseq.from_pretrained(_hf(tmp_path))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard model-00002-of-.*which is missing"):
        fastseq.from_pretrained(tmp_path / "sharded")


def test_pytorch_bin_weights_only(tmp_path):
    path = _hf(tmp_path)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    model = fastseq.from_pretrained(path)
    assert torch.equal(model.state_dict()["shared.weight"], state["shared.weight"])


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    path = _hf(tmp_path)
    (path / "model.safetensors").unlink()
    torch.save({"shared.weight": _Payload()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True") as refused:
        fastseq.from_pretrained(path)
    assert "this must never run" not in capsys.readouterr().out
    # The unpickler's reason, in one line, and never torch's advice to load it with weights_only=False.
    message = str(refused.value)
    assert "refused by the weights-only unpickler: " in message and "\n" not in message, message
    assert "weights_only` set to `False`" not in message and "likely succeed" not in message, message


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import fastseq.files as files

    model = fastseq.from_pretrained(_hf(tmp_path))
    target = tmp_path / "out"
    model.save_pretrained(target)
    before = (target / "model.safetensors").read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def _hf(tmp_path):
    path = tmp_path / "hf"
    hf_model("t5_v11_untied").save_pretrained(path)
    return path


# ---- separate embeddings ----------------------------------------------------------------------------------


def _separate_embeddings_model(kind: str, path, *, seed: int = 0, **overrides):
    """A tiny model built and saved by transformers with `tie_word_embeddings=False` set on its config
    after construction (as a user does), so its encoder and decoder embeddings are matrices of their own."""
    import transformers as tf

    from tests.conftest import KINDS

    model_type, fields = KINDS[kind]
    config_cls = {"t5": tf.T5Config, "longt5": tf.LongT5Config, "blenderbot-small": tf.BlenderbotSmallConfig}
    config = config_cls[model_type](**{**fields, **overrides})
    config.tie_word_embeddings = False
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = tf.AutoModelForSeq2SeqLM.from_config(config).__class__
    model = cls(config).eval()
    prefix = "model." if model_type == "blenderbot-small" else ""
    params = dict(model.named_parameters(remove_duplicate=False))
    shared = params[f"{prefix}shared.weight"]
    for stack in ("encoder", "decoder"):
        assert params[f"{prefix}{stack}.embed_tokens.weight"] is not shared  # transformers keeps them apart
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", ["t5_v10_tied", "longt5_tglobal", "blenderbot_small"])
def test_separate_embeddings_load_untied_and_match_transformers(tmp_path, kind, reference_backend):
    import transformers

    _separate_embeddings_model(kind, tmp_path / "hf")
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    prefix = "model." if kind == "blenderbot_small" else ""
    assert not torch.equal(stored[f"{prefix}encoder.embed_tokens.weight"], stored[f"{prefix}shared.weight"])
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    ours = fastseq.from_pretrained(tmp_path / "hf")
    assert ours.config.separate_embeddings == ["encoder", "decoder"]
    named = dict(ours.named_parameters(remove_duplicate=False))
    for stack in ("encoder", "decoder"):
        key = f"{prefix}{stack}.embed_tokens.weight"
        assert named[key] is not named[f"{prefix}shared.weight"]
        assert torch.equal(named[key], stored[key])
    inputs = batch(kind)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours(**inputs).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # Saved by fastseq: every matrix is stored, transformers and fastseq read back the same model.
    ours.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert set(again) == set(stored)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["separate_embeddings"] == ["encoder", "decoder"]
    with torch.no_grad():
        assert torch.equal(fastseq.from_pretrained(tmp_path / "again")(**inputs).logits, got)
        reread = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "again").eval()
        assert (reread(**inputs).logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_one_separate_embedding_and_a_head_missing_from_the_checkpoint(tmp_path, reference_backend):
    """Only the decoder's embedding differs, and no lm_head is stored although config.json says
    tie_word_embeddings=false: transformers 5 ties the head and the encoder's embedding; so does fastseq."""
    import transformers

    _separate_embeddings_model("t5_v11_untied", tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state.pop("lm_head.weight", None)
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    ours = fastseq.from_pretrained(tmp_path / "hf")
    assert ours.config.separate_embeddings == ["decoder"] and ours.config.tie_word_embeddings
    assert ours.encoder.embed_tokens is ours.shared and ours.lm_head.weight is ours.shared.weight
    assert ours.decoder.embed_tokens is not ours.shared
    inputs = batch("t5_v11_untied")
    with torch.no_grad():
        expected, got = theirs(**inputs).logits, ours(**inputs).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_tied_model_never_drops_a_different_matrix(tmp_path):
    from fastseq.checkpoint import match_state
    from fastseq.models import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    state = dict(model.state_dict())
    state["encoder.embed_tokens.weight"] = torch.randn_like(state["shared.weight"])
    with pytest.raises(CheckpointError, match="stores encoder.embed_tokens.weight with values other than shared"):
        match_state(model, state, tmp_path)


def test_generation_config_is_what_transformers_reads(tmp_path):
    import transformers

    for kind, expected in [
        ("t5_v11_untied", {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}),
        ("blenderbot_small", {"bos_token_id": 1, "decoder_start_token_id": 1, "eos_token_id": 2,
                              "forced_eos_token_id": 2, "pad_token_id": 0}),
    ]:  # fmt: skip
        hf_model(kind).save_pretrained(tmp_path / kind / "hf")
        fastseq.from_pretrained(tmp_path / kind / "hf").save_pretrained(tmp_path / kind / "ours")
        assert json.loads((tmp_path / kind / "ours" / "generation_config.json").read_text()) == expected
        theirs = transformers.GenerationConfig.from_pretrained(tmp_path / kind / "ours")
        assert {k: getattr(theirs, k) for k in expected} == expected
    fastseq.from_pretrained(tmp_path / "t5_v11_untied" / "hf", architecture="T5EncoderModel").save_pretrained(
        tmp_path / "encoder"
    )
    assert not (tmp_path / "encoder" / "generation_config.json").exists()  # an encoder does not generate


# ---- weights that cannot be trained ----------------------------------------------------------------------


def test_integer_weights_are_refused(saved):
    _edit_weights(saved, lambda s: s.__setitem__("encoder.final_layer_norm.weight", torch.ones(32, dtype=torch.int64)))
    with pytest.raises(CheckpointError, match="weight encoder.final_layer_norm.weight is stored as int64"):
        fastseq.from_pretrained(saved)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(saved, value):
    def edit(state):
        state["decoder.block.1.layer.2.DenseReluDense.wo.weight"][3, 5] = value

    _edit_weights(saved, edit)
    with pytest.raises(CheckpointError) as err:
        fastseq.from_pretrained(saved)
    assert "weight decoder.block.1.layer.2.DenseReluDense.wo.weight holds 1 NaN or infinite value(s)" in str(err.value)
    assert "earlier checkpoint" in str(err.value) and "--lr" not in str(err.value)


@pytest.mark.parametrize("model_type", [["t5"], "umt5"])
def test_model_type_that_is_not_a_family_name(saved, model_type):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = model_type
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type=.* is not supported") as err:
        fastseq.from_pretrained(saved)
    assert ("fastseq.patch" in str(err.value)) == (model_type == "umt5")


def test_pipeline_stages_refuse_separate_embeddings():
    """Pipeline stages share one token embedding (a tied layer): a model with its own encoder or decoder
    embedding is refused there, never tied silently."""
    from fastseq.distributed.stages import layers
    from fastseq.models import T5Config

    config = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    assert layers(config)
    config.separate_embeddings = ["decoder"]
    with pytest.raises(ValueError, match="token embeddings of its own for decoder.*train it with ZeRO"):
        layers(config)


def test_training_config_reads_the_tying_lazily_as_from_pretrained_does(tmp_path, monkeypatch, capfd):
    """`fastseq train` decides the tying from the stored matrices, compared a block of rows at a time (no
    whole matrix in memory), sharded or not, and trains and saves the separate matrices."""
    import fastseq.checkpoint as checkpoint
    from fastseq.checkpoint import fit_embeddings, stored_embeddings
    from fastseq.cli import main
    from fastseq.tokenizers import ByT5Tokenizer

    monkeypatch.setattr(checkpoint, "_COMPARE_ROWS", 7)
    _separate_embeddings_model("t5_v10_tied", tmp_path / "hf", vocab_size=384)  # ByT5's ids
    ours = fastseq.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["decoder.embed_tokens.weight"] = state["shared.weight"].clone()
    state["decoder.embed_tokens.weight"][-1, -1] += 1.0  # differs in the last block only
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()  # equal: tied
    (tmp_path / "edited").mkdir()
    save_file(state, tmp_path / "edited" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "edited" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    for name, separate in (
        ("hf", ["encoder", "decoder"]),
        ("sharded", ["encoder", "decoder"]),
        ("edited", ["decoder"]),
    ):
        config, _ = checkpoint.read_model_config(tmp_path / name)
        fit_embeddings(config, *stored_embeddings(tmp_path / name, config))
        assert config.separate_embeddings == separate, name
        assert config.to_hf_dict() == fastseq.from_pretrained(tmp_path / name).config.to_hf_dict(), name
    model = tmp_path / "sharded"
    assert len(list(model.glob("model-*.safetensors"))) > 2
    ByT5Tokenizer().save_pretrained(model)
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--data", "synthetic", "--steps", "1", "--batch-size", "2",
            "--eval-examples", "0", "--optimizer", "adamw", "--lr", "1e-3", "--quiet",
            "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0, capfd.readouterr().err
    trained = load_file(out / "model.safetensors")
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "shared.weight"} <= set(trained)
    assert not torch.equal(trained["encoder.embed_tokens.weight"], trained["shared.weight"])
