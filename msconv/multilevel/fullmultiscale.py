"""Full-Multiscale training: solve on coarse grids first, hot-start every finer one.

Stages run from the coarsest grid to the finest. At the stage whose finest grid is level k the
estimator is :class:`MGE` over levels k..L (``base_level=k``); the first stage (k = L) is the
plain loss on the coarsest grid. The model and optimizer are the caller's objects, so weights
and optimizer state (momentum, Adam moments, LARS buffers) carry over from stage to stage
untouched. One learning-rate schedule spans all stages: the loop steps it after every step, and
when the adaptive rule ends a stage early the schedule fast-forwards it over the iterations it
skipped, so every stage starts at its planned rate.

Use it as an iterator in your own loop::

    fmg = msconv.FullMultiscale(levels=3, iterations=800, batch_sizes=64, dataset=ds)
    sched = fmg.lr_scheduler(opt, warmup_steps=50)      # spans fmg.total_steps
    for step in fmg:
        opt.zero_grad()
        loss = step.loss(model, F.mse_loss, step.batches)
        step.backward(loss)                                # or loss.backward()
        opt.step()
        sched.step()
        log(step.stage.level, step.global_step, loss.item(), step.last_cost.work_units)

or call :meth:`FullMultiscale.fit`. It is a :class:`msconv.multilevel.Schedule` whose stages
are built from per-stage iterations and batch sizes (for a plan sized to a work budget, use
``Schedule(plan("fmg", ...))``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from msconv.multilevel.allocation import Allocation, round_batch
from msconv.multilevel.sampler import resolve_rank_world
from msconv.multilevel.schedule import Schedule, ScheduleStep, Stage

__all__ = ["FullMultiscale", "Stage", "FMGStep"]

FMGStep = ScheduleStep  # the name this step type had before schedules were unified


def _per_stage(value, n: int, name: str, default_rule: Callable[[Any, int], Any]) -> list:
    """A per-stage list (coarse to fine) from a list of n entries or one value and a rule."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"FullMultiscale: {name} has {len(value)} entries but levels={n - 1} gives {n} stages; pass one entry "
                f"per stage (coarsest first) or a single value for the coarsest stage"
            )
        return list(value)
    return [default_rule(value, i) for i in range(n)]


class FullMultiscale(Schedule):
    """The coarse-to-fine schedule over levels ``levels`` (coarsest) .. 0 (finest).

    Args:
        levels: L, the coarsest level; there are L + 1 stages.
        iterations: steps per stage, coarsest first: a list of L + 1 ints, or one int for the
            coarsest stage, halved (at least 1) for every finer stage.
        batch_sizes: per stage, coarsest first: a list of L + 1 entries (an int for every level of
            that stage, or that stage's list of per-level sizes), or one int for the coarsest
            stage, halved (at least 1, rounded to the world size) for every finer stage. The
            ``allocation`` then spreads a stage's int over its levels (``paper``: ×4 per coarser).

    Every other argument is :class:`Schedule`'s (``restriction``, ``allocation``, ``dataset``,
    ``sample_batches``, ``validate``, ``fast_forward_scheduler``, ``estimator_kwargs`` ...).
    """

    def __init__(
        self,
        levels: int,
        iterations: int | Sequence[int],
        batch_sizes: int | Sequence,
        restriction: str = "average",
        allocation: str | Allocation = "fixed",
        **kwargs,
    ) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise ValueError(f"FullMultiscale: levels must be an int >= 0 (the coarsest level), got levels={levels!r}")
        self.levels = levels
        n = levels + 1
        if not isinstance(iterations, (list, tuple)) and (
                isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
            # One int is the coarsest stage's count; finer stages get at least 1, so 0 would still train.
            raise ValueError(f"FullMultiscale: iterations must be an int >= 1 (the coarsest stage's steps) or a list "
                             f"of ints >= 0 per stage, coarsest first; got iterations={iterations!r}")
        iters = _per_stage(iterations, n, "iterations", lambda v, i: max(1, v // 2**i) if isinstance(v, int) else v)
        for v in iters:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"FullMultiscale: iterations must be ints >= 0, got iterations={iterations!r}")
        _, w = resolve_rank_world(kwargs.get("rank"), kwargs.get("world_size"))
        sizes = _per_stage(batch_sizes, n, "batch_sizes",
                           lambda v, i: round_batch(v / 2**i, w, w) if isinstance(v, int) and v > 0 else v)
        stages = [Stage(base_level=levels - i, levels=i, batch_sizes=bs, iterations=it)
                  for i, (it, bs) in enumerate(zip(iters, sizes))]
        super().__init__(stages, restriction, allocation, **kwargs)

    def __repr__(self) -> str:
        plan = ", ".join(f"L{s.level}:{s.iterations}×{s.batch_sizes}" for s in self.stages)
        return f"FullMultiscale(levels={self.levels}, stages=[{plan}])"
