"""Optimizers and learning-rate schedules for training.

- `Adafactor`: T5's optimizer (Shazeer & Stern, 2018): second moments factored into row and
  column statistics for matrices (memory O(n + m) instead of O(n m)), the decay
  `1 - step ** decay_rate`, update clipping by RMS, and optionally the relative step size
  `min(1e-2, 1 / sqrt(step))` scaled by each parameter's RMS. Math in fp32 whatever the
  parameter dtype.
- `make_optimizer(name, params, lr, weight_decay)`: "adamw" or "adafactor".
- `make_schedule(optimizer, name, warmup_steps, total_steps)`: "constant" (after a linear warm-up),
  "linear" (warm-up, then linear decay to 0 at `total_steps`), "inverse_sqrt" (warm-up, then
  `sqrt(warmup / step)`, T5's schedule).
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


def relative_step_size(step: int, *, warmup_init: bool = False) -> float:
    """Adafactor's relative step size at its step `step` (1-based): `min(1e-2, 1 / sqrt(step))`
    (`min(1e-6 * step, ...)` with `warmup_init`), before the scale of each parameter."""
    return min(1e-6 * step if warmup_init else 1e-2, 1.0 / math.sqrt(step))


class Adafactor(Optimizer):
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

    @staticmethod
    def _lr(group: dict, state: dict) -> float:
        lr = group["lr"]
        if group["relative_step"]:
            lr = relative_step_size(state["step"], warmup_init=group["warmup_init"])
        scale = max(group["eps"][1], state["RMS"]) if group["scale_parameter"] else 1.0
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
                grad = p.grad.float()
                if grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p]
                factored = grad.dim() >= 2
                if not state:
                    state["step"] = 0
                    if group["beta1"] is not None:
                        state["exp_avg"] = torch.zeros_like(grad)
                    if factored:
                        state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                        state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["RMS"] = 0.0
                p32 = p.float()
                state["step"] += 1
                state["RMS"] = _rms(p32).item()
                lr = self._lr(group, state)
                beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
                update = grad**2 + group["eps"][0]
                if factored:
                    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                    row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
                    col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
                    # The rank-1 estimate of the second moment, as inverse square roots.
                    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                    c = col.unsqueeze(-2).rsqrt()
                    update = torch.mul(r, c).mul_(grad)
                else:
                    v = state["exp_avg_sq"]
                    v.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
                    update = v.rsqrt().mul_(grad)
                update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
                update.mul_(lr)
                if group["beta1"] is not None:
                    m = state["exp_avg"]
                    m.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                    update = m
                if group["weight_decay"] != 0:
                    p32.add_(p32, alpha=-group["weight_decay"] * lr)
                p32.add_(-update)
                if p.dtype != torch.float32:  # fp32 parameters were updated in place
                    p.copy_(p32)
        return loss


OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "inverse_sqrt")


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
