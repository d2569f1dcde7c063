"""The learning-rate schedule of ``fit``: a per-step factor on every group's base lr but the centres'.

``step``: multiply by ``lr_gamma`` at ``round(f * epochs)`` for every ``f`` in ``lr_milestones``;
``cosine``: half cosine to 0 over the epochs after the warm-up; optional linear warm-up over
``warmup_epochs``. The factor scales every group of the main optimiser (``trainables.optim``); the
class centres of the feature loss have their own optimiser, whose rate is the fixed ``alpha`` of the
center loss. The scheduler runs on the host; with a captured step (``trainables.fast.cuda_graph``) it
writes the learning rates into device tensors the graph reads.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .config import TrainConfig

__all__ = ["LrFactor", "as_float", "load_scheduler_state", "make_scheduler", "milestone_epochs",
           "scheduler_state"]


def milestone_epochs(fractions, epochs: int) -> list[int]:
    """Step-schedule milestones as epochs: ``fraction * epochs`` rounded half up, never epoch 0
    (0.3/0.6/0.8 of 200 -> 60/120/160, the WRN recipe the paper follows on CIFAR)."""
    return [max(1, math.floor(f * epochs + 0.5)) for f in fractions]


class LrFactor:
    """Multiplier of the base lr after ``step`` optimiser steps (a picklable ``LambdaLR`` lambda)."""

    def __init__(self, schedule: str, epochs: int, steps_per_epoch: int, milestones=(), gamma: float = 1.0,
                 warmup_epochs: int = 0):
        self.schedule, self.epochs, self.steps_per_epoch = schedule, epochs, steps_per_epoch
        self.milestone_epochs = milestone_epochs(milestones, epochs)
        self.gamma, self.warmup_epochs = gamma, warmup_epochs

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        t = step / self.steps_per_epoch
        if self.schedule == "step":
            f = self.gamma ** sum(epoch >= m for m in self.milestone_epochs)
        else:  # cosine after the warm-up
            span = max(self.epochs - self.warmup_epochs, 1e-9)
            p = min(max((t - self.warmup_epochs) / span, 0.0), 1.0)
            f = 0.5 * (1.0 + math.cos(math.pi * p))
        if self.warmup_epochs > 0 and t < self.warmup_epochs:
            f *= (step + 1) / (self.warmup_epochs * self.steps_per_epoch)
        return f


def as_float(v: Any) -> Any:
    """A learning rate as a plain float (it is a device tensor when the step is captured)."""
    return float(v) if torch.is_tensor(v) else v


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with one :class:`LrFactor` of ``cfg`` per group of ``optimizer``; float base lrs."""
    factors = [LrFactor(cfg.schedule, cfg.epochs, steps_per_epoch, cfg.lr_milestones, cfg.lr_gamma,
                        cfg.warmup_epochs) for _ in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    scheduler.base_lrs = [as_float(b) for b in scheduler.base_lrs]  # no per-step tensor math
    return scheduler


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    """``scheduler.state_dict()`` with the learning rates as plain floats (device-independent files)."""
    return {k: ([as_float(v) for v in val] if k in ("base_lrs", "_last_lr") else val)
            for k, val in scheduler.state_dict().items()}


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: Mapping[str, Any]) -> None:
    """Restore the step counter only: the schedule (epochs, milestones, steps per epoch, warm-up) and
    the base lrs come from the config, not the file. ``LambdaLR.load_state_dict`` would otherwise write
    the saved lambdas' attributes into ours."""
    base_lrs = list(scheduler.base_lrs)
    sched = {k: v for k, v in state.items() if k != "lr_lambdas"}
    scheduler.load_state_dict({**sched, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    scheduler.base_lrs = base_lrs
