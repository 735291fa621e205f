"""The divergence guard: a finite loss far above its stage's running median counts as diverged,
and a stop leaves the newest state known to be good.

An exploding loss is still finite for a while, and the weights that produce it are already
ruined, so the guard keeps snapshots of the run state: one every ``snapshot_every`` steps (on the
host; a copy per step would cost as much as a small model's step), promoted to "known good" when
the step after it had a good loss.
"""
from __future__ import annotations

import copy
import statistics

import torch

__all__ = ["DivergenceGuard", "GUARD_WINDOW", "GUARD_WARMUP", "GUARD_SNAPSHOT_EVERY"]

# A loss is compared with the median of the stage's last GUARD_WINDOW good losses, once the stage
# has GUARD_WARMUP of them (early losses fall fast and say little).
GUARD_WINDOW, GUARD_WARMUP = 50, 20
GUARD_SNAPSHOT_EVERY = 10


def _to_cpu(obj):
    """``obj`` with every tensor in it moved to the CPU (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class DivergenceGuard:
    """``factor`` (0: off) times the running median is the limit; see the module docstring."""

    def __init__(self, factor: float, window: int = GUARD_WINDOW, warmup: int = GUARD_WARMUP,
                 snapshot_every: int = GUARD_SNAPSHOT_EVERY) -> None:
        self.factor, self.window, self.warmup, self.snapshot_every = factor, window, warmup, snapshot_every
        self.stage, self.losses = 0, []
        self._pending: dict | None = None
        self._good: dict | None = None

    def diverged(self, stage: int, loss: float) -> str | None:
        """Why a finite ``loss`` of stage ``stage`` counts as diverged (None if it does not)."""
        if self.stage != stage:
            self.stage, self.losses = stage, []
        if not self.factor or len(self.losses) < self.warmup:
            return None
        median = statistics.median(self.losses)
        if median > 0 and loss > self.factor * median:
            return (f"the loss {loss:.4g} is over {self.factor:g}x its running median {median:.4g} (divergence guard, "
                    f"--divergence-factor {self.factor:g})")
        return None

    def good_step(self, loss: float) -> None:
        """A step with a good ``loss``: remember it, and the snapshot taken before it is good."""
        self.losses = (self.losses + [loss])[-self.window:]
        if self._pending is not None:
            self._good, self._pending = self._pending, None

    def snapshot(self, step: int, state_fn, force: bool = False) -> None:
        """Keep ``state_fn()`` (the run state after ``step``) when a snapshot is due (every
        ``snapshot_every`` steps, or ``force``: where a run starts); nothing when the guard is off."""
        if self.factor and (force or step % self.snapshot_every == 0):
            self._pending = copy.deepcopy(_to_cpu(state_fn()))

    def last_good(self) -> dict | None:
        """The newest snapshot known good (else the newest one: the state before any step)."""
        return self._good or self._pending

    def state_dict(self) -> dict:
        return {"stage": self.stage, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.losses = int(state["stage"]), [float(v) for v in state["losses"]]
