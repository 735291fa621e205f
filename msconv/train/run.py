"""Everything one training run is made of, built from a :class:`TrainConfig` in one place.

:func:`build_run` returns a :class:`Run`: the data, the task, the model on its device, the
stage plan (:func:`plan_stages`), the optimizer and the learning-rate schedule, the crop sampler
and the corruption generator (whose states a checkpoint keeps, so a resumed run is exact).
Options reach the task and the model only when they apply to them.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import torch

from msconv._imports import is_import_path
from msconv.data import CropSampler, ImageSet, load_dataset
from msconv.models import MODELS, build_model
from msconv.multilevel.baselines import (BASELINES, plan_progressive_patches, plan_progressive_resizing, plan_small_patches,
                                         receptive_field)
from msconv.multilevel.schedule import Stage, plan
from msconv.tasks import Task, build_task, task_class
from msconv.train.config import CLI_MODEL_SIZES, LR_BATCH_POWERS, VOLUME_MODEL_SIZES, TrainConfig
from msconv.train.lr import LearningRate

__all__ = ["Run", "build_run", "architecture", "plan_stages", "resolve_device", "task_options", "model_options", "work_driven",
           "lr_position", "small_patch_rule"]


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build/machine; use --device cpu")
    return dev


def _accepted(cls, options: dict) -> dict:
    """The options ``cls.__init__`` takes, without those left unset (None)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params and v is not None}


def task_options(cfg: TrainConfig) -> dict:
    """Keyword arguments of ``cfg.task``'s class, from the options that apply to it."""
    return _accepted(task_class(cfg.task), {
        "noise_sigma": cfg.resolved_noise_sigma, "noise_restriction": cfg.noise_restriction,
        "blur_sigma": cfg.blur_sigma, "mask_fraction": cfg.mask_fraction, "mask_kind": cfg.mask_kind,
        "scale": cfg.sr_scale, "kernel": cfg.sr_kernel, "pre_upsample": cfg.model != "espcn",
        "coarse": cfg.coarse_task,
    })


def model_options(cfg: TrainConfig, dims: int = 2) -> dict:
    """Size keyword arguments of ``cfg.model``'s class that apply to it: those set, else the CLI's default size
    (``CLI_MODEL_SIZES``; for volumes, ``dims=3``, ``VOLUME_MODEL_SIZES``)."""
    sizes = {"depth": cfg.depth, "width": cfg.width, "blocks": cfg.blocks}
    for k, v in (CLI_MODEL_SIZES if dims == 2 else VOLUME_MODEL_SIZES).get(cfg.model, {}).items():
        if sizes[k] is None:
            sizes[k] = v
    return {} if cfg.model not in MODELS else _accepted(MODELS[cfg.model], sizes)


def architecture(cfg: TrainConfig, channels: int, dims: int = 2) -> dict:
    """The keyword arguments of :func:`msconv.models.build_model` for ``cfg`` on images of ``channels``
    channels (``dims=3``: volumes), every size resolved: recorded in a run's config.json so the model can
    be rebuilt from the run folder alone, whatever the CLI's defaults become."""
    t = build_task(cfg.task, **task_options(cfg))
    return {"name": cfg.model, "in_channels": t.in_channels(channels), "out_channels": t.out_channels(channels),
            "conv": cfg.conv, "upscale": cfg.sr_scale if (cfg.task == "sr" and cfg.model == "espcn") else 1,
            "mf_sigma": cfg.mf_sigma, "mf_order": cfg.mf_order, "mf_sigma_floor": cfg.mf_sigma_floor,  # 0: off
            **({"dims": dims} if dims != 2 else {}), **model_options(cfg, dims)}


def base_batch_sizes(cfg: TrainConfig, dims: int = 2) -> list[int]:
    """The finest stage's per-level batch sizes, finest first."""
    if not cfg.coarse_levels:
        return [cfg.batch_size]
    if cfg.batch_sizes:
        return list(cfg.batch_sizes)
    if cfg.resolved_allocation == "paper":
        return [cfg.batch_size * (2 ** dims) ** l for l in range(cfg.levels + 1)]
    return [cfg.batch_size] * (cfg.levels + 1)


# Fewer single-scale steps than this draw a warning: the models have not learned much yet.
MIN_STEPS_TO_LEARN = 100


# A run that stops on its budget (work_driven) plans at most this many times single-scale's steps.
WORK_DRIVEN_STEP_CAP = 4


def work_driven(cfg: TrainConfig) -> bool:
    """Whether the run ends when it has spent ``cfg.budget`` work units rather than after its
    planned steps (matched MGE under a budget: its per-step work is set as it trains); its learning
    rate then follows the work spent (:func:`lr_position`)."""
    return cfg.iterations is None and cfg.mode == "mge" and cfg.resolved_allocation == "matched"


# The small-patch baseline's default side: the model's receptive field to the nearest multiple of 8,
# within [16, 32] (and at most --crop). Measured (bench/results/strong_baselines, batch 4, 1200 work
# units): at equal work smaller patches train better because the same work buys more steps — DnCNN
# 8x32 (17-px receptive field) 16² > 24² > 32² > 40², and a UNet with a 108-px receptive field
# trained better on 32² patches than on 112² ones (+0.71 dB): the context beyond 32 px did not pay.
SMALL_PATCH_RF_MULTIPLE, SMALL_PATCH_MIN, SMALL_PATCH_MAX = 1.0, 16, 32


def small_patch_rule(rf: int, crop: int, multiple: int = 1) -> int:
    """Default side of the small-patch baseline for a model whose receptive field is ``rf`` pixels:
    ``SMALL_PATCH_RF_MULTIPLE * rf`` to the nearest multiple of lcm(8, ``multiple``), within
    [SMALL_PATCH_MIN, SMALL_PATCH_MAX] rounded to that multiple, and at most ``crop``."""
    step = math.lcm(8, multiple)
    side = max(1, round(SMALL_PATCH_RF_MULTIPLE * rf / step)) * step
    lo, hi = -(-SMALL_PATCH_MIN // step) * step, max(step, SMALL_PATCH_MAX // step * step)
    return min(crop, max(lo, min(hi, side)))


def _baseline_stages(cfg: TrainConfig, model: torch.nn.Module | None, in_channels: int, multiple: int,
                     dims: int = 2) -> list[Stage]:
    from msconv.train.config import ConfigError

    budget = cfg.budget if cfg.iterations is None else cfg.iterations * cfg.batch_size
    if cfg.mode == "progressive":
        return plan_progressive_resizing(cfg.crop, cfg.batch_size, budget, cfg.progressive_initial_scale,
                                         cfg.progressive_delay, cfg.progressive_finetune,
                                         increment=math.lcm(4, multiple), dims=dims)
    if cfg.mode == "patches":
        return plan_progressive_patches(cfg.crop, cfg.batch_size, budget, multiple=math.lcm(8, multiple), dims=dims)
    side = cfg.small_crop
    if side is None:
        if model is None:
            raise ConfigError("--mode small without --small-crop needs the model to measure its receptive field")
        side = small_patch_rule(receptive_field(model, in_channels, dims=dims), cfg.crop, multiple)
    if side % multiple:
        raise ConfigError(f"--small-crop {side} must be a multiple of {multiple} for this task; e.g. --small-crop "
                          f"{max(multiple, side // multiple * multiple)}")
    return plan_small_patches(cfg.crop, side, cfg.small_batch or cfg.batch_size, budget, dims)


def plan_stages(cfg: TrainConfig, model: torch.nn.Module | None = None, in_channels: int = 1,
                multiple: int = 1, dims: int = 2) -> list[Stage]:
    """The stages of ``cfg.mode``, with iterations scaled so the run spends ``cfg.budget``
    work units (or runs ``cfg.iterations`` steps in all); see :func:`msconv.multilevel.plan` and,
    for the baselines, :mod:`msconv.multilevel.baselines` (``--iterations`` then means the work of
    that many single-scale steps). ``model`` (with ``in_channels``) sizes the small-patch
    baseline's default patch; ``multiple``: the task's size multiple; ``dims``: 3 for volumes."""
    from msconv.train.config import ConfigError

    if cfg.mode in BASELINES:
        return _baseline_stages(cfg, model, in_channels, multiple, dims)
    iterations = cfg.iterations
    if iterations is None and work_driven(cfg):
        # Matched MGE adapts its batch sizes as it goes, so its steps cost less than single-scale's
        # by an amount known only then: it runs until it has spent the budget (see work_driven),
        # and the plan's steps are only a cap.
        iterations = max(1, round(WORK_DRIVEN_STEP_CAP * cfg.budget / cfg.batch_size))
    fine_crop = cfg.fmg_crop
    if cfg.mode == "fmg" and fine_crop is None:
        if model is None:
            raise ConfigError("--mode fmg without --fmg-crop needs the model to measure its receptive field")
        fine_crop = small_patch_rule(receptive_field(model, in_channels, dims=dims), cfg.crop,
                                     math.lcm(2 ** cfg.levels, multiple))
    stages = plan(cfg.mode, cfg.levels, base_batch_sizes(cfg, dims),
                  budget=None if iterations is not None else cfg.budget, iterations=iterations,
                  iteration_ratio=cfg.fmg_iteration_ratio, batch_ratio=cfg.fmg_batch_ratio,
                  lr_batch_power=LR_BATCH_POWERS[cfg.lr_batch_scaling],
                  crop=cfg.crop, fine_crop=fine_crop if cfg.mode == "fmg" else None,
                  plain_stages=cfg.fmg_plain_stages and cfg.mode == "fmg", dims=dims)
    if sum(s.iterations for s in stages) < 1:
        raise ConfigError("--budget is too small for a single step; raise --budget")
    # The threshold was measured on the 2-D zoo; a volume's crop holds 64x the voxels of its 16^3 patches.
    if cfg.iterations is None and cfg.budget / cfg.batch_size < MIN_STEPS_TO_LEARN and dims == 2:
        warnings.warn(
            f"--budget {cfg.budget:g} gives single-scale training only {cfg.budget / cfg.batch_size:.0f} steps of "
            f"--batch-size {cfg.batch_size}; models need about {MIN_STEPS_TO_LEARN} steps to learn visibly (every zoo "
            f"model gained 4.5-6.3 dB on sigma-25 denoising in 150 steps, nothing in 25), so savings measured now "
            f"mean little. Use --budget {MIN_STEPS_TO_LEARN * cfg.batch_size} or more", UserWarning, stacklevel=3)
    return stages


def check_data_kind(cfg: TrainConfig, train_set: ImageSet, val_set: ImageSet) -> None:
    """ConfigError when the options do not fit the data: images and volumes mixed, a 2-D-only task or
    model on volumes, slice super-resolution on images."""
    from msconv.tasks import VOLUME_TASKS
    from msconv.train.config import ConfigError

    if train_set.dims != val_set.dims:
        kinds = {2: "images", 3: "volumes"}
        raise ConfigError(f"--data holds {kinds[train_set.dims]} but the validation data holds {kinds[val_set.dims]}; "
                          "give --val-data of the same kind")
    if train_set.dims == 3:
        if not cfg.gray:
            raise ConfigError("--no-gray: volumes are gray (one channel); leave --gray on for volume data")
        if cfg.channels_last:
            raise ConfigError("--channels-last is a layout for images (N, C, H, W); leave it off for volumes")
        if cfg.task not in VOLUME_TASKS and not is_import_path(cfg.task):
            raise ConfigError(f"--task {cfg.task} is defined for images; for volumes use one of {', '.join(VOLUME_TASKS)}")
        params = inspect.signature(MODELS[cfg.model].__init__).parameters if cfg.model in MODELS else {"dims": None}
        if "dims" not in params:
            raise ConfigError(f"--model {cfg.model} is 2-D only; for volumes use one of "
                              f"{sorted(n for n, m in MODELS.items() if 'dims' in inspect.signature(m.__init__).parameters)}")
    elif cfg.task == "slice_sr":
        raise ConfigError("--task slice_sr needs volumes (NIfTI, .npy, TIFF stacks) in --data; for images use --task sr")


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    lr = cfg.resolved_lr
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    from msconv.optim import LAMB, LARS

    # norm_floor=1: a layer's trust ratio uses max(||w||, its He-init norm), so zero-initialised
    # heads and biases train (with the paper's lambda=1 fallback they took raw lr*g steps, or none).
    # LARS adapts biases too (measured: excluded biases diverge at lr 3; adapted, +0.5 dB).
    if cfg.optimizer == "lars":
        return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, exclude_1d=False,
                    norm_floor=1.0)
    return LAMB(params, lr=lr, weight_decay=cfg.weight_decay, exclude_1d=True, norm_floor=1.0)


def warn_unresolved_mf(cfg: TrainConfig) -> None:
    """Mesh-free layers on grids coarser than 2σ: the derivative taps are a small fraction of
    their fine-grid size (≈ 0 beyond 4σ), the layer is close to a 1×1 mix there, and what the
    coarse grids learn does not carry over (bench/results/paper_transfer measures it)."""
    coarsest = 2 ** cfg.coarse_levels
    sigma = 0.5 if cfg.mf_sigma is None else cfg.mf_sigma
    if cfg.conv == "mf" and not cfg.mf_sigma_floor and sigma < coarsest / 2:
        warnings.warn(
            f"--conv mf: sigma={sigma:g} reference pixels is not resolved on the coarsest grid (s={coarsest}; "
            f"needs sigma >= s/2 = {coarsest / 2:g}): its derivative taps nearly vanish there and training on it "
            f"does not transfer to the fine grid. Set --mf-sigma-floor 0.5 (the default), --mf-sigma {coarsest / 2:g} or more, "
            "or use --conv standard",
            UserWarning, stacklevel=4)


@dataclass
class Run:
    """The objects of one training run (see :func:`build_run`)."""

    cfg: TrainConfig
    train_set: ImageSet
    val_set: ImageSet
    task: Task
    model: torch.nn.Module
    device: torch.device
    stages: list[Stage]
    optimizer: torch.optim.Optimizer
    lr: LearningRate
    sampler: CropSampler
    corrupt_rng: torch.Generator
    work_target: float | None = None

    @property
    def total_steps(self) -> int:
        return sum(s.iterations for s in self.stages)

    @property
    def allocation(self) -> str:
        """The batch allocation of the stages' estimators (single-scale has one level: fixed)."""
        return self.cfg.resolved_allocation if self.cfg.coarse_levels else "fixed"


def build_run(cfg: TrainConfig, data: tuple[ImageSet, ImageSet] | None = None) -> Run:
    """Data (``data`` = (train, validation) sets, else loaded from ``cfg``), task, model (seeded
    with ``cfg.seed``, on ``cfg.device``), stage plan, optimizer and warm-up/poly LR schedule."""
    cfg = cfg.validated()
    on_bad = "skip" if cfg.skip_bad_files else "error"
    train_set, val_set = data or load_dataset(cfg.data, cfg.val_data, cfg.gray, cfg.val_fraction, cfg.split_seed,
                                              on_bad, cfg.max_megapixels, cfg.data_memory_mb)
    task = build_task(cfg.task, **task_options(cfg))
    c, dims = train_set.channels, train_set.dims
    check_data_kind(cfg, train_set, val_set)
    torch.manual_seed(cfg.seed)
    model = build_model(**architecture(cfg, c, dims))
    device = resolve_device(cfg.device)
    model.to(device)
    warn_unresolved_mf(cfg)
    stages = plan_stages(cfg, model, task.in_channels(c), task.size_multiple, dims)
    optimizer = build_optimizer(cfg, model.parameters())
    # The LR's time axis: the planned steps, or (work-driven runs) the budget in single-scale steps.
    total = sum(s.iterations for s in stages) if not work_driven(cfg) else max(1, round(cfg.budget / cfg.batch_size))
    warm = int(cfg.warmup * total)
    lr = LearningRate(cfg.resolved_lr, warm, max(total, warm + 1), cfg.lr_power)
    return Run(cfg, train_set, val_set, task, model, device, stages, optimizer, lr,
               CropSampler(train_set, cfg.crop, seed=cfg.seed), torch.Generator().manual_seed(cfg.seed + 1),
               cfg.budget if work_driven(cfg) else None)


def lr_position(run: Run, global_step: int, work_units: float) -> int:
    """The learning-rate position of the next step: the schedule's step count, or for a
    work-driven run the share of the budget spent, in single-scale steps."""
    if run.work_target is None:
        return global_step
    return int(run.lr.total_steps * work_units / run.work_target)
