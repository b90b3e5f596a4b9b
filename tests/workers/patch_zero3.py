"""Worker for tests/test_patch_zero3.py, started by the `deepspeed` launcher: a patched transformers
T5 trained a few steps under ZeRO-3 (every parameter partitioned, the LM head too) with the fused loss."""

from __future__ import annotations

import argparse
import importlib
import json

import deepspeed
import torch

import fastseq
from fastseq.distributed.engine import release_shared_memory
from tests.conftest import batch, hf_model

fpatch = importlib.import_module("fastseq.patch")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="t5_v11_untied")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--unpatched", action="store_true", help="the transformers model as it is, for comparison")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    release_shared_memory()
    rank = torch.distributed.get_rank()

    calls = {"linear_cross_entropy": 0}
    real = fpatch.kernels.linear_cross_entropy

    def counting(hidden, weight, labels, *a, **k):
        calls["linear_cross_entropy"] += 1
        calls["weight_shape"] = list(weight.shape)  # the gathered head, not this rank's shard
        return real(hidden, weight, labels, *a, **k)

    fpatch.kernels.linear_cross_entropy = counting
    model = hf_model(args.kind).train()
    if not args.unpatched:
        fastseq.patch(model)
    config = {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1000,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    head = model.get_output_embeddings().weight
    partitioned = head.numel() == 0 and head.ds_numel == model.config.vocab_size * model.config.d_model
    losses = []
    for step in range(args.steps):
        # Every rank takes the same batch: the data-parallel mean gradient is then the one-process gradient.
        data = batch(args.kind, seed=100 + step)
        loss = engine(**data).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if rank == 0:
        result = dict(losses=losses, head_partitioned=bool(partitioned), world=torch.distributed.get_world_size())
        with open(args.out, "w") as f:
            json.dump(result | calls, f)


if __name__ == "__main__":
    main()
