"""Resuming a ZeRO checkpoint on another number of ranks or another ZeRO stage, by fastseq's own
re-partitioning.

Beside DeepSpeed's files every rank writes `layout-RANK.json`: which pieces of which parameters each
of its flat partitions holds (`partitions.layouts`). A run on another world size (or stage) builds
its engine as usual, then each rank reads every saved rank's fp32 partition and optimizer state, one
file at a time, and copies what overlaps its own new partitions, piece by piece: the fp32 master
weights, the optimizer's per-element state (AdamW's two moments; Adafactor's vector moments and
first moment), and Adafactor's factored moments, whole, for each matrix it holds a piece of. The
schedule and DeepSpeed's step counters come from rank 0's model-states file. The files are read
with `torch.load(weights_only=True)`, as `fastseq convert` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastseq.optim import Adafactor, Layout, Piece

from .convert import safe_torch_load
from .partitions import layouts, parameter_names


def layout_file(rank: int) -> str:
    return f"layout-{rank}.json"


def write_layouts(directory: Path, rank: int, found: dict[torch.Tensor, Layout]) -> None:
    """`layout-RANK.json`: the layouts of this rank's flat partitions, in DeepSpeed's order of them."""
    records = [{"names": layout.names, "shapes": [list(s) for s in layout.shapes],
                "pieces": [[p.index, p.start, p.offset, p.length] for p in layout.pieces]}
               for layout in found.values()]  # fmt: skip
    (directory / layout_file(rank)).write_text(json.dumps(records) + "\n")


def _read_layouts(directory: Path, rank: int) -> list[Layout]:
    records = json.loads((directory / layout_file(rank)).read_text())
    return [Layout(r["names"], [tuple(s) for s in r["shapes"]], [Piece(*p) for p in r["pieces"]]) for r in records]


def _saved_partitions(directory: Path, rank: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Rank `rank`'s fp32 flat partitions and the wrapped optimizer's state of each (ZeRO-1/2 or ZeRO-3)."""
    with safe_torch_load():
        saved = torch.load(directory / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", map_location="cpu")
    saved = saved["optimizer_state_dict"]
    if "base_optimizer_state" in saved:
        flats, inner = saved["single_partition_of_fp32_groups"], saved["base_optimizer_state"]
    else:
        flats, inner = saved["fp32_flat_groups"], saved["optimizer_state_dict"]
    return flats, [inner["state"].get(i, {}) for i in range(len(flats))]


def _copy(new: dict, flat: torch.Tensor, layout: Layout, piece: Piece, old_flat: torch.Tensor, old_state: dict,
          old: Layout, old_piece: Piece, per_element: list[str]) -> None:  # fmt: skip
    """What `old_piece` (of a saved flat partition) and `piece` (of this rank's `flat`) share of one parameter."""
    start = max(piece.start, old_piece.start)
    end = min(piece.start + piece.length, old_piece.start + old_piece.length)
    if start >= end:
        return
    n, src, dst = end - start, start - old_piece.start, start - piece.start
    flat.data.narrow(0, piece.offset + dst, n).copy_(old_flat.narrow(0, old_piece.offset + src, n))
    for key in per_element:
        target = new.setdefault(key, torch.zeros_like(flat))
        target.narrow(0, piece.offset + dst, n).copy_(old_state[key].narrow(0, old_piece.offset + src, n))
    for kind in Adafactor.PIECE_STATES:
        saved = old_state.get(old.key(old_piece.index, kind))
        if saved is not None:
            target = new.setdefault(layout.key(piece.index, kind), flat.new_zeros(piece.length))
            target.narrow(0, dst, n).copy_(saved.narrow(0, src, n))
    for kind in Adafactor.MATRIX_STATES:
        saved = old_state.get(old.key(old_piece.index, kind))
        if saved is not None:
            new[layout.key(piece.index, kind)] = saved.to(flat.device, copy=True)


@torch.no_grad()
def load(directory: Path, saved_ranks: int, optimizer, model: torch.nn.Module) -> dict:
    """Fill DeepSpeed's `optimizer` (ZeRO-1/2 or ZeRO-3, any world size) from the checkpoint in
    `directory` written by `saved_ranks` ranks, and bring the model's parameters up to date; returns
    rank 0's DeepSpeed model states (the schedule's state and the step counters)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    found = layouts(optimizer, parameter_names(model))
    stage3 = isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3)
    if stage3:
        optimizer.checkpoint_event_prologue()
    targets: dict[str, list] = {}
    for flat, layout in found.items():
        for piece in layout.pieces:
            targets.setdefault(layout.names[piece.index], []).append((flat, layout, piece))
    states: dict[torch.Tensor, dict] = {flat: {} for flat in found}
    for rank in range(saved_ranks):
        flats, saved_states = _saved_partitions(directory, rank)
        for old_flat, old_state, old in zip(flats, saved_states, _read_layouts(directory, rank), strict=True):
            per_element = [k for k, v in old_state.items() if "/" not in k and torch.is_tensor(v) and v.dim() == 1
                           and v.numel() >= old_flat.numel()]  # fmt: skip
            for state in states.values():  # the step count and other scalars: the same in every partition
                for key, value in old_state.items():
                    if "/" not in key and key not in per_element:
                        state.setdefault(key, value.clone() if torch.is_tensor(value) else value)
            for old_piece in old.pieces:
                for flat, layout, piece in targets.get(old.names[old_piece.index], []):
                    _copy(states[flat], flat, layout, piece, old_flat, old_state, old, old_piece, per_element)
    inner = optimizer.optimizer
    for flat, state in states.items():
        inner.state[flat] = state
    if stage3:
        for fp32, low in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat,
                             strict=True):  # fmt: skip
            low.data.copy_(fp32.data)
        optimizer.checkpoint_event_epilogue()
    else:
        optimizer.update_lp_params()
    saved = directory / "mp_rank_00_model_states.pt"  # ZeRO-1/2's; ZeRO-3 writes one per rank
    if not saved.is_file():
        saved = directory / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    with safe_torch_load():
        return torch.load(saved, map_location="cpu")
