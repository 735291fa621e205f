"""The training driver behind ``msconv train`` and ``msconv compare``.

- :class:`TrainConfig` — every option (CLI flag, YAML key).
- :func:`build_run`, :class:`Run`, :func:`plan_stages` — data, task, model, stage plan,
  optimizer and LR schedule of one run, built from a config in one place.
- :class:`Trainer`, :func:`train` — the loop: single-scale, MGE or Full-Multiscale as one
  :class:`msconv.multilevel.Schedule`, with log sinks (CSV, TensorBoard, progress bar), atomic
  checkpoints, exact resume and non-finite-loss handling.
- :func:`compare` — several modes on the same task, data, seed and budget; summary and plots.
- :func:`psnr_ssim` (metrics), :func:`save_atomic`, :func:`load_checkpoint` (checkpoints).
"""
from msconv.multilevel.schedule import Stage
from msconv.train.checkpoint import CheckpointError, load_checkpoint, save_atomic
from msconv.train.compare import compare
from msconv.train.config import ConfigError, TrainConfig
from msconv.train.metrics import psnr_ssim
from msconv.train.run import Run, build_run, plan_stages
from msconv.train.trainer import NonFiniteError, Trainer, train

__all__ = ["TrainConfig", "ConfigError", "CheckpointError", "NonFiniteError", "Trainer", "train", "compare",
           "Stage", "plan_stages", "Run", "build_run", "psnr_ssim", "save_atomic", "load_checkpoint"]
