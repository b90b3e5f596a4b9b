"""Optimizers and learning-rate schedules for training.

- `Adafactor`: T5's optimizer (Shazeer & Stern, 2018): second moments factored into row and
  column statistics for matrices (memory O(n + m) instead of O(n m)), the decay
  `1 - step ** decay_rate`, update clipping by RMS, and optionally the relative step size
  `min(1e-2, 1 / sqrt(step))` scaled by each parameter's RMS. Math in fp32 whatever the
  parameter dtype.
- `make_optimizer(name, params, lr, weight_decay)`: "adamw" or "adafactor".
- `make_schedule(optimizer, name, warmup_steps, total_steps)`: "constant" (after a linear warm-up),
  "linear" (warm-up, then linear decay to 0 at `total_steps`), "cosine" (warm-up, then half a cosine
  down to 0 at `total_steps`), "inverse_sqrt" (warm-up, then `sqrt(warmup / step)`, T5's schedule):
  `transformers`' schedules of those names.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def relative_step_size(step: int, *, warmup_init: bool = False) -> float:
    """Adafactor's relative step size at its step `step` (1-based): `min(1e-2, 1 / sqrt(step))`
    (`min(1e-6 * step, ...)` with `warmup_init`), before the scale of each parameter."""
    return min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))


def factored(shape: tuple[int, ...]) -> bool:
    """Whether Adafactor factors the second moment of a parameter of `shape` (2-D and up)."""
    return len(shape) >= 2


def factored_numel(shape: tuple[int, ...]) -> int:
    """Elements of Adafactor's second moment of a parameter of `shape`: rows + columns of each matrix
    when factored, else one per element."""
    if not factored(shape):
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


@dataclass(frozen=True)
class Piece:
    """Elements [start, start + length) of parameter `index`'s flattened values, held at
    [offset, offset + length) of a flat tensor."""

    index: int
    start: int
    offset: int
    length: int


@dataclass
class Layout:
    """Which parameters a flat tensor the optimizer steps holds pieces of (ZeRO's partition of a
    parameter group): `names` and `shapes` of every parameter of the group, in the same order on
    every rank of `group` (the process group over which the group's parameters are spread), and
    `pieces`, what this rank holds. A parameter outside ZeRO is its own layout: one whole piece, no
    name, no process group."""

    names: list[str] | None
    shapes: list[tuple[int, ...]]
    pieces: list[Piece]
    group: object = None

    @classmethod
    def whole(cls, param: torch.Tensor) -> Layout:
        return cls(None, [tuple(param.shape)], [Piece(0, 0, 0, param.numel())])

    def key(self, index: int, name: str) -> str:
        """The state entry `name` of parameter `index`."""
        return name if self.names is None else f"{self.names[index]}/{name}"

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks that hold pieces of these parameters."""
        if self.group is not None:
            torch.distributed.all_reduce(values, group=self.group)
        return values


def _rows(values: torch.Tensor, start: int, cols: int) -> tuple[torch.Tensor, int, int]:
    """The stretch `values` of a flattened (..., cols) tensor that begins at its element `start`, as
    whole rows: (a (rows, cols) tensor, zero where `values` does not reach, the first row's index, and
    where `values` begins in it)."""
    lead = start % cols
    rows = -(-(lead + values.numel()) // cols)
    if lead == 0 and values.numel() == rows * cols:
        return values.view(rows, cols), start // cols, 0
    padded = values.new_zeros(rows * cols)
    padded[lead : lead + values.numel()] = values
    return padded.view(rows, cols), start // cols, lead


def _matrix_of_rows(first: int, count: int, shape: tuple[int, ...], device) -> torch.Tensor:
    """Which matrix of a (..., rows, cols) parameter each of its rows first ... first + count - 1 is in."""
    return torch.arange(first, first + count, device=device) // shape[-2]


class Adafactor(Optimizer):
    """T5's Adafactor (see the module's docstring), the same under ZeRO as in one process.

    Its state per parameter (`Layout.key`): `MATRIX_STATES`, a matrix's factored second moment,
    whole; `PIECE_STATES`, one value per element of the piece held (a vector's second moment, the
    first moment with `beta1`); and the parameter's `RMS` at the last step, recomputed each step.

    ZeRO hands its optimizer flat partitions: `spread(layouts)` says which pieces of which matrices
    each one holds. A step then sums the pieces' squared-gradient row and column sums, their squared
    parameters and squared updates over the ranks (a few numbers per matrix), so every rank keeps each
    matrix's factored second moment whole (O(rows + columns), the same on every rank holding a piece of
    it) and applies one process's update to its pieces. Second moments of vectors and the first moment
    (`beta1`) are kept per element, for the rank's pieces only."""

    def __init__(
        self,
        params,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ):
        if lr is not None and relative_step:
            raise ValueError("Adafactor: pass lr=None with relative_step=True, or relative_step=False with an lr")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init needs relative_step=True")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)  # fmt: skip
        super().__init__(params, defaults)
        self.layouts: dict[torch.Tensor, Layout] = {}

    MATRIX_STATES = ("exp_avg_sq_row", "exp_avg_sq_col")
    PIECE_STATES = ("exp_avg_sq", "exp_avg")

    def spread(self, layouts: dict[torch.Tensor, Layout]) -> None:
        """Step each flat tensor of `layouts` as the pieces of matrices its layout says it holds."""
        self.layouts = dict(layouts)

    @staticmethod
    def _lr(group: dict, step: int, rms: float) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            lr = relative_step_size(step, warmup_init=group["warmup_init"])
        scale = max(group["eps"][1], rms) if group["scale_parameter"] else 1.0
        return scale * lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                self._step(group, p, self.layouts.get(p) or Layout.whole(p))
        return loss

    def _step(self, group: dict, p: torch.Tensor, layout: Layout) -> None:
        """One step of the parameters (or pieces of them) that `p` holds, as `layout` says."""
        state = self.state[p]
        state["step"] = state.get("step", 0) + 1
        step, eps, shapes = state["step"], group["eps"][0], layout.shapes
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        p32 = p.float()
        params, grads = p32.view(-1), p.grad.float().view(-1)

        # The sums over each parameter: squared values, and squared gradients by row and by column. They
        # are summed in fp64, so that pieces summed apart and then over ranks give one process's sums once
        # rounded to fp32 (fp32 sums in another order differ in the last bit, and Adafactor's normalized
        # update carries such a difference on).
        sizes = [1 + (factored_numel(s) if factored(s) else 0) for s in shapes]
        sums = torch.zeros(sum(sizes), dtype=torch.float64, device=p.device)
        parts = list(sums.split(sizes))
        for piece in layout.pieces:
            shape, part = shapes[piece.index], parts[piece.index]
            values = params.narrow(0, piece.offset, piece.length)
            part[0] += values.square().sum(dtype=torch.float64)
            if factored(shape):
                squares, first, _ = _rows(grads.narrow(0, piece.offset, piece.length).square().add_(eps),
                                          piece.start, shape[-1])  # fmt: skip
                rows, batch = math.prod(shape[:-1]), math.prod(shape[:-2])
                part[1 : 1 + rows].narrow(0, first, squares.shape[0]).add_(squares.sum(dim=-1, dtype=torch.float64))
                cols = part[1 + rows :].view(batch, shape[-1])
                if batch == 1:
                    cols[0] += squares.sum(dim=0, dtype=torch.float64)
                else:
                    cols.index_add_(0, _matrix_of_rows(first, squares.shape[0], shape, p.device), squares.double())
        layout.reduce(sums)
        param_squares = sums[torch.tensor([0, *itertools.accumulate(sizes[:-1])])].tolist()

        # Each held parameter's second moment and step size.
        rates: dict[int, float] = {}
        for index in sorted({piece.index for piece in layout.pieces}):
            shape, part = shapes[index], parts[index]
            rms = math.sqrt(param_squares[index] / math.prod(shape))
            state[layout.key(index, "RMS")] = rms
            rates[index] = self._lr(group, step, rms)
            if factored(shape):
                rows = math.prod(shape[:-1])
                row = state.setdefault(layout.key(index, "exp_avg_sq_row"), grads.new_zeros(shape[:-1]))
                col = state.setdefault(layout.key(index, "exp_avg_sq_col"), grads.new_zeros(shape[:-2] + shape[-1:]))
                row.mul_(beta2t).add_((part[1 : 1 + rows].view(row.shape) / shape[-1]).float(), alpha=1.0 - beta2t)
                col.mul_(beta2t).add_((part[1 + rows :].view(col.shape) / shape[-2]).float(), alpha=1.0 - beta2t)

        # The updates' squares summed over each parameter (for clipping by RMS), then the updates. One
        # process keeps each piece's update; pieces spread over ranks compute theirs again after the sum.
        squares = torch.zeros(len(shapes), dtype=torch.float64, device=p.device)
        updates = []
        for piece in layout.pieces:
            update = self._update(state, layout, piece, grads, eps, beta2t)
            squares[piece.index] += update.square().sum(dtype=torch.float64)
            updates.append(update if layout.group is None else None)
        update_squares = layout.reduce(squares).tolist()
        for piece, update in zip(layout.pieces, updates, strict=True):
            if update is None:
                update = self._update(state, layout, piece, grads, eps, None)
            shape, lr = shapes[piece.index], rates[piece.index]
            rms = math.sqrt(update_squares[piece.index] / math.prod(shape))
            update.div_(max(rms / group["clip_threshold"], 1.0)).mul_(lr)
            if group["beta1"] is not None:
                m = state.setdefault(layout.key(piece.index, "exp_avg"), torch.zeros_like(update))
                m.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                update = m
            values = params.narrow(0, piece.offset, piece.length)
            if group["weight_decay"] != 0:
                values.add_(values, alpha=-group["weight_decay"] * lr)
            values.add_(-update)
        if p.dtype != torch.float32:  # fp32 parameters were updated in place
            p.copy_(p32)

    @staticmethod
    def _update(state: dict, layout: Layout, piece: Piece, grads: torch.Tensor, eps: float,
                beta2t: float | None) -> torch.Tensor:  # fmt: skip
        """The update of `piece` before clipping and the step size: the gradient over the square root
        of the second moment. The elementwise second moment of a vector is decayed and updated first
        unless `beta2t` is None (the update computed again)."""
        shape = layout.shapes[piece.index]
        grad = grads.narrow(0, piece.offset, piece.length)
        if factored(shape):
            row = state[layout.key(piece.index, "exp_avg_sq_row")]
            col = state[layout.key(piece.index, "exp_avg_sq_col")]
            # The rank-1 estimate of the second moment, as inverse square roots, over the piece's rows.
            r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().view(-1)
            c = col.rsqrt().view(-1, shape[-1])
            rows, first, lead = _rows(grad, piece.start, shape[-1])
            update = rows * r.narrow(0, first, rows.shape[0]).unsqueeze(-1)
            if c.shape[0] == 1:
                update = update * c[0]
            else:
                update = update * c.index_select(0, _matrix_of_rows(first, rows.shape[0], shape, grad.device))
            update = update.view(-1)
            return update.narrow(0, lead, piece.length)
        v = state.setdefault(layout.key(piece.index, "exp_avg_sq"), torch.zeros_like(grad))
        if beta2t is not None:
            v.mul_(beta2t).add_(grad.square().add_(eps), alpha=1.0 - beta2t)
        return v.rsqrt().mul_(grad)


OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine", "inverse_sqrt")


def make_optimizer(name: str, params, *, lr: float | None, weight_decay: float = 0.0) -> Optimizer:
    """AdamW (lr required) or Adafactor (lr None: T5's relative step size; else a fixed lr)."""
    if name == "adamw":
        if lr is None:
            raise ValueError("adamw needs a learning rate (--lr)")
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        if lr is None:
            return Adafactor(params, lr=None, relative_step=True, scale_parameter=True, weight_decay=weight_decay)
        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


def schedule_factor(name: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if name == "constant":
        return 1.0
    if name == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if name == "inverse_sqrt":
        return math.sqrt(max(warmup_steps, 1) / max(step, 1))
    raise ValueError(f"unknown schedule {name!r}; use one of {SCHEDULES}")


class RelativeStep:
    """In place of a schedule for Adafactor without a learning rate: its relative step size
    `min(1e-2, 1 / sqrt(step))` is the schedule.

    `get_last_lr()` gives, per parameter group, the relative step size the optimizer's next step
    applies (what a schedule's `get_last_lr()` means after its `step()`), read from the optimizer's
    own step count, so a step the fp16 scaler skipped is not counted. With `scale_parameter` (the
    default) each parameter's update is that rate times max(1e-3, RMS(parameter)), which differs per
    parameter; the reported rate is before that scale."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = optimizer
        self.last_epoch = 0

    def step(self) -> None:
        self.last_epoch += 1

    def get_last_lr(self) -> list[float]:
        return [relative_step_size(self._steps_done(group) + 1, warmup_init=group.get("warmup_init", False))
                for group in self.optimizer.param_groups]  # fmt: skip

    def _steps_done(self, group: dict) -> int:
        for param in group["params"]:
            state = self.optimizer.state.get(param)
            if state and "step" in state:
                return int(state["step"])
        for state in self.optimizer.state.values():  # ZeRO-3 empties the groups between its steps
            if "step" in state:
                return int(state["step"])
        return 0

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state["last_epoch"]


def make_schedule(optimizer: Optimizer, name: str, *, warmup_steps: int, total_steps: int) -> LambdaLR | RelativeStep:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {SCHEDULES}")
    if any(group["lr"] is None for group in optimizer.param_groups):
        return RelativeStep(optimizer)
    return LambdaLR(optimizer, lambda step: schedule_factor(name, step, warmup_steps, total_steps))
