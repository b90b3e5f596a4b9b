"""`fastseq plan`: model-state memory agrees with DeepSpeed's own estimators."""

from __future__ import annotations

import pytest

from fastseq.distributed.plan import GIB, model_sizes, plan


def _deepspeed_estimates(P: int, largest: int, gpus_per_node: int, nodes: int) -> dict[str, tuple[int, int]]:
    """strategy -> (CPU bytes per node, GPU bytes) from DeepSpeed's estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    z3 = {
        "ZeRO-3": dict(cpu_offload=False, cpu_offload_params=False),
        "ZeRO-3 + offload optimizer": dict(cpu_offload=True, cpu_offload_params=False),
        "ZeRO-3 + offload params+optimizer": dict(cpu_offload=True, cpu_offload_params=True),
    }
    out = {
        "ZeRO-2": estimate_zero2_model_states_mem_needs(P, gpus_per_node, nodes, cpu_offload=False),
        "ZeRO-2 + offload optimizer": estimate_zero2_model_states_mem_needs(P, gpus_per_node, nodes, cpu_offload=True),
    }
    for name, kw in z3.items():
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(P, largest, gpus_per_node, nodes, zero_init=True, **kw)
        out[name] = (cpu, gpu)
    return out


@pytest.mark.parametrize(("preset", "gpus", "per_node"), [("t5-11b", 8, 8), ("google/mt5-xxl", 16, 8),
                                                           ("google/t5-v1_1-base", 2, 2)])  # fmt: skip
def test_model_states_agree_with_deepspeed_within_5_percent(preset, gpus, per_node):
    rows = {r.strategy: r for r in plan(preset, gpus=gpus, gpus_per_node=per_node)}
    P, largest, _ = model_sizes(preset)
    for name, (cpu, gpu) in _deepspeed_estimates(P, largest, per_node, gpus // per_node).items():
        row = rows[name]
        states = row.params + row.grads + row.optimizer
        assert abs(states - gpu) <= 0.05 * gpu, f"{name}: GPU {states / GIB:.2f} GiB vs DeepSpeed {gpu / GIB:.2f}"
        assert abs(row.cpu_per_node - cpu) <= 0.05 * cpu, f"{name}: CPU {row.cpu_per_node / GIB:.2f} vs {cpu / GIB:.2f}"


def test_t5_11b_on_8_x_80gb(capsys):
    rows = {r.strategy: r for r in plan("t5-11b", gpus=8, gpus_per_node=8)}
    zero3 = rows["ZeRO-3"]
    assert 23 <= (zero3.params + zero3.grads + zero3.optimizer) / GIB <= 25  # about 24 GiB of model states
    assert {"pipeline 2 stages x 4 data parallel", "pipeline 8 stages x 1 data parallel"} <= set(rows)
    from fastseq.cli import main

    assert main(["plan", "--model", "t5-11b", "--gpus", "8", "--gpu-mem", "80", "--cpu-mem", "1000"]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 " in out and "fits:" in out and "11.31B parameters" in out
    assert main(["plan", "--model", "t5-11b", "--gpus", "6", "--gpus-per-node", "4"]) == 2  # 6 is not 4 x nodes
