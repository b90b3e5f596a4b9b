"""Packed rows (several examples per row, segment ids and per-segment positions) against the same
examples as an ordinary padded batch: the same loss, the same gradient of every parameter and, for
each segment, the logits of its example."""

from __future__ import annotations

import copy

import pytest
import torch

from fastseq.models import FAMILIES
from fastseq.models.base import shift_right
from tests.conftest import KINDS, assert_close

PACKING = ["t5_v10_tied", "t5_v11_untied", "mt5_like", "byt5_like", "blenderbot_small"]
# (source length, target length) of each example: lengths past max_distance (20) and single tokens.
LENGTHS = [(7, 5), (25, 3), (3, 8), (12, 1), (9, 6), (1, 4)]
# Which examples share a row: the rows end in padding, a row holds an example of one token.
ROWS = [[1, 2, 5], [0, 3, 4]]
ROW_SOURCE, ROW_TARGET = 31, 16


def model(kind: str, dtype: torch.dtype = torch.float32):
    """A tiny random native model of `kind` (dropout 0), with random norms and biases."""
    model_type, fields = KINDS[kind]
    config_class, classes, default = FAMILIES[model_type]
    torch.manual_seed(0)
    net = classes[default](config_class.from_hf_dict(dict(fields, model_type=model_type)))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(std=0.1)
        if hasattr(net, "final_logits_bias"):
            net.final_logits_bias.normal_()
    return net.to(dtype).train()


def examples(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source ids, target ids) pairs; each target ends with EOS, as a collator makes them."""
    config = KINDS[kind][1]
    g = torch.Generator().manual_seed(1)
    out = []
    for source, target in LENGTHS:
        src = torch.randint(3, config["vocab_size"], (source,), generator=g)
        tgt = torch.randint(3, config["vocab_size"], (target,), generator=g)
        tgt[-1] = config["eos_token_id"]
        out.append((src, tgt))
    return out


def padded(pairs) -> dict[str, torch.Tensor]:
    """One example per row, right padding, labels -100 on padding."""
    Le, Ld = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    input_ids = torch.zeros(len(pairs), Le, dtype=torch.long)
    labels = torch.full((len(pairs), Ld), -100)
    for i, (src, tgt) in enumerate(pairs):
        input_ids[i, : len(src)] = src
        labels[i, : len(tgt)] = tgt
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": labels}


def packed(pairs, rows: list[list[int]], Ls: int, Lt: int) -> dict[str, torch.Tensor]:
    """The examples of each row one after another (segment ids 1, 2, ..., positions from 0 in each),
    then padding: the batch keys of the packing collator."""
    B = len(rows)
    batch = {name: torch.zeros(B, L, dtype=torch.long) for name, L in (
        ("input_ids", Ls), ("segment_ids", Ls), ("positions", Ls),
        ("decoder_segment_ids", Lt), ("decoder_positions", Lt))}  # fmt: skip
    batch["labels"] = torch.full((B, Lt), -100)
    for r, members in enumerate(rows):
        s = t = 0
        for segment, i in enumerate(members, start=1):
            src, tgt = pairs[i]
            for ids, key, start, L in ((src, "", s, len(src)), (tgt, "decoder_", t, len(tgt))):
                batch["input_ids" if not key else "labels"][r, start : start + L] = ids
                batch[f"{key}segment_ids"][r, start : start + L] = segment
                batch[f"{key}positions"][r, start : start + L] = torch.arange(L)
            s, t = s + len(src), t + len(tgt)
        assert s <= Ls and t <= Lt
    batch["attention_mask"] = (batch["segment_ids"] != 0).long()
    return batch


def _grads(net) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


def _run(net, batch):
    out = net(**batch, return_logits=True)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), _grads(net)


def _compare(kind: str, dtype: torch.dtype, rel: float, *, checkpointing: bool = False) -> None:
    pairs = examples(kind)
    plain = model(kind, dtype)
    pack = copy.deepcopy(plain)
    pack.gradient_checkpointing_enable(checkpointing)
    loss, logits, grads = _run(plain, padded(pairs))
    packed_loss, packed_logits, packed_grads = _run(pack, packed(pairs, ROWS, ROW_SOURCE, ROW_TARGET))
    assert_close(packed_loss, loss, rel=rel, what="loss")
    for r, members in enumerate(ROWS):
        t = 0
        for i in members:
            n = len(pairs[i][1])
            assert_close(packed_logits[r, t : t + n], logits[i, :n], rel=rel, what=f"logits of example {i}")
            t += n
    assert set(packed_grads) == set(grads)
    floor = 1e-3 * max(g.abs().max().item() for g in grads.values())
    for name, g in grads.items():
        assert_close(packed_grads[name], g, rel=rel, floor=floor, what=f"grad of {name}")


# Every family on the references in the quick run; through the Triton kernels (the interpreter on the
# CPU, the full matrix) each model type that packs: T5 (v1.1; ByT5 is its modules at other sizes, v1.0's
# ReLU FFN packs through the same attention), mT5 and BlenderbotSmall. The quick run holds the kernels themselves to the
# segment masks (tests/kernels/test_bucketed_attention.py).
TRITON_PACKING = ["t5_v11_untied", "mt5_like", "blenderbot_small"]
CASES = [(kind, "reference") for kind in PACKING] + [pytest.param(kind, "triton", marks=pytest.mark.slow)
                                                     for kind in TRITON_PACKING]  # fmt: skip


@pytest.mark.parametrize("kind, backend", CASES)
def test_packed_rows_give_the_loss_gradients_and_logits_of_the_padded_batch(kind, backend, monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", backend)
    _compare(kind, torch.float32, 1e-5)


@pytest.mark.parametrize("kind", PACKING)
def test_packed_rows_are_exact_in_float64(kind, reference_backend):
    """In float64 the packed and padded runs differ only by summation order."""
    _compare(kind, torch.float64, 1e-10)


@pytest.mark.parametrize("kind", ["t5_v11_untied", "blenderbot_small"])
def test_packed_rows_under_gradient_checkpointing(kind, reference_backend):
    _compare(kind, torch.float32, 1e-5, checkpointing=True)


def test_labels_are_shifted_right_per_segment():
    labels = torch.tensor([[5, 6, 1, 7, 1, -100], [8, 1, 9, 4, 1, 3]])
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 3]])
    start, pad = 0, 9
    assert shift_right(labels, start, pad, segments).tolist() == [[0, 5, 6, 0, 7, 1], [0, 8, 0, 9, 4, 0]]
    assert shift_right(labels, start, pad).tolist() == [[0, 5, 6, 1, 7, 1], [0, 8, 1, 9, 4, 1]]


def test_segment_ids_come_with_decoder_segment_ids(reference_backend):
    net = model("t5_v11_untied")
    batch = packed(examples("t5_v11_untied"), ROWS, ROW_SOURCE, ROW_TARGET)
    with pytest.raises(ValueError, match="segment_ids and decoder_segment_ids together"):
        net(**{k: v for k, v in batch.items() if k != "decoder_segment_ids"})


@pytest.mark.parametrize("kind", ["longt5_local", "longt5_tglobal"])
def test_longt5_refuses_packed_rows_in_one_line(kind, reference_backend):
    net = model(kind)
    batch = packed(examples(kind), ROWS, ROW_SOURCE, ROW_TARGET)
    with pytest.raises(ValueError, match="LongT5 does not pack") as error:
        net(**batch)
    assert "\n" not in str(error.value) and "without --pack" in str(error.value)
    net(**padded(examples(kind)))  # unpacked, it trains
