"""LoRA through `peft`: adapters on native models equal `transformers` + `peft` (logits, loss and
every adapter gradient), the fused kernels stay on, `fastseq.patch` works on a peft-wrapped
`transformers` model, and `fastseq train --lora-r` writes adapters that `PeftModel.from_pretrained`
loads to generate exactly the predictions fastseq wrote."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import fastseq
from fastseq.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraSettings, add_adapters, save_adapters
from tests.conftest import assert_close, batch, hf_model, refused
from tests.test_finetune import ANIMALS, _run, _spiece_model_dir

peft = pytest.importorskip("peft")

# (kind, targets): attention layers everywhere; T5's feed-forward layers, whose block then runs unfused.
CASES = [
    ("t5_v11_untied", ("q", "v", "wi_0", "wo")),
    ("t5_v10_tied", ("k", "o", "wi")),
    ("longt5_tglobal", ("q", "v")),
    ("blenderbot_small", ("q_proj", "v_proj", "fc1")),
]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-zero adapters (peft starts B at zero, which would hide a dropped adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _adapter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each adapter weight's gradient, keyed by its name in the model peft wrapped."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None, name
            out[name.removeprefix("base_model.model.")] = p.grad
    return out


def _native_with_adapters(kind: str, targets: tuple[str, ...], tmp_path: Path):
    """The `transformers` model of `kind`, the same weights as a native model with random adapters on
    `targets` (saved in peft's format under tmp_path/adapters), and `transformers` + peft loading them."""
    hf = hf_model(kind)
    hf.save_pretrained(tmp_path / "base")
    ours = fastseq.from_pretrained(tmp_path / "base").eval()
    wrapper = add_adapters(ours, LoraSettings(r=4, alpha=8.0, dropout=0.0, targets=targets), str(tmp_path / "base"))
    _randomize(ours, seed=7)
    save_adapters(wrapper, tmp_path / "adapters")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapters", is_trainable=True).eval()
    return ours, theirs


@pytest.mark.parametrize("kind, targets", CASES, ids=[c[0] for c in CASES])
def test_adapters_on_a_native_model_equal_transformers_and_peft(kind, targets, tmp_path, reference_backend):
    ours, theirs = _native_with_adapters(kind, targets, tmp_path)
    adapted = [name for name, _ in ours.named_modules() if name.rsplit(".", 1)[-1] in targets]
    assert adapted and sum(p.requires_grad for p in ours.parameters()) == 2 * len(adapted)  # A and B train, only
    data = batch(kind)
    a, b = ours(**data), theirs(**data)
    assert_close(a.logits, b.logits, what="logits")
    assert_close(a.loss, b.loss, what="loss")
    a.loss.backward()
    b.loss.backward()
    mine, reference = _adapter_grads(ours), _adapter_grads(theirs)
    assert mine.keys() == reference.keys()
    for name, grad in mine.items():
        assert_close(grad, reference[name], what=name)


def test_the_adapters_start_from_the_seed_alone(tmp_path):
    """The adapters' initial values depend on the seed only, not on what the process drew before (ZeRO-3's
    partitioned build draws for the base first); the caller's generator is left as it was."""
    hf_model("t5_v11_untied").save_pretrained(tmp_path / "base")
    settings = LoraSettings(r=4, alpha=8.0, dropout=0.0, targets=("q", "v"))
    starts = []
    for draws in (0, 100):
        model = fastseq.from_pretrained(tmp_path / "base")
        torch.manual_seed(1)
        torch.rand(draws)
        before = torch.random.get_rng_state()
        add_adapters(model, settings, None, seed=5)
        assert torch.equal(torch.random.get_rng_state(), before)
        starts.append({n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A" in n})
    assert starts[0].keys() == starts[1].keys() and starts[0]
    assert all(torch.equal(starts[0][n], starts[1][n]) for n in starts[0])
    other = fastseq.from_pretrained(tmp_path / "base")
    add_adapters(other, settings, None, seed=6)
    assert not all(torch.equal(p, starts[0][n]) for n, p in other.named_parameters() if ".lora_A" in n)


def test_adapters_under_gradient_checkpointing_get_the_same_gradients(tmp_path, reference_backend):
    """Checkpointed blocks (a frozen base: their inputs need no gradient) still give every adapter its
    gradient: the loss and gradients equal the run without checkpointing."""
    ours, _ = _native_with_adapters("t5_v11_untied", ("q", "v", "wi_0"), tmp_path)
    ours.train()
    data = batch("t5_v11_untied")
    ours(**data).loss.backward()
    expected = {k: v.clone() for k, v in _adapter_grads(ours).items()}
    ours.zero_grad()
    ours.gradient_checkpointing_enable(True)
    ours(**data).loss.backward()
    got = _adapter_grads(ours)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad.abs().max() > 0, name
        assert_close(grad, expected[name], what=name)


def test_the_kernels_stay_on_under_adapters(tmp_path, triton_backend, monkeypatch):
    """Through the Triton interpreter: attention's kernel runs on adapted q/v projections, the FFN block
    without adapters stays fused, and the numbers are `transformers` + peft's."""
    import importlib

    from fastseq.kernels import _backend

    ffn_module = importlib.import_module("fastseq.kernels.gated_gelu")
    if not _backend.interpreting():
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on a CPU")
    fused = []
    monkeypatch.setattr(ffn_module._FFN, "apply", lambda *a, f=ffn_module._FFN.apply: fused.append(1) or f(*a))
    ours, theirs = _native_with_adapters("t5_v11_untied", ("q", "v"), tmp_path)
    data = batch("t5_v11_untied", B=2, Le=9, Ld=5)
    a, b = ours(**data), theirs(**data)
    assert fused, "the fused feed-forward did not run"
    assert_close(a.logits, b.logits, rel=1e-4, what="logits")


def _train_losses(model, steps: int) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(steps):
        loss = model(**batch("t5_v11_untied", seed=100 + step % 2)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_patch_works_on_a_peft_wrapped_transformers_model(reference_backend):
    """`fastseq.patch` on a `transformers` T5 that peft wrapped (adapters on q, v and the gated FFN's
    wi_0): the attention and norms are patched, the FFN block with an adapter runs its own forward, and
    ten AdamW steps give the unpatched model's losses, as close as its fp32 losses are to float64's."""
    base = hf_model("t5_v11_untied").train()
    config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "v", "wi_0"],
                             lora_dropout=0.0)  # fmt: skip
    torch.manual_seed(3)
    ref = peft.get_peft_model(base, config)
    _randomize(ref, seed=5)
    ours = fastseq.patch(copy.deepcopy(ref))
    from fastseq.patch import patched_modules

    patched = patched_modules(ours)
    assert any(name.endswith("SelfAttention") for name in patched), patched
    exact = _train_losses(copy.deepcopy(ref).double(), 10)
    expected, got = _train_losses(ref, 10), _train_losses(ours, 10)
    assert expected[-1] < 0.97 * expected[0]  # the adapters learn
    drift = 0.0
    for step, (a, b, e) in enumerate(zip(got, expected, exact, strict=True)):
        drift = max(drift, abs(b - e))
        assert abs(a - e) <= 2 * drift + 1e-5 * abs(e), f"step {step}: patched {a}, unpatched {b}, float64 {e}"


# ---- through the CLI ----------------------------------------------------------------------------


def _data(path: Path) -> Path:
    with path.open("w") as f:
        for a in ANIMALS:
            for b in ANIMALS:
                f.write(json.dumps({"source": f"the {a} saw the {b}", "target": f"{b} {a}"}) + "\n")
    return path


def _lora_run(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--max-eval-samples", "8",
            "--batch-size", "16", "--lora-r", "8", "--lora-targets", "q,v,wi_0", "--lora-dropout", "0.1",
            "--optimizer", "adamw", "--lr", "3e-2", "--max-new-tokens", "6", "--log-every", "1",
            "--output-dir", str(out), "--quiet", *extra]  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lora_fine_tuning_through_the_cli_is_what_transformers_and_peft_load(tmp_path, capfd, reference_backend):
    """`fastseq train --lora-r`: the base's files are untouched, OUTPUT holds peft's adapter files,
    `transformers` + `peft` loading them generate exactly the predictions fastseq wrote and give its
    logits; `fastseq generate` on OUTPUT and `fastseq convert --merge-lora` agree with them."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from fastseq.files import fingerprint

    model = _spiece_model_dir(tmp_path / "flan-tiny", vocab_size=160)
    before = fingerprint(model)
    data, out = _data(tmp_path / "train.jsonl"), tmp_path / "run"
    _run(capfd, *_lora_run(model, data, out, "--steps", "20"))
    assert fingerprint(model) == before
    written = {p.name for p in out.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "generation_config.json", "spiece.model"} <= written
    assert not (out / "model.safetensors").exists()
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16.0, ["q", "v", "wi_0"])
    assert config["base_model_name_or_path"] == str(model.resolve())
    predictions = [json.loads(line) for line in (out / "eval_predictions-20.jsonl").read_text().splitlines()]
    sources = [p["source"] for p in predictions]
    assert any(p["prediction"] for p in predictions)  # not all empty: the comparison below means something

    tokenizer = AutoTokenizer.from_pretrained(out)
    hf = peft.PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(model), out).eval()
    inputs = tokenizer(sources, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = hf.generate(**inputs, max_new_tokens=6, num_beams=1, do_sample=False)
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == [p["prediction"] for p in predictions]

    generated = tmp_path / "generated.jsonl"
    (tmp_path / "sources.jsonl").write_text("".join(json.dumps({"source": s}) + "\n" for s in sources))
    _run(capfd, "generate", "--model", str(out), "--input-file", str(tmp_path / "sources.jsonl"),
         "--input-field", "source", "--output-file", str(generated), "--max-new-tokens", "6", "--quiet")  # fmt: skip
    lines = [json.loads(line) for line in generated.read_text().splitlines()]
    assert [line[next(k for k in line if k != "source")] for line in lines] == [p["prediction"] for p in predictions]

    _run(capfd, "convert", "--merge-lora", str(out), str(tmp_path / "merged"))
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    labels = tokenizer([p["target"] for p in predictions], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = hf(**inputs, labels=labels).logits
        assert_close(merged(**inputs, labels=labels).logits, expected, what="merged logits")
        ours = fastseq.lora.merged_model(out)(**inputs, labels=labels).logits
    assert_close(ours, expected, what="fastseq's logits")


def test_a_lora_run_resumes_exactly(tmp_path, capfd, reference_backend):
    """3 steps, a resume and 3 more give the 6 steps' losses and adapters, bit for bit (adapter dropout on)."""
    from safetensors.torch import load_file

    model = _spiece_model_dir(tmp_path / "flan-tiny", vocab_size=160)
    data = _data(tmp_path / "train.jsonl")
    _run(capfd, *_lora_run(model, data, tmp_path / "whole", "--steps", "6", "--metric", "none"))
    _run(capfd, *_lora_run(model, data, tmp_path / "part", "--steps", "3", "--metric", "none"))
    _run(capfd, *_lora_run(model, data, tmp_path / "part", "--steps", "6", "--metric", "none", "--resume"))
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")
    a, b = (load_file(tmp_path / run / ADAPTER_WEIGHTS) for run in ("whole", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Another rank, or other targets, is another run: its checkpoint is not continued.
    line = refused(capfd, [*_lora_run(model, data, tmp_path / "part", "--steps", "9", "--metric", "none", "--resume"),
                           "--lora-r", "4"])  # fmt: skip
    assert "lora" in line


def test_lora_refusals(tmp_path, capfd, reference_backend):
    from fastseq.files import fingerprint

    model = _spiece_model_dir(tmp_path / "flan-tiny", vocab_size=160)
    data = _data(tmp_path / "train.jsonl")
    base = ["train", "--data", str(data), "--steps", "1", "--output-dir", str(tmp_path / "o"), "--quiet"]
    refused(capfd, [*base, "--model", str(model), "--lora-r", "4", "--lora-targets", "q,lm_head"],
            "--lora-targets lm_head", "fused kernels")  # fmt: skip
    refused(capfd, [*base, "--model", str(model), "--lora-r", "4", "--lora-targets", "q_proj"], "q_proj")
    refused(capfd, [*base, "--model", str(model), "--lora-alpha", "16"], "--lora-alpha", "--lora-r")
    refused(capfd, [*base, "--model", str(model), "--lora-r", "-1"], "--lora-r")
    refused(capfd, [*base, "--model", str(model), "--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout")
    refused(capfd, [*base, "--model", str(model), "--lora-r", "4", "--random-init"], "random weights")
    refused(capfd, [*base, "--lora-r", "4"], "random weights")  # the embedded default
    refused(capfd, ["convert", "--merge-lora", str(model), str(tmp_path / "m")], "--merge-lora", ADAPTER_CONFIG)
    refused(capfd, ["convert", str(model), str(tmp_path / "m"), "--base", str(model)], "--base", "--merge-lora")
    adapters = tmp_path / "adapters"
    wrapper = add_adapters(fastseq.from_pretrained(model), LoraSettings(4, 8.0, 0.0, ("q",)), str(model.resolve()))
    save_adapters(wrapper, adapters)
    before = fingerprint(model)
    refused(capfd, ["convert", "--merge-lora", str(adapters), str(model)], "DST", "base model")
    refused(capfd, ["convert", "--merge-lora", str(adapters), str(model / "sub")], "DST", "base model")
    assert fingerprint(model) == before
    # A base of another width: one line naming an adapter and both shapes (peft's error listed every one).
    import dataclasses

    from fastseq.models import T5ForConditionalGeneration

    config = fastseq.from_pretrained(model).config
    wide = tmp_path / "wide"
    T5ForConditionalGeneration(dataclasses.replace(config, d_model=2 * config.d_model)).save_pretrained(wide)
    line = refused(capfd, ["convert", "--merge-lora", str(adapters), str(tmp_path / "m2"), "--base", str(wide)],
                   f"{adapters / ADAPTER_WEIGHTS} does not fit this base model (", "pass the base model they were "
                   "trained on")  # fmt: skip
    assert f"[4, {config.d_model}] saved, [4, {2 * config.d_model}] here" in line, line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
