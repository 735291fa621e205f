"""The training driver behind ``msconv train`` and ``msconv compare``.

- :class:`TrainConfig` — every option (CLI flag, YAML key).
- :class:`Trainer`, :func:`train` — one run: single-scale, MGE or Full-Multiscale, with CSV and
  TensorBoard logs, atomic checkpoints, exact resume and non-finite-loss handling.
- :func:`compare` — several modes on the same task, data, seed and budget; summary and plots.
"""
from msconv.train.compare import compare
from msconv.train.config import ConfigError, TrainConfig
from msconv.train.io import CheckpointError
from msconv.train.schedule import Stage, plan_stages
from msconv.train.trainer import NonFiniteError, Trainer, train

__all__ = ["TrainConfig", "ConfigError", "CheckpointError", "NonFiniteError", "Trainer", "train", "compare",
           "Stage", "plan_stages"]
