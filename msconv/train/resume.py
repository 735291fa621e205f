"""Which checkpoint a run may continue from: the options that change what a run computes must
agree, except the remedies a stopped run is advised to change."""
from __future__ import annotations

from msconv.train.checkpoint import CheckpointError
from msconv.train.config import TrainConfig, options_before

__all__ = ["RUN_ONLY", "RESUME_MAY_CHANGE", "check_same_run", "checkpoint_config"]

# Options that say how one invocation runs, not what the run computes.
RUN_ONLY = {"out", "resume", "overwrite", "progress", "tensorboard", "threads", "max_steps", "ckpt_every", "inject_nan_at", "device",
            "max_megapixels", "data_memory_mb"}
# Options a resumed run may change (the remedies a non-finite stop advises); the rest must agree.
RESUME_MAY_CHANGE = ("lr", "on_nonfinite", "max_skips", "divergence_factor")
_DEFAULTS = {f.name: f.default for f in TrainConfig.fields()}


def checkpoint_config(cfg: TrainConfig) -> dict:
    """The options a checkpoint records (those that change what the run computes)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RUN_ONLY}


def check_same_run(saved, cfg: TrainConfig, path: str) -> None:
    """CheckpointError naming the options that differ when checkpoint ``path``'s recorded options
    ``saved`` do not describe run ``cfg``."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume: {path!r} has no run configuration ('config'), so it cannot be "
                              "checked against this run; start fresh without --resume (or with another --out)")
    mine = checkpoint_config(cfg)
    recorded = {**_DEFAULTS, **saved, **options_before(saved)}  # options added since the checkpoint: their value then
    diff = sorted(k for k in mine if k not in RESUME_MAY_CHANGE and recorded[k] != mine[k])
    if diff:
        detail = ", ".join(f"{k}: checkpoint {recorded[k]!r} vs now {mine[k]!r}" for k in diff[:5])
        raise CheckpointError(
            f"--resume: {path!r} belongs to a different run ({detail}); use the same options "
            f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may change on --resume), "
            "or another --out to start fresh")
