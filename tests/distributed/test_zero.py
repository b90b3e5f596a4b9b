"""ZeRO-2 and ZeRO-3 through the real `deepspeed` launcher with two ranks (CPU, gloo): the losses of
one process, exact resumption, loading a model directory into the partitions, and conversion back
to a Hugging Face directory that `transformers` loads."""

from __future__ import annotations

import json

import pytest
import torch

import fastseq
from tests.conftest import assert_close, batch, hf_model
from tests.distributed.launch import ROOT, assert_losses_close, deepspeed, free_port, losses, one_process

COMMON = ["--data", "synthetic", "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--quiet",
          "--eval-examples", "0"]  # fmt: skip


@pytest.mark.slow
def test_zero3_builds_the_parameters_in_the_configs_dtype_on_any_cpu(tmp_path):
    """DeepSpeed's zero.Init given an explicit dtype asks the accelerator instead of the config and,
    on a CPU without oneDNN fp16 (seen on an AMD EPYC), built an fp32 run's parameters in bf16; the
    engine lets the config decide. Both answers of the accelerator are tried here."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), MASTER_PORT=str(free_port()),
               ZERO3_CONFIG=str(ROOT / "configs/deepspeed/zero3.json"), OMP_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "tests.workers.zero3_dtype"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for answer in (False, True):
        assert found[f"fp16_supported={answer} fp32"] == ["torch.float32"], found
        assert found[f"fp16_supported={answer} bf16"] == ["torch.bfloat16"], found


@pytest.mark.slow
def test_zero2_and_zero3_match_one_process_resume_exactly_and_convert(tmp_path):
    expected = one_process(tmp_path / "one", 5)
    # ZeRO-2 with --load-best-model-at-end (a falling eval_loss with greater-is-better: checkpoint-2 wins).
    z2 = tmp_path / "z2"
    deepspeed("--deepspeed", str(ROOT / "configs/deepspeed/zero2.json"), "--steps", "5", "--output-dir", str(z2),
              *COMMON, "--eval-examples", "16", "--eval-every", "2", "--save-every", "2", "--metric-for-best-model",
              "eval_loss", "--greater-is-better", "true", "--load-best-model-at-end")  # fmt: skip
    logged = [json.loads(line) for line in (z2 / "metrics.jsonl").read_text().splitlines()]
    assert_losses_close([r["loss"] for r in logged if "loss" in r], expected)  # steps 2 and 4 evaluated too
    evals = {r["step"]: r for r in logged if "eval_loss" in r and "best_model_step" not in r}
    assert sorted(evals) == [2, 4, 5] and logged[-1]["best_model_step"] == 2, logged
    assert logged[-1]["eval_loss"] == pytest.approx(evals[2]["eval_loss"], rel=1e-6)  # the best model evaluated again
    from fastseq.distributed.convert import convert

    top = fastseq.from_pretrained(z2).state_dict()  # OUTPUT's model: checkpoint-2's, as convert writes it
    for step in (2, 5):
        state = fastseq.from_pretrained(convert(z2 / f"checkpoint-{step}", tmp_path / f"z2-{step}")).state_dict()
        same = all(torch.equal(top[name], value) for name, value in state.items())
        assert same == (step == 2), step

    z3 = tmp_path / "z3"
    deepspeed("--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"), "--steps", "5", "--save-every", "3",
              "--output-dir", str(z3), *COMMON, "--eval-examples", "16")  # fmt: skip
    straight = losses(z3)
    assert_losses_close(straight, expected)
    assert sorted(p.name for p in z3.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-5"]

    resumed = tmp_path / "z3_resumed"
    deepspeed("--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"), "--steps", "5",
              "--resume", str(z3 / "checkpoint-3"), "--output-dir", str(resumed), *COMMON)  # fmt: skip
    assert losses(resumed) == straight[3:]  # bit for bit

    # The held-out evaluation every rank ran (greedy decoding under ZeRO-3) is one process's of the saved model.
    import random

    from fastseq.data import Seq2SeqCollator
    from fastseq.tokenizers import ByT5Tokenizer
    from fastseq.train import evaluate
    from fastseq.train.data import make_examples

    logged = [json.loads(line) for line in (z3 / "metrics.jsonl").read_text().splitlines()]
    scores = [line for line in logged if "exact_match" in line]
    assert len(scores) == 1 and scores[0]["step"] == 5
    held_out = make_examples(16, random.Random(1))  # the default task's held-out set for --seed 0
    collator = Seq2SeqCollator(ByT5Tokenizer())
    expected_scores, _ = evaluate(fastseq.from_pretrained(z3), ByT5Tokenizer(), held_out, collator, torch.device("cpu"))
    assert scores[0]["exact_match"] == expected_scores["exact_match"]
    assert abs(scores[0]["eval_loss"] - expected_scores["eval_loss"]) <= 1e-5 * expected_scores["eval_loss"]

    converted = tmp_path / "hf"
    from fastseq.cli import main

    assert main(["convert", "--from-deepspeed", str(z3 / "checkpoint-5"), "--to", str(converted)]) == 0
    ours = fastseq.from_pretrained(converted)
    final = fastseq.from_pretrained(z3)  # the model the run saved at the top of its output
    for name, value in final.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0)
    import transformers as tf

    reference = tf.AutoModelForSeq2SeqLM.from_pretrained(converted).eval()
    data = batch("byt5_like")
    with torch.no_grad():
        expected_logits = ours(**data).logits
        got = reference(**data).logits
    assert_close(got, expected_logits, what="transformers logits of the converted directory")


@pytest.mark.slow
def test_zero3_loads_a_model_directory_into_the_partitions(tmp_path):
    source = tmp_path / "model"
    # A transformers directory with ByT5's vocabulary, in several safetensors shards.
    hf_model("byt5_like").save_pretrained(source, max_shard_size="200KB")
    assert len(list(source.glob("model-*.safetensors"))) > 1
    from fastseq.tokenizers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(source)
    expected = one_process(tmp_path / "one", 2, model=source)
    deepspeed("--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"), "--model", str(source), "--steps", "2",
              "--output-dir", str(tmp_path / "z3"), *COMMON)  # fmt: skip
    assert_losses_close(losses(tmp_path / "z3"), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero2_offload", "zero3_offload"])
def test_offload_configs_match_one_process(tmp_path, name):
    """The optimizer (and for ZeRO-3 the parameters) on the CPU, with DeepSpeed's own AdamW."""
    expected = one_process(tmp_path / "one", 3)
    deepspeed("--deepspeed", str(ROOT / f"configs/deepspeed/{name}.json"), "--steps", "3",
              "--output-dir", str(tmp_path / name), *COMMON)  # fmt: skip
    assert_losses_close(losses(tmp_path / name), expected)


@pytest.mark.slow
def test_zero3_trains_packed_rows_as_one_process_and_resumes_exactly(tmp_path):
    """`fastseq train --pack` under ZeRO-3: each rank packs its share of the buffer, and the losses
    are one process's accumulating the same two micro-batches; a resumed run picks up the data
    position of the packed stream and repeats the straight run's losses bit for bit."""
    expected = one_process(tmp_path / "one", 4, pack=True)
    run = tmp_path / "z3"
    deepspeed("--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"), "--steps", "4", "--save-every", "2",
              "--output-dir", str(run), "--pack", *COMMON)  # fmt: skip
    straight = losses(run)
    assert_losses_close(straight, expected)
    fractions = [
        json.loads(line).get("real_token_fraction") for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(f is not None and f > 0.9 for f in fractions), fractions

    resumed = tmp_path / "z3_resumed"
    deepspeed("--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"), "--steps", "4", "--pack",
              "--resume", str(run / "checkpoint-2"), "--output-dir", str(resumed), *COMMON)  # fmt: skip
    assert losses(resumed) == straight[2:]  # bit for bit


@pytest.mark.slow
def test_lora_under_zero2_and_zero3_matches_one_process_and_resumes_exactly(tmp_path):
    """LoRA adapters on a frozen base through the launcher: ZeRO-2 and ZeRO-3 (the base partitioned)
    give one process's losses and adapters: a ZeRO-2 run, its resume (bit for bit) and the same
    checkpoint resumed under ZeRO-3 (within 1e-6); the adapters every run writes are peft's (read back
    by `transformers` + `peft`)."""
    import peft
    import transformers as tf
    from safetensors.torch import load_file

    from fastseq.lora import ADAPTER_WEIGHTS
    from fastseq.tokenizers import ByT5Tokenizer

    source = tmp_path / "model"
    hf_model("byt5_like").save_pretrained(source)
    ByT5Tokenizer().save_pretrained(source)
    data = tmp_path / "train.jsonl"
    rows = [{"source": f"item {i} of the list", "target": str(i)} for i in range(64)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    lora = ["--model", str(source), "--data", str(data), "--lora-r", "4", "--lora-dropout", "0",
            "--lora-targets", "q,v,wi_0"]  # fmt: skip
    expected = one_process(tmp_path / "one", 4, model=source, data=str(data), lora_r=4, lora_dropout=0.0,
                           lora_targets="q,v,wi_0")  # fmt: skip
    adapters = load_file(tmp_path / "one" / ADAPTER_WEIGHTS)

    z2 = tmp_path / "z2"
    deepspeed("--deepspeed", "zero2", "--steps", "4", "--save-every", "2", "--output-dir", str(z2), *COMMON, *lora)
    assert_losses_close(losses(z2), expected)
    resumed = tmp_path / "z2_resumed"
    deepspeed("--deepspeed", "zero2", "--steps", "4", "--resume", str(z2 / "checkpoint-2"), "--output-dir",
              str(resumed), *COMMON, *lora)  # fmt: skip
    assert losses(resumed) == losses(z2)[2:]  # bit for bit
    # ZeRO-3 (the base partitioned, the adapters added to it) from the same checkpoint: the adapters'
    # state re-partitioned, the frozen base read from --model again. (That the adapters start alike
    # whatever the build drew before them: tests/test_lora.py.)
    z3 = tmp_path / "z3"
    deepspeed("--deepspeed", "zero3", "--steps", "4", "--resume", str(z2 / "checkpoint-2"), "--output-dir",
              str(z3), *COMMON, *lora)  # fmt: skip
    assert_losses_close(losses(z3), losses(z2)[2:], rel=1e-6)
    assert_losses_close(losses(z3), expected[2:])

    for run in (z2, resumed, z3):
        got = load_file(run / ADAPTER_WEIGHTS)
        assert got.keys() == adapters.keys()
        for name, value in adapters.items():
            assert_close(got[name], value, rel=1e-4, what=f"{run.name} {name}")
    assert (z2 / "checkpoint-2" / ADAPTER_WEIGHTS).is_file()  # a checkpoint is an adapter directory too
    reference = peft.PeftModel.from_pretrained(tf.AutoModelForSeq2SeqLM.from_pretrained(source), z3).eval()
    ours = fastseq.lora.merged_model(z3).eval()
    data = batch("byt5_like")
    with torch.no_grad():
        assert_close(ours(**data).logits, reference(**data).logits, what="logits of the ZeRO-3 adapters")
