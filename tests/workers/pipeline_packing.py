"""Worker for tests/distributed/test_pipeline.py, started by the `deepspeed` launcher: two pipeline
stages (one rank each) train a few steps on packed rows, then a fresh pipeline from the same weights
on the same examples padded; rank 0 writes both runs' losses."""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch

from fastseq.distributed.engine import release_shared_memory
from fastseq.distributed.stages import load_directory, pipeline_module, stage_inputs
from fastseq.models import FAMILIES
from tests.models.test_packing import ROW_SOURCE, ROW_TARGET, ROWS, examples, packed, padded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a model directory")
    parser.add_argument("--kind", required=True, help="the kind of tests.conftest.KINDS it was made from")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    release_shared_memory()
    with open(f"{args.model}/config.json") as f:
        raw = json.load(f)
    config = FAMILIES[raw["model_type"]][0].from_hf_dict(raw)
    pairs = examples(args.kind)
    runs = {}
    for name, batch in (("packed", packed(pairs, ROWS, ROW_SOURCE, ROW_TARGET)), ("padded", padded(pairs))):
        module = pipeline_module(config, 2)
        load_directory(module, config, args.model)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        ds_config = {"train_micro_batch_size_per_gpu": len(batch["labels"]), "gradient_accumulation_steps": 1,
                     "steps_per_print": 1000}  # fmt: skip
        engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        runs[name] = [
            engine.train_batch(data_iter=iter([(stage_inputs(config, batch), batch["labels"])])).item()
            for _ in range(args.steps)
        ]
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": runs, "world": torch.distributed.get_world_size()}, f)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
