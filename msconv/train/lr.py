"""The learning rate of a training run: one pure function of the schedule position, written by the
loop before every step.

``lr(t) = peak * warmup_poly_factor(t, warmup, total, power) * stage_scale`` — linear warm-up, then
polynomial decay to 0 at ``total`` (:func:`msconv.optim.warmup_poly_factor`), times the stage's
large-batch scale. ``t`` counts the steps the schedule has passed (skipped ones, and iterations an
early stage end skips, included). Nothing is stepped and nothing is saved: a resumed run recomputes
the rate from its position, and a new peak (``--resume --lr``) applies from the next step on.
"""
from __future__ import annotations

import torch

from msconv.optim.schedule import warmup_poly_factor

__all__ = ["LearningRate"]


class LearningRate:
    """``peak`` with ``warmup_steps`` of linear warm-up and polynomial decay (``power``) to 0 at
    ``total_steps``."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, power: float = 1.0) -> None:
        self.peak, self.warmup_steps, self.total_steps, self.power = float(peak), warmup_steps, total_steps, power

    def at(self, t: int, scale: float = 1.0) -> float:
        """The rate for step ``t`` (0-based) of a stage whose rate is scaled by ``scale``."""
        return self.peak * warmup_poly_factor(t, self.warmup_steps, self.total_steps, self.power) * scale

    def write(self, optimizer: torch.optim.Optimizer, t: int, scale: float = 1.0) -> float:
        """Set every parameter group's ``lr`` to :meth:`at` (in place for a tensor lr, so a compiled
        optimizer step sees it without recompiling); returns it."""
        value = self.at(t, scale)
        for g in optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(value)
            else:
                g["lr"] = value
        return value

    def __repr__(self) -> str:
        return (f"LearningRate(peak={self.peak:g}, warmup_steps={self.warmup_steps}, total_steps={self.total_steps}, "
                f"power={self.power:g})")
