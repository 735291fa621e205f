"""Linear warm-up followed by polynomial decay, for any torch.optim optimizer.

The schedule LARS was published with (You et al.: poly(2) decay with warm-up): for step t
(the number of `scheduler.step()` calls so far), warm-up length W and total length T,

    factor(t) = (t + 1) / W                       for t < W
    factor(t) = (1 − (t − W) / (T − W)) ** power  for W <= t < T
    factor(t) = 0                                 for t >= T

and each group's lr is its initial lr times factor(t). With W = 0 this is exactly
γ0·(1 − t/T)^power (LARS's polynomial decay). The warm-up starts at γ0/W rather than 0, so no step is
wasted, reaches γ0 at t = W − 1, and the decay starts from γ0 at t = W, so the curve is
continuous and never jumps.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupPolyLR", "warmup_poly", "warmup_poly_factor"]


def warmup_poly_factor(t: int, warmup_steps: int, total_steps: int, power: float = 2.0) -> float:
    """The multiplier of the initial lr at step ``t`` (see the module docstring)."""
    if t < warmup_steps:
        return (t + 1) / warmup_steps
    if t >= total_steps:
        return 0.0
    return (1.0 - (t - warmup_steps) / (total_steps - warmup_steps)) ** power


class _WarmupPolyFactor:
    # A callable object rather than a closure: LambdaLR.state_dict saves an object's
    # __dict__ (plain ints and floats, fine for torch.load(weights_only=True)) but drops
    # closures and lambdas.
    def __init__(self, warmup_steps: int, total_steps: int, power: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.power = power

    def __call__(self, t: int) -> float:
        return warmup_poly_factor(t, self.warmup_steps, self.total_steps, self.power)


class WarmupPolyLR(LambdaLR):
    """A ``LambdaLR`` whose factor is the linear-warm-up / polynomial-decay curve.

    Works with any optimizer and with a tensor lr (the scheduler writes it in place, so a
    compiled ``opt.step`` sees the new value without recompiling). Call
    ``scheduler.step()`` once after every ``optimizer.step()``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        power: float = 2.0,
        last_epoch: int = -1,
    ) -> None:
        _check(warmup_steps, total_steps, power)
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.power = float(power)
        super().__init__(
            optimizer, _WarmupPolyFactor(warmup_steps, total_steps, float(power)), last_epoch
        )


def _check(warmup_steps: Any, total_steps: Any, power: Any) -> None:
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"warmup_poly: {name} must be an int (a number of scheduler.step() calls), "
                f"got {type(value).__name__} {value!r}"
            )
    if warmup_steps < 0:
        raise ValueError(
            f"warmup_poly: warmup_steps must be >= 0, got warmup_steps={warmup_steps}; "
            "use 0 for no warm-up"
        )
    if total_steps <= warmup_steps:
        raise ValueError(
            f"warmup_poly: total_steps must exceed warmup_steps, got total_steps={total_steps} "
            f"and warmup_steps={warmup_steps}; total_steps counts the warm-up too"
        )
    if (
        isinstance(power, bool)
        or not isinstance(power, (int, float))
        or not math.isfinite(power)
        or power < 0
    ):
        raise ValueError(
            f"warmup_poly: power must be a finite number >= 0, got power={power!r}; "
            "2 is the LARS paper's value"
        )


def warmup_poly(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int,
    power: float = 2.0,
    last_epoch: int = -1,
) -> WarmupPolyLR:
    """Linear warm-up for ``warmup_steps`` steps, then γ0·(1 − t'/T')^power to 0 at ``total_steps``.

    Returns a :class:`WarmupPolyLR` (a ``torch.optim.lr_scheduler.LambdaLR``).

    Example::

        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> sched = warmup_poly(opt, warmup_steps=2, total_steps=6)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> lrs  # [0.5, 1.0, 1.0, 0.5625, 0.25, 0.0625]
    """
    return WarmupPolyLR(optimizer, warmup_steps, total_steps, power, last_epoch)
