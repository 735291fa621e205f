"""Multilevel training: the MGE estimator, batch allocation, cost accounting,
multilevel data sampling, the Full-Multiscale schedule and distributed wiring.

- :class:`MGE` — the telescoping multilevel loss; one backward gives ĝ.
- :class:`Schedule`, :class:`Stage`, :func:`plan` — a run as a list of stages (single-scale, MGE
  and Full-Multiscale alike), sized to a work budget.
- :class:`FullMultiscale` — coarse-to-fine stages, usable as an iterator in your own loop.
- :class:`MultilevelBatchSampler`, :func:`multilevel_loader` — fresh, disjoint samples per level.
- :class:`StepCost`, :class:`LevelCost` — work units, FLOPs, wall-clock of a step.
- :class:`Fixed`, :class:`Paper`, :class:`MLMC`, :class:`Matched` — the batch-allocation rules
  (strategy objects); :func:`mlmc_batch_sizes`, :func:`matched_batch_sizes`,
  :func:`paper_batch_sizes` — their formulas.
- :func:`init_distributed`, :func:`allreduce_gradients`, :func:`shard_batches` — torchrun wiring
  (see msconv.multilevel.distributed for the recipe).
"""
from msconv.multilevel.allocation import (
    ALLOCATIONS,
    MLMC,
    Allocation,
    Fixed,
    budget_batch_sizes,
    Matched,
    Paper,
    RunningVariance,
    make_allocation,
    matched_batch_sizes,
    mlmc_batch_sizes,
    paper_batch_sizes,
    round_batch,
)
from msconv.multilevel.cost import LevelCost, StepCost
from msconv.multilevel.distributed import allreduce_gradients, init_distributed, shard_batches
from msconv.multilevel.estimator import MGE, batch_coupled_modules, level_work, per_sample_loss, step_work
from msconv.multilevel.fullmultiscale import FMGStep, FullMultiscale
from msconv.multilevel.schedule import MODES, Schedule, ScheduleStep, Stage, plan
from msconv.multilevel.sampler import (
    IndexStream,
    LevelIndex,
    MultilevelBatchSampler,
    MultilevelDataset,
    collate_levels,
    multilevel_loader,
    resolve_rank_world,
)

__all__ = [
    "ALLOCATIONS", "Allocation", "Fixed", "Paper", "MLMC", "Matched", "make_allocation", "matched_batch_sizes",
    "budget_batch_sizes", "round_batch", "level_work", "step_work",
    "MGE", "FullMultiscale", "FMGStep", "Stage", "Schedule", "ScheduleStep", "plan", "MODES", "resolve_rank_world", "allreduce_gradients", "init_distributed",
    "shard_batches", "IndexStream", "LevelCost", "LevelIndex", "MultilevelBatchSampler", "MultilevelDataset",
    "RunningVariance", "StepCost", "batch_coupled_modules", "collate_levels", "mlmc_batch_sizes", "multilevel_loader",
    "paper_batch_sizes", "per_sample_loss",
]
