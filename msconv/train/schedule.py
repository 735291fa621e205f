"""Training schedules in stages, scaled to a compute budget in fine-equivalent work units.

A stage runs ``iterations`` steps of the MGE estimator over levels ``base_level ..
base_level + levels`` with ``batch_sizes`` (finest first). Single-scale is one stage with
levels = 0, MGE one stage with base_level = 0, Full-Multiscale one stage per level from the
coarsest (plain loss on level L) to the finest (MGE over 0..L); the iterations of a stage
are ``fmg_iteration_ratio`` times those of the next finer stage and its batches
``fmg_batch_ratio`` times larger (the defaults, 2 and 2, are SPEC §3's "halve per finer stage").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from msconv.train.config import ConfigError, TrainConfig

__all__ = ["Stage", "plan_stages", "step_work"]


@dataclass
class Stage:
    base_level: int
    levels: int
    batch_sizes: list
    iterations: int
    work_per_step: float

    def as_dict(self) -> dict:
        return asdict(self)


def step_work(batch_sizes, base_level: int) -> float:
    """Work units of one MGE step (pair l: fine term on base+l, coarse term on base+l+1 below
    the coarsest), relative to the level-0 grid."""
    L = len(batch_sizes) - 1
    return sum(n * (4.0 ** -(base_level + l) + (4.0 ** -(base_level + l + 1) if l < L else 0.0))
               for l, n in enumerate(batch_sizes))


def base_batch_sizes(cfg: TrainConfig) -> list:
    if cfg.mode == "single":
        return [cfg.batch_size]
    if cfg.batch_sizes:
        return list(cfg.batch_sizes)
    if cfg.allocation == "paper":
        return [cfg.batch_size * 4 ** l for l in range(cfg.levels + 1)]
    return [cfg.batch_size] * (cfg.levels + 1)


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    """The stages of ``cfg.mode``, with iterations scaled so the run spends ``cfg.budget``
    work units (or runs ``cfg.iterations`` steps in all)."""
    sizes = base_batch_sizes(cfg)
    if cfg.mode in ("single", "mge"):
        L = 0 if cfg.mode == "single" else cfg.levels
        shapes = [(0, L, sizes, 1.0)]
    else:
        L = cfg.levels
        shapes = []
        for k in range(L, -1, -1):
            bs = [max(1, round(n * cfg.fmg_batch_ratio ** k)) for n in sizes[: L - k + 1]]
            shapes.append((k, L - k, bs, cfg.fmg_iteration_ratio ** k))
    works = [step_work(bs, b) for b, _, bs, _ in shapes]
    if cfg.iterations is not None:
        total_rel = sum(r for *_, r in shapes)
        its = [max(1, round(cfg.iterations * r / total_rel)) for *_, r in shapes]
        its[-1] = max(1, cfg.iterations - sum(its[:-1])) if len(its) > 1 else cfg.iterations
    else:
        scale = cfg.budget / sum(r * w for (*_, r), w in zip(shapes, works))
        its = [max(1, round(r * scale)) for *_, r in shapes]
    stages = [Stage(b, l, bs, it, w) for (b, l, bs, _), it, w in zip(shapes, its, works)]
    if sum(s.iterations for s in stages) < 1:
        raise ConfigError("--budget is too small for a single step; raise --budget")
    return stages
