"""`python -m tests.workers.plan_memory`: the activations one-process steps of a tiny T5 v1.1 keep,
with and without gradient checkpointing, as JSON (run under TRITON_INTERPRET=1 FASTSEQ_BACKEND=triton
by tests/distributed/test_plan.py, so that the kernels' own autograd functions save what they save
on a GPU)."""

from __future__ import annotations

import dataclasses
import json

from fastseq.train.engine import default_config
from tests.distributed.test_plan import _measured

# (config, (examples, source tokens, target tokens)): small, the interpreter runs every program; the
# second has a d_ff of 5 d_model, heads x d_kv above d_model and more encoder than decoder layers.
CASES = [
    (dataclasses.replace(default_config(), d_model=64, d_kv=16, d_ff=128, extra={}), (2, 16, 8)),
    (dataclasses.replace(default_config(), d_model=48, d_kv=16, d_ff=256, num_layers=3, extra={}), (2, 24, 12)),
]

if __name__ == "__main__":
    found = [{str(flag): _measured("adamw", flag, config, shape)["activations"] for flag in (False, True)}
             for config, shape in CASES]  # fmt: skip
    print(json.dumps(found))
