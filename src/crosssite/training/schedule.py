"""Learning-rate schedules as pure functions of the global step, so resuming needs only the step count.

- cosine annealing from ``lr`` to ``lr_min`` over the run (paper Eq. 2), per optimiser step or per epoch;
- step decay x0.1 every 30 of 100 epochs (the original COVID-Net baseline), the period scaled to the epoch count.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "step_decay_period"]


def step_decay_period(epochs: int) -> int:
    """Epochs between x0.1 decays: 30 for the paper's 100 epochs, scaled proportionally (at least 1)."""
    return max(1, round(30 * epochs / 100))


def lr_at(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    lr: float,
    lr_min: float,
    kind: str = "cosine",
    per: str = "step",
) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of a run of ``epochs * steps_per_epoch`` steps."""
    if kind == "step":
        epoch = step // steps_per_epoch
        return lr * 0.1 ** (epoch // step_decay_period(epochs))
    if kind != "cosine":
        raise ValueError(f"unknown schedule {kind!r}")
    if per == "epoch":
        progress, total = step // steps_per_epoch, epochs
    else:
        progress, total = step, epochs * steps_per_epoch
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(progress, total) / total))
