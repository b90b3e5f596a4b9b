"""Worker for tests/distributed/test_zero.py: one gloo rank builds the default model under ZeRO-3
for each answer DeepSpeed's accelerator could give about fp16 support, and prints the dtypes of the
partitions for an fp32 and a bf16 config. They must follow the config, whatever the CPU."""

from __future__ import annotations

import json
import os

import deepspeed
from deepspeed.accelerator import get_accelerator

from fastseq.distributed import config as ds_config
from fastseq.distributed.engine import ZeroEngine
from fastseq.train import TrainArgs
from fastseq.train.engine import default_config


def main() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    deepspeed.init_distributed(dist_backend="gloo")
    model_config = default_config()
    accelerator = get_accelerator()
    found = {}
    for fp16_supported in (False, True):
        accelerator.is_fp16_supported = lambda answer=fp16_supported: answer
        for precision in ("fp32", "bf16"):
            args = TrainArgs(batch_size=2, precision=precision, lr=1e-3, device="cpu")
            engine = ZeroEngine(args, model_config, ds_config.load(os.environ["ZERO3_CONFIG"]))
            model = engine.build_model(model_config)
            dtypes = sorted({str(p.ds_tensor.dtype) for p in model.parameters()})
            found[f"fp16_supported={fp16_supported} {precision}"] = dtypes
    print(json.dumps(found))


if __name__ == "__main__":
    main()
