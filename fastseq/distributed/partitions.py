"""Which pieces of the model's parameters each flat tensor of DeepSpeed's optimizer holds.

DeepSpeed's ZeRO optimizers (stages 1 and 2, stage 3, and the bf16 optimizer of pipelines) hand the
optimizer they wrap one flat fp32 tensor per parameter group (per sub-group under ZeRO-3): this
rank's partition of the group's parameters, flattened. An optimizer that works on matrices
(Adafactor's factored second moment, its parameter-scaled step) needs to know which stretch of which
parameter every part of that tensor is; `layouts` reads it from DeepSpeed's own bookkeeping:

- ZeRO-1/2 and the bf16 optimizer: a group's parameters are laid end to end (with DeepSpeed's
  alignment padding) in one flat buffer cut into equal partitions, one per data-parallel rank;
- ZeRO-3: each parameter is cut into equal partitions of its own (the last one padded), and a
  sub-group's flat tensor is this rank's partitions of its parameters, end to end.
"""

from __future__ import annotations

import math

import torch

from fastseq.optim import Adafactor, Layout, Piece


def pieces(numels: list[int], offsets: list[int], low: int, high: int) -> list[Piece]:
    """The pieces of parameters laid at `offsets` (numels long) of a flat buffer that fall inside the
    partition [low, high) of it."""
    found = []
    for index, (numel, offset) in enumerate(zip(numels, offsets, strict=True)):
        start, end = max(low, offset), min(high, offset + numel)
        if start < end:
            found.append(Piece(index, start - offset, start - low, end - start))
    return found


def _laid_end_to_end(names: list[str], shapes: list[tuple[int, ...]], offsets: list[int],
                     partitions: list[torch.Tensor], group) -> Layout:  # fmt: skip
    """The layout of this rank's partition of parameters laid end to end at `offsets` of a flat
    buffer cut into `partitions` over the ranks of `group`."""
    rank = torch.distributed.get_rank(group=group)
    low = sum(t.numel() for t in partitions[:rank])
    held = pieces([math.prod(s) for s in shapes], offsets, low, low + partitions[rank].numel())
    return Layout(names, shapes, held, group)


def end_to_end(numels: list[int]) -> list[int]:
    offsets, total = [], 0
    for numel in numels:
        offsets.append(total)
        total += numel
    return offsets


def layouts(optimizer, names: dict[torch.Tensor, str]) -> dict[torch.Tensor, Layout]:
    """Each flat tensor DeepSpeed's `optimizer` (what `deepspeed.initialize` returns as the engine's
    optimizer) steps, with the layout of the parameters it holds pieces of; `names` names the model's
    parameters. Empty when the wrapped optimizer steps the model's own parameters (no ZeRO, fp32)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    found = {}
    world = torch.distributed.group.WORLD  # DeepSpeed's None for a group
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        for sub_group, params in enumerate(optimizer.fp16_groups):
            group = optimizer.sub_group_process_groups[sub_group] or world
            rank = torch.distributed.get_rank(group=group)
            held, offset = [], 0
            for index, param in enumerate(params):
                size = param.partition_numel()
                start = rank * size
                length = max(0, min(size, param.ds_numel - start))
                if length:
                    held.append(Piece(index, start, offset, length))
                offset += size
            shapes = [tuple(p.ds_shape) for p in params]
            found[optimizer.fp32_partitioned_groups_flat[sub_group]] = Layout(
                [names[p] for p in params], shapes, held, group
            )
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        for i, params in enumerate(optimizer.round_robin_bit16_groups):
            shapes = [tuple(meta.shape) for meta in optimizer.round_robin_bit16_meta[i]]
            found[optimizer.single_partition_of_fp32_groups[i]] = _laid_end_to_end(
                [names[p] for p in params], shapes, optimizer.round_robin_bit16_offsets[i],
                optimizer.parallel_partitioned_bit16_groups[i], optimizer.real_dp_process_group[i] or world
            )  # fmt: skip
    elif isinstance(optimizer, BF16_Optimizer):
        for i, params in enumerate(optimizer.bf16_groups):
            shapes = [tuple(p.shape) for p in params]
            found[optimizer.fp32_groups_flat_partition[i]] = _laid_end_to_end(
                [names[p] for p in params], shapes, end_to_end([p.numel() for p in params]),
                optimizer.bf16_partitioned_groups[i], optimizer.real_dp_process_group[i] or world
            )  # fmt: skip
    return found


def parameter_names(model: torch.nn.Module) -> dict[torch.Tensor, str]:
    """Each parameter of `model` and its name (a tied one under its first name)."""
    return {p: name for name, p in model.named_parameters()}


def spread_adafactor(optimizer, model: torch.nn.Module) -> None:
    """Tell the Adafactor that DeepSpeed's `optimizer` wraps which pieces of `model`'s matrices its
    flat tensors hold, so it steps them as one process would (nothing for another optimizer)."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, Adafactor):
        return
    inner.spread(layouts(optimizer, parameter_names(model)))
