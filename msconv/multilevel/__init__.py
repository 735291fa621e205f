"""Multilevel training (SPEC §3): the MGE estimator, batch allocation, cost accounting,
multilevel data sampling, the Full-Multiscale schedule and distributed wiring.

- :class:`MGE` — the telescoping multilevel loss; one backward gives ĝ.
- :class:`FullMultiscale` — coarse-to-fine stages, usable as an iterator in your own loop.
- :class:`MultilevelBatchSampler`, :func:`multilevel_loader` — fresh, disjoint samples per level.
- :class:`StepCost`, :class:`LevelCost` — work units, FLOPs, wall-clock of a step.
- :func:`mlmc_batch_sizes`, :func:`paper_batch_sizes` — the allocation rules.
- :func:`init_distributed`, :func:`allreduce_gradients`, :func:`shard_batches` — torchrun wiring
  (see msconv.multilevel.distributed for the recipe).
"""
from msconv.multilevel.allocation import ALLOCATIONS, RunningVariance, mlmc_batch_sizes, paper_batch_sizes
from msconv.multilevel.cost import LevelCost, StepCost
from msconv.multilevel.distributed import allreduce_gradients, init_distributed, shard_batches
from msconv.multilevel.estimator import MGE, batch_coupled_modules, per_sample_loss
from msconv.multilevel.fullmultiscale import FMGStep, FullMultiscale, Stage
from msconv.multilevel.sampler import (
    IndexStream,
    LevelIndex,
    MultilevelBatchSampler,
    MultilevelDataset,
    collate_levels,
    multilevel_loader,
)

__all__ = [
    "ALLOCATIONS", "MGE", "FullMultiscale", "FMGStep", "Stage", "allreduce_gradients", "init_distributed",
    "shard_batches", "IndexStream", "LevelCost", "LevelIndex", "MultilevelBatchSampler", "MultilevelDataset",
    "RunningVariance", "StepCost", "batch_coupled_modules", "collate_levels", "mlmc_batch_sizes", "multilevel_loader",
    "paper_batch_sizes", "per_sample_loss",
]
