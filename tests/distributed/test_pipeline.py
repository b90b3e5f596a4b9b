"""Pipeline stages through the real `deepspeed` launcher (two ranks, CPU, gloo): the losses of one
process, exact resumption, conversion to a directory `transformers` loads; the partitioning of the
11B presets on the meta device; refusals."""

from __future__ import annotations

import json

import pytest
import torch

import fastseq
from fastseq import presets
from fastseq.distributed.stages import layer_parameter_counts, stage_parameter_counts
from fastseq.tokenizers import ByT5Tokenizer
from tests.conftest import KINDS, T5_BASE, assert_close, batch
from tests.distributed.launch import ROOT, assert_losses_close, deepspeed, losses, one_process

PIPELINE = str(ROOT / "configs/deepspeed/pipeline.json")
COMMON = ["--data", "synthetic", "--batch-size", "4", "--grad-accum", "2", "--optimizer", "adamw", "--lr", "1e-3",
          "--quiet", "--eval-examples", "0"]  # fmt: skip


def _directory(path, kind: str):
    """A transformers model with ByT5's vocabulary, saved with its tokenizer."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "t5_tied":
        model = tf.T5ForConditionalGeneration(
            tf.T5Config(**dict(T5_BASE, vocab_size=384, feed_forward_proj="relu", tie_word_embeddings=True))
        )
    elif kind == "longt5_tglobal":
        fields = dict(T5_BASE, vocab_size=384, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      encoder_attention_type="transient-global", local_radius=3, global_block_size=4)  # fmt: skip
        model = tf.LongT5ForConditionalGeneration(tf.LongT5Config(**fields))
    else:
        # The tiny BlenderbotSmall of the parity tests, with ByT5's vocabulary and longer positions.
        fields = dict(KINDS["blenderbot_small"][1], vocab_size=384, max_position_embeddings=128)
        model = tf.BlenderbotSmallForConditionalGeneration(tf.BlenderbotSmallConfig(**fields))
        model.final_logits_bias.normal_()
    model.save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.mark.slow
def test_two_stages_of_a_tied_t5_match_one_process_resume_and_convert(tmp_path):
    source = _directory(tmp_path / "model", "t5_tied")
    expected = one_process(tmp_path / "one", 5, model=source)
    run = tmp_path / "pp"
    deepspeed("--deepspeed", PIPELINE, "--model", str(source), "--steps", "5", "--save-every", "3",
              "--output-dir", str(run), *COMMON)  # fmt: skip
    straight = losses(run)
    assert_losses_close(straight, expected)
    layer_files = sorted(p.name for p in (run / "checkpoint-5").glob("layer_*-model_states.pt"))
    assert layer_files[0] == "layer_00-model_states.pt" and len(layer_files) > 4  # both stages wrote theirs

    resumed = tmp_path / "pp_resumed"
    deepspeed("--deepspeed", PIPELINE, "--model", str(source), "--steps", "5", "--resume",
              str(run / "checkpoint-3"), "--output-dir", str(resumed), *COMMON)  # fmt: skip
    assert losses(resumed) == straight[3:]  # bit for bit

    from fastseq.cli import main

    converted = tmp_path / "hf"
    assert main(["convert", "--from-deepspeed", str(run / "checkpoint-5"), "--to", str(converted)]) == 0
    ours = fastseq.from_pretrained(converted)
    one = fastseq.from_pretrained(tmp_path / "one")
    for name, value in one.state_dict().items():
        assert_close(ours.state_dict()[name], value, what=name)
    import transformers as tf

    reference = tf.AutoModelForSeq2SeqLM.from_pretrained(converted).eval()
    assert reference.lm_head.weight.data_ptr() == reference.shared.weight.data_ptr()  # still tied
    data = batch("byt5_like")
    with torch.no_grad():
        assert_close(reference(**data).logits, ours(**data).logits, what="transformers logits")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["longt5_tglobal", "blenderbot_small"])
def test_two_stages_of_longt5_and_blenderbot_with_checkpointing_match_one_process(tmp_path, kind):
    source = _directory(tmp_path / "model", kind)
    expected = one_process(tmp_path / "one", 3, model=source)
    # With every block layer checkpointed (activation_checkpoint_interval 1): the same numbers.
    deepspeed("--deepspeed", PIPELINE, "--model", str(source), "--steps", "3", "--output-dir", str(tmp_path / "pp"),
              "--gradient-checkpointing", *COMMON)  # fmt: skip
    assert_losses_close(losses(tmp_path / "pp"), expected)


@pytest.mark.parametrize("preset", ["t5-11b", "google/mt5-xxl"])
@pytest.mark.parametrize("stages", [4, 8])
def test_11b_presets_partition_evenly_on_the_meta_device(preset, stages):
    config = presets.config(preset)
    counts = stage_parameter_counts(config, stages)
    assert len(counts) == stages
    assert max(counts) <= 1.15 * min(counts), [f"{c / 1e9:.2f}B" for c in counts]
    # Every parameter of the model sits on some stage (the tied embedding once per stage using it).
    model = presets.build(preset, device="meta")
    embedding = config.vocab_size * config.d_model
    assert sum(layer_parameter_counts(config)) >= model.num_parameters()
    assert sum(layer_parameter_counts(config)) - model.num_parameters() <= 2 * embedding


@pytest.mark.slow
def test_bad_configurations_are_refused_through_the_launcher(tmp_path):
    import json

    config = tmp_path / "pipe_zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "pipeline": {"stages": 2}}))
    proc = deepspeed("--deepspeed", str(config), "--steps", "1", "--output-dir", str(tmp_path / "x"), *COMMON,
                     expect_fail=True)  # fmt: skip
    assert "pipeline parallelism works only with ZeRO stage 0 or 1; the config asks for stage 3" in proc.stderr
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"pipeline": {"stages": 2}}))
    proc = deepspeed("--deepspeed", str(many), "--steps", "1", "--output-dir", str(tmp_path / "y"), "--precision",
                     "fp16", *COMMON, expect_fail=True)  # fmt: skip
    assert "fp16 is refused for T5-family models" in proc.stderr


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["t5_tied", "t5_untied", "blenderbot"])
def test_the_last_stage_takes_the_fused_loss_of_the_head_without_logits(kind, smoothing):
    """The head layers hand (hidden, weight[, bias]) to the loss function, which computes the
    cross entropy with `linear_cross_entropy`: the value and gradients of the logits' cross entropy."""
    import torch.nn.functional as F

    from fastseq.distributed.stages import HeadPipe, LogitsBiasPipe, TokenEmbedding, _tied_head, head_loss
    from fastseq.models import BlenderbotSmallConfig, T5Config

    torch.manual_seed(0)
    if kind == "blenderbot":
        config = BlenderbotSmallConfig(**{k: v for k, v in KINDS["blenderbot_small"][1].items()
                                          if k in BlenderbotSmallConfig.__dataclass_fields__})  # fmt: skip
    else:
        config = T5Config(**{k: v for k, v in T5_BASE.items() if k in T5Config.__dataclass_fields__})
    hidden = torch.randn(2, 7, config.d_model, requires_grad=True)
    labels = torch.randint(0, config.vocab_size, (2, 7))
    labels[1, 4:] = -100
    if kind == "t5_untied":
        head = HeadPipe(config.d_model, config.vocab_size)
        out = head(hidden)
    else:
        embedding = TokenEmbedding(config)
        out = _tied_head(embedding, hidden)
    if kind == "blenderbot":
        bias = LogitsBiasPipe(config.vocab_size)
        bias.final_logits_bias.normal_()
        out = bias(out)
    assert out[0] is hidden and out[1].shape == (config.vocab_size, config.d_model)  # no logits: the head's inputs
    loss = head_loss(out, labels, label_smoothing=smoothing)
    weight = out[1]
    logits = hidden @ weight.T + (out[2] if len(out) > 2 else 0)
    expected = F.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=smoothing)  # fmt: skip
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_label_smoothing_under_zero2_and_two_stages_matches_one_process(tmp_path):
    """--label-smoothing reaches the loss of every engine: ZeRO-2's ranks and the pipeline's last stage
    give one process's smoothed losses (which differ from the plain ones)."""
    source = _directory(tmp_path / "model", "t5_tied")
    expected = one_process(tmp_path / "one", 3, model=source, label_smoothing=0.1)
    plain = one_process(tmp_path / "plain", 3, model=source)
    assert all(abs(a - b) > 1e-3 for a, b in zip(expected, plain, strict=True))
    # Two data-parallel ranks with one micro-batch each, or two stages accumulating two: one process's batches.
    runs = {"z2": (str(ROOT / "configs/deepspeed/zero2.json"), "1"), "pp": (PIPELINE, "2")}
    for name, (config, accumulation) in runs.items():
        deepspeed("--deepspeed", config, "--model", str(source), "--steps", "3", "--label-smoothing", "0.1",
                  "--output-dir", str(tmp_path / name), *COMMON, "--grad-accum", accumulation)  # fmt: skip
        assert_losses_close(losses(tmp_path / name), expected)


def _pipeline_layers(native) -> list:
    """(layer spec, module) of each pipeline layer of `native`'s config, in order, holding `native`'s
    weights; a tied layer's module is the one made for its first occurrence."""
    from fastseq.distributed.stages import layers

    state, tied, out = native.state_dict(), {}, []
    for layer in layers(native.config):
        module = tied.get(layer.tied) if layer.tied else None
        if module is None:
            module = layer.cls(*layer.args, **layer.kwargs)
            module.load_state_dict({local: state[layer.hf_name(local)] for local in module.state_dict()})
            if layer.tied:
                tied[layer.tied] = module
        out.append((layer, module))
    return out


@pytest.mark.parametrize("kind", ["t5_v10_tied", "t5_v11_untied", "blenderbot_small"])
def test_the_layers_train_packed_rows_as_the_padded_batch(kind, reference_backend):
    """The pipeline's layers run one after another in one process, with the native model's weights:
    packed rows (segment ids and BlenderbotSmall's positions riding in the stage tuples, labels
    shifted per segment by `stage_inputs`) give the padded batch's loss and gradients, and both give
    the native model's loss."""
    from fastseq.distributed.stages import head_loss, stage_inputs
    from tests.models.test_packing import ROW_SOURCE, ROW_TARGET, ROWS, examples, model, packed, padded

    native = model(kind)
    chain = [(module, layer.forward_fn) for layer, module in _pipeline_layers(native)]
    parameters = {f"{i}.{name}": p for i, (module, fn) in enumerate(chain) if fn is None
                  for name, p in module.named_parameters()}  # fmt: skip

    def run(batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = stage_inputs(native.config, batch)
        for module, fn in chain:
            x = fn(module, x) if fn is not None else module(x)
        loss = head_loss(x, batch["labels"])
        grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        return loss.detach(), {n: g for n, g in zip(parameters, grads, strict=True) if g is not None}

    pairs = examples(kind)
    loss, grads = run(padded(pairs))
    packed_loss, packed_grads = run(packed(pairs, ROWS, ROW_SOURCE, ROW_TARGET))
    with torch.no_grad():
        assert_close(loss, native(**padded(pairs)).loss, what="padded loss against the native model")
    assert_close(packed_loss, loss, what="loss")
    assert set(packed_grads) == set(grads) and len(grads) > 10
    floor = 1e-3 * max(g.abs().max().item() for g in grads.values())
    for name, g in grads.items():
        assert_close(packed_grads[name], g, floor=floor, what=f"grad of {name}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["t5_v10_tied", "blenderbot_small"])
def test_two_stages_train_packed_rows_as_the_padded_batch(tmp_path, kind, reference_backend):
    """Through DeepSpeed's schedule (the packing ids cross the stage boundary): three AdamW steps on
    packed rows give the losses of the same examples padded, the first one the native model's. A
    tied T5 shares its embedding across the stages; BlenderbotSmall's positions ride to the decoder's."""
    from tests.models.test_packing import examples, model, padded

    native = model(kind)
    native.save_pretrained(tmp_path / "model")
    out = tmp_path / "losses.json"
    deepspeed(str(ROOT / "tests/workers/pipeline_packing.py"), "--model", str(tmp_path / "model"), "--kind", kind,
              "--out", str(out), module=None)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["world"] == 2
    runs = result["losses"]
    assert len(runs["packed"]) == 3
    assert_losses_close(runs["packed"], runs["padded"])
    with torch.no_grad():
        expected = native(**padded(examples(kind))).loss.item()
    assert abs(runs["packed"][0] - expected) <= 1e-5 * expected


@pytest.mark.slow
def test_two_stages_train_packed_rows_with_fastseq_train_as_one_process(tmp_path):
    """`fastseq train --pack` with pipeline stages: the packed micro-batches the engine feeds through
    the stages give one process's losses, and a resumed run repeats them bit for bit."""
    source = _directory(tmp_path / "model", "blenderbot_small")
    expected = one_process(tmp_path / "one", 4, model=source, pack=True, max_source_length=128)
    run = tmp_path / "pp"
    deepspeed("--deepspeed", PIPELINE, "--model", str(source), "--steps", "4", "--save-every", "2", "--pack",
              "--max-source-length", "128", "--output-dir", str(run), *COMMON)  # fmt: skip
    straight = losses(run)
    assert_losses_close(straight, expected)
    resumed = tmp_path / "pp_resumed"
    deepspeed("--deepspeed", PIPELINE, "--model", str(source), "--steps", "4", "--pack", "--max-source-length", "128",
              "--resume", str(run / "checkpoint-2"), "--output-dir", str(resumed), *COMMON)  # fmt: skip
    assert losses(resumed) == straight[2:]  # bit for bit


def test_the_layers_of_a_stage_share_one_prepared_table(monkeypatch, reference_backend):
    """A stage's self-attention sub-layers read the bias table handed along the stage tuple as one
    `PositionBias`, made by the first of them and kept on that tensor: not one per layer."""
    from fastseq.distributed.stages import stage_inputs
    from fastseq.kernels import PositionBias
    from fastseq.models import t5
    from tests.models.test_packing import examples, model, padded

    seen = []
    attend = t5.bucketed_attention

    def record(q, k, v, table, **kwargs):
        seen.append(table)
        return attend(q, k, v, table, **kwargs)

    monkeypatch.setattr(t5, "bucketed_attention", record)
    native = model("t5_v11_untied")
    x = stage_inputs(native.config, padded(examples("t5_v11_untied")))
    for layer, module in _pipeline_layers(native):
        x = layer.forward_fn(module, x) if layer.forward_fn is not None else module(x)
    tables = [t for t in seen if t is not None]
    layers_per_stack = native.config.num_layers
    assert len(tables) == 2 * layers_per_stack and layers_per_stack > 1  # the encoder's, then the decoder's
    for stack in (tables[:layers_per_stack], tables[layers_per_stack:]):
        assert all(isinstance(t, PositionBias) and t is stack[0] for t in stack)
    assert tables[0] is not tables[-1] and tables[0].bidirectional and not tables[-1].bidirectional
