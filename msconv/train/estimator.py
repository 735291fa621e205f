"""The multilevel loss the trainer calls: :class:`msconv.multilevel.MGE`, one per stage."""
from __future__ import annotations

from msconv.multilevel import MGE

__all__ = ["make_estimator", "ENGINE"]

ENGINE = "msconv.multilevel.MGE"


def make_estimator(levels: int, batch_sizes: list, restriction: str, allocation: str, base_level: int,
                   pyramid_fn=None) -> MGE:
    """MGE over levels ``base_level .. base_level + levels``. FLOPs are counted by the trainer
    (once per distinct step shape, by switching ``count_flops`` on for that step) because the
    counter's per-op overhead would otherwise inflate every step's wall-clock."""
    return MGE(levels, list(batch_sizes), restriction, allocation, base_level=base_level, count_flops=False,
               pyramid_fn=pyramid_fn)
