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
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]


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
    with pytest.raises(CheckpointError, match="weights_only=True"):
        fastseq.from_pretrained(path)
    assert "this must never run" not in capsys.readouterr().out


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
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def _hf(tmp_path):
    path = tmp_path / "hf"
    hf_model("t5_v11_untied").save_pretrained(path)
    return path
