"""Training configuration: one dataclass that is the YAML schema and the CLI options.

Precedence: defaults < ``--config FILE.yaml`` < options given on the command line. Every
field is a CLI option ``--field-name`` and a YAML key ``field_name``; unknown YAML keys are
an error naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from msconv._imports import is_import_path
from msconv.data import MAX_MEGAPIXELS
from msconv.data.volumes import is_volume_data, is_volume_file
from msconv.models import CONV_KINDS, MODELS
from msconv.multilevel.allocation import ALLOCATIONS
from msconv.multilevel.baselines import BASELINES
from msconv.multilevel.schedule import MODES as MULTILEVEL_MODES
from msconv.reference import RESTRICT_KINDS
from msconv.tasks import TASKS, Denoise

__all__ = ["TrainConfig", "VOLUME_DEFAULTS", "VOLUME_MODEL_SIZES", "load_yaml", "options_of_run", "options_before", "RUN_RECORD_KEYS", "ConfigError", "MODES", "OPTIMIZERS", "DEFAULT_LR", "LR_BATCH_POWERS", "CLI_MODEL_SIZES", "PRECISIONS"]

# Every mode a run can have: the multilevel ones (single-scale is their one-level case) and the
# single-scale schedules a practitioner would use instead (msconv.multilevel.baselines).
MODES = MULTILEVEL_MODES + BASELINES
OPTIMIZERS = ("adam", "sgd", "lars", "lamb")
PRECISIONS = ("32", "bf16", "fp16")
# Rates from the per-optimizer sweeps (bench/results/defaults_sweep for Adam; paper_large_batch_sweep
# for the others, DnCNN 6x16 on Train400 -> BSD68: the best rate of a log grid for each).
DEFAULT_LR = {"adam": 2e-3, "sgd": 1e-1, "lars": 3.0, "lamb": 1e-2}
# --lr-batch-scaling: a stage's LR times (its finest-level batch / the fine stage's) ** power.
LR_BATCH_POWERS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
# Model sizes the CLI uses when --depth/--width are not given: a DnCNN that learns several dB and
# lets `msconv compare` (three modes at the default budget) finish in minutes on a 2-core CPU.
# The classes' own defaults stay the published sizes (DnCNN-S: 17 layers x 64 channels).
CLI_MODEL_SIZES = {"dncnn": {"depth": 8, "width": 32}}
# The same for volumes: a 3-D DnCNN of 6 layers x 16 channels (a 3x3x3 layer costs 3x a 3x3 one per voxel).
VOLUME_MODEL_SIZES = {"dncnn": {"depth": 6, "width": 16}}
# Options whose default differs when --data holds volumes (3-D crops cost crop**3 voxels): a 64^3 reference
# crop (Full-Multiscale's coarsest stage sees a whole 64^3 block as 16^3 voxels), two coarser levels, a
# budget of 150 such crops (the compute of 1200 crops of 32^3), and validation on the centre 96^3 of the
# held-out region.
VOLUME_DEFAULTS = {"crop": 64, "levels": 2, "budget": 150.0, "val_crop": 96}
# The optimizers apply --lr and --weight-decay to float32 weights: larger values cannot be represented.
FLOAT32_MAX = 3.4028234663852886e38
# More validation points than this only repeat validation passes (each is a pass over the validation set).
MAX_VAL_POINTS = 10_000
# --allocation mlmc needs this many samples per level to measure a level's variance.
MLMC_MIN_BATCH = 2
MASK_KINDS = ("boxes", "strokes", "mixed")
SR_SCALES = (2, 4)
SR_KERNELS = ("bicubic", "area")


# Keys a run's config.json adds to its options (a record of what ran, not settings).
RUN_RECORD_KEYS = ("engine", "stages", "architecture")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the option and the fix."""


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _alts(choices) -> str:
    return " | ".join(map(str, choices))


@dataclass
class TrainConfig:
    # --- task
    task: str = _f("denoise", _alts(TASKS) + " | package.module:TaskClass (your msconv.tasks.Task subclass)",
                   choices=tuple(TASKS), open_choices=True)
    noise_sigma: float = _f(None, "noise std on the 0-255 scale (default: 25 for denoise and rician, 2.55 for deblur, "
                                  "0 for slice_sr)")
    noise_restriction: str = _f("preserve", "denoise, rician: how the noise reaches coarse grids: preserve (the same draw rescaled "
                                "to the fine grid's std, so every grid poses the same problem) | average (restricted with "
                                "the image, std halves per level: coarse training then does not transfer)",
                                choices=Denoise.NOISE_RESTRICTIONS)
    coarse_task: str = _f("same", "deblur, sr: what coarse grids pose: same (the degradation in the grid's own pixels, "
                                  "the fine problem at lower resolution, as --noise-restriction preserve does for "
                                  "denoising) | restricted (corrupt at the fine grid, then restrict input and target: "
                                  "the blur shrinks and the lost detail is averaged away, another task)",
                          choices=("same", "restricted"))
    blur_sigma: float = _f(1.6, "deblur: Gaussian blur std in reference (finest-grid) pixels")
    mask_fraction: float = _f(0.25, "inpaint: fraction of pixels missing")
    mask_kind: str = _f("mixed", f"inpaint: {_alts(MASK_KINDS)}", choices=MASK_KINDS)
    sr_scale: int = _f(2, f"sr: upscaling factor {_alts(SR_SCALES)}; slice_sr: thin slices per thick slice",
                       choices=SR_SCALES)
    sr_kernel: str = _f("bicubic", f"sr: downsampling kernel {_alts(SR_KERNELS)}", choices=SR_KERNELS)
    # --- model
    model: str = _f("dncnn", _alts(MODELS) + " | package.module:factory (your factory(in_channels, out_channels) -> "
                    "nn.Module; with --conv mf its Conv2d layers become MFConv2d)", choices=tuple(MODELS), open_choices=True)
    conv: str = _f("standard", "standard (nn.Conv2d) | mf (msconv.MFConv2d)", choices=CONV_KINDS)
    depth: int = _f(None, "dncnn: layers (default 8, sized so that `msconv compare` with the defaults takes about 5 "
                          "minutes on 2 CPU cores; the classic DnCNN-S is --depth 17 --width 64); unet: poolings (default 2)")
    width: int = _f(None, "channels of the first layer (dncnn: 32; other models: their own default)")
    blocks: int = _f(None, "resnet: residual blocks (default 4)")
    mf_sigma: float = _f(None, "conv mf: σ of a 3x3 layer in reference pixels (default 0.5; with --mf-sigma-floor 0, "
                               "size it for the coarsest grid, >= 2**levels/2, or coarse grids cannot resolve the kernel)")
    mf_order: int = _f(2, "conv mf: derivative order p of the Gaussian-derivative basis (higher orders' taps overflow "
                          "float32: at most 40 at --mf-sigma 0.5; the error names the largest usable one)")
    mf_sigma_floor: float = _f(0.5, "conv mf: on a grid of spacing s too coarse for σ (σ < f·s) use σ_s = f·s, i.e. the "
                                    "finest resolved grid's stencil in the coarse grid's own pixels, so coarse training "
                                    "transfers (measured: Full-Multiscale 27.8 dB with 0.5, 5 dB without); 0 = off "
                                    "(the paper's fixed σ on every grid)")
    # --- multiscale
    mode: str = _f("single", "single (one grid, --crop crops) | mge | fmg (Full-Multiscale) | the baselines: small "
                   "(single-scale on small patches, --small-crop) | progressive (Composer's progressive resizing) | "
                   "patches (Restormer's progressive patch sizes)", choices=MODES)
    levels: int = _f(3, "coarser levels below the finest grid (mge, fmg): 3 = four grids, 128² down to 16² for the default crop")
    batch_size: int = _f(4, "fine-level batch size (single; level 0 of mge)")
    batch_sizes: list = _f(None, "mge: per-level batch sizes, finest first, e.g. 4,4,4 (default: batch_size at every level)")
    allocation: str = _f("auto", f"batch allocation over the levels: auto | {_alts(ALLOCATIONS)}; auto = matched for mge "
                         "(single-scale's steps and gradient variance at the least work, capped at single-scale's work "
                         "per step), fixed for fmg", choices=("auto",) + ALLOCATIONS)
    restriction: str = _f("average", f"restriction of inputs and targets: {_alts(RESTRICT_KINDS)}",
                          choices=RESTRICT_KINDS)
    fmg_iteration_ratio: float = _f(2.0, "fmg: each coarser stage runs this many times the iterations of the next finer one "
                                     "(with the default patches and batches, each coarser stage does 2x the work of the "
                                     "next finer one)")
    fmg_batch_ratio: float = _f(1.0, "fmg: each coarser stage multiplies the batch sizes by this")
    lr_batch_scaling: str = _f("none", "fmg: each stage's LR times (its finest-level batch / the fine stage's)^p: "
                               "none (p=0) | sqrt (p=1/2) | linear (p=1, the SGD rule for large batches)",
                               choices=tuple(LR_BATCH_POWERS))
    fmg_plain_stages: bool = _f(True, "fmg: each stage trains on its own grid with the plain loss (--no-fmg-plain-stages: "
                                      "MGE over its grid and the coarser ones)")
    fmg_crop: int = _f(None, "fmg: crop side of the finest stage on the fine grid; coarser stage k draws min(--crop, "
                             "fmg_crop*2**k), i.e. the same patch in its own pixels until the full --crop fits "
                             "(default: the small-patch baseline's patch for the model; --fmg-crop equal to --crop: "
                             "full crops on every stage)")
    small_crop: int = _f(None, "small: patch side (default: the rule small_patch_rule gives for the model's receptive "
                               "field, see msconv.train.run)")
    small_batch: int = _f(None, "small: batch size (default: --batch-size)")
    progressive_initial_scale: float = _f(0.5, "progressive: initial side as a fraction of --crop (Composer's default 0.5)")
    progressive_delay: float = _f(0.5, "progressive: fraction of the steps at the initial scale (Composer's default)")
    progressive_finetune: float = _f(0.2, "progressive: fraction of the steps at full size at the end (Composer's default)")
    fmg_adaptive: bool = _f(False, "fmg: end a stage early when validation on its grid stops improving")
    fmg_validate_every: int = _f(20, "fmg --fmg-adaptive: validate every this many steps of a stage")
    fmg_patience: int = _f(3, "fmg --fmg-adaptive: validations without improvement before moving to the next stage")
    # --- data
    data: str = _f("bundled", "'bundled' (scikit-image's photographs), a folder of PNG/JPEG/BMP/TIFF images, or volumes: "
                              "a folder of (or one) NIfTI/.npy/TIFF-stack file(s), trained in 3-D (one volume is split "
                              "by region; crop, levels, budget, val-crop then default to "
                              + ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in VOLUME_DEFAULTS.items()) + ")")
    val_data: str = _f(None, "validation folder, or volume file (default: a split of --data by image; one volume: by "
                             "region)")
    val_fraction: float = _f(0.2, "fraction of the images held out for validation when --val-data is not given (one "
                                  "volume: of its slices)")
    gray: bool = _f(True, "train on grayscale (else RGB)")
    crop: int = _f(128, "training crop side in pixels (volumes: voxels, a crop³ cube) on the finest grid")
    test_data: str = _f(None, "test folder evaluated once at the end on full images (e.g. ../shared/data/BSD68)")
    val_crop: int = _f(256, "validation images (volumes) are centre-cropped to at most this side (0: whole)")
    skip_bad_files: bool = _f(False, "skip unreadable image files with a warning instead of stopping")
    data_memory_mb: float = _f(4096.0, "a data folder whose decoded images (float32) take more than this many MB is "
                                       "not read up front: its images are decoded from disk when drawn (prefetched in "
                                       "threads) into a cache of this size")
    max_megapixels: float = _f(MAX_MEGAPIXELS, "images declaring more pixels than this (millions) are refused as "
                               "damaged; raise it for genuine images that large (PIL's own limit by default)")
    # --- optimisation
    optimizer: str = _f("adam", "adam | sgd | lars | lamb", choices=OPTIMIZERS)
    lr: float = _f(None, "peak learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    weight_decay: float = _f(0.0, "weight decay")
    momentum: float = _f(0.9, "sgd / lars momentum")
    warmup: float = _f(0.05, "linear warm-up, as a fraction of all steps")
    lr_power: float = _f(1.0, "polynomial decay power after warm-up (0: constant)")
    budget: float = _f(1200.0, "compute budget per mode in fine-equivalent work units (one forward+backward of one "
                             "--crop sized sample = 1)")
    iterations: int = _f(None, "total optimizer steps instead of --budget (fmg: split over the stages by --fmg-iteration-ratio, at least one each)")
    # --- run
    seed: int = _f(0, "seed of model init, sampling and corruption")
    split_seed: int = _f(0, "seed of the train/validation split")
    out: str = _f("runs/train", "output folder (metrics.csv, tb/, checkpoint.pt, result.json)")
    resume: bool = _f(False, "continue from OUT/checkpoint.pt")
    overwrite: bool = _f(False, "start fresh even when OUT holds an unfinished run (its checkpoint is replaced)")
    val_points: int = _f(24, "validations at log-spaced work units from budget/256 to the budget (plus one at the start), "
                              "so savings up to 256x can be read off the curves")
    ckpt_every: int = _f(25, "checkpoint every this many steps (and at every stage end)")
    on_nonfinite: str = _f("skip", "non-finite loss or gradient: skip the step | stop the run", choices=("skip", "stop"))
    max_skips: int = _f(10, "stop after this many consecutive skipped steps")
    divergence_factor: float = _f(100.0, "divergence guard: a finite loss above this many times its running median "
                                  "(the stage's last 50 good steps, from its 20th) is treated as non-finite (0: off)")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(True, "write TensorBoard event files to OUT/tb")
    count_flops: bool = _f(True, "count FLOPs (once per distinct step shape, with torch.utils.flop_counter)")
    threads: int = _f(None, "torch intra-op threads (default: torch's choice)")
    device: str = _f("auto", "where the model trains: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    precision: str = _f("32", "training precision: 32 | bf16 | fp16 (autocast around the training step, weights and "
                              "validation in float32; fp16 adds a gradient scaler)", choices=PRECISIONS)
    channels_last: bool = _f(False, "keep the model and its inputs in channels_last memory format (faster convolutions "
                                    "on GPUs with tensor cores)")
    compile: bool = _f(False, "torch.compile the model with dynamic shapes (every grid is another input size); "
                              "steps that count FLOPs run it uncompiled")
    deterministic: bool = _f(False, "deterministic algorithms only (torch.use_deterministic_algorithms; an op without "
                                    "one is an error), for bitwise-reproducible runs on a GPU")
    max_steps: int = _f(None, "stop after this many steps with a checkpoint (a planned interruption; --resume continues)")
    inject_nan_at: list = _f(None, "testing hook: make the loss NaN at these steps, e.g. 3,7")

    # ------------------------------------------------------------------ helpers
    @classmethod
    def fields(cls):
        return dataclasses.fields(cls)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        names = {f.name for f in cls.fields()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {unknown}; valid options: {sorted(names)}")
        d = {k: _coerce(k, v, source) for k, v in d.items()}
        if is_volume_data(d.get("data")):
            d = {**VOLUME_DEFAULTS, **d}
        return cls(**d).validated()

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw).validated()

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def resolved_allocation(self) -> str:
        """The allocation the stages use: ``auto`` is ``matched`` for MGE (it trained better than
        ``fixed`` at equal work in bench/results/mge_training) and ``fixed`` otherwise."""
        if self.allocation != "auto":
            return self.allocation
        return "matched" if self.mode == "mge" else "fixed"

    @property
    def coarse_levels(self) -> int:
        """The coarser levels the run trains on: ``levels`` for mge and fmg, 0 for single-scale and
        the baselines (one grid each)."""
        return self.levels if self.mode in ("mge", "fmg") else 0

    @property
    def resolved_noise_sigma(self) -> float:
        if self.noise_sigma is not None:
            return self.noise_sigma
        return 2.55 if self.task == "deblur" else (25.0 if self.task in ("denoise", "rician") else 0.0)

    def validated(self) -> "TrainConfig":
        for f in self.fields():
            _check_type(f, getattr(self, f.name))
        for f in self.fields():
            choices = f.metadata.get("choices")
            v = getattr(self, f.name)
            if choices and v not in choices and not (f.metadata.get("open_choices") and is_import_path(v)):
                raise ConfigError(f"--{_opt(f.name)}: {v!r} is not one of {list(choices)}"
                                  + (" or package.module:name" if f.metadata.get("open_choices") else ""))
        for name, check in (("model", _user_model_check), ("task", _user_task_check)):
            if is_import_path(getattr(self, name)):
                try:
                    check(getattr(self, name))
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        pos = ["levels", "batch_size", "crop", "val_points", "ckpt_every", "max_skips", "fmg_validate_every", "fmg_patience"]
        for name in pos:
            v = getattr(self, name)
            minimum = 0 if name == "levels" else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ConfigError(f"--{_opt(name)} must be an int >= {minimum}, got {v!r}")
        for name in ("budget", "fmg_iteration_ratio", "fmg_batch_ratio", "max_megapixels", "data_memory_mb"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"--{_opt(name)} must be > 0, got {v!r}")
        if self.divergence_factor != 0 and self.divergence_factor <= 1:
            raise ConfigError(f"--divergence-factor must be 0 (off) or > 1, got {self.divergence_factor!r}")
        if self.iterations is not None and (not isinstance(self.iterations, int) or self.iterations < 1):
            raise ConfigError(f"--iterations must be an int >= 1, got {self.iterations!r}")
        for name in ("fmg_crop", "small_crop", "small_batch", "depth", "width", "blocks", "threads", "max_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"--{_opt(name)} must be an int >= 1, got {v!r}")
        for name in ("fmg_crop", "small_crop"):
            v = getattr(self, name)
            if v is not None and v > self.crop:
                raise ConfigError(f"--{_opt(name)} {v} is larger than --crop {self.crop}; give at most {self.crop}")
        if self.fmg_crop is not None and self.fmg_crop % 2 ** self.levels:
            raise ConfigError(f"--fmg-crop {self.fmg_crop} must be a multiple of 2**levels = {2 ** self.levels} so every "
                              f"grid has whole pixels; e.g. --fmg-crop {max(1, self.fmg_crop // 2 ** self.levels) * 2 ** self.levels}")
        if not 0 < self.progressive_initial_scale <= 1:
            raise ConfigError(f"--progressive-initial-scale must be in (0, 1], got {self.progressive_initial_scale!r}")
        if not (0 <= self.progressive_delay and 0 <= self.progressive_finetune
                and self.progressive_delay + self.progressive_finetune <= 1):
            raise ConfigError(f"--progressive-delay and --progressive-finetune must be >= 0 with a sum <= 1, got "
                              f"{self.progressive_delay!r} and {self.progressive_finetune!r}")
        if self.mode in MULTILEVEL_MODES and self.mode != "single" and self.levels == 0:
            raise ConfigError(f"--mode {self.mode} needs --levels >= 1 (levels=0 is single-scale training; use --mode single)")
        if self.batch_sizes is not None:
            if len(self.batch_sizes) != self.levels + 1 or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
                raise ConfigError(
                    f"--batch-sizes must be {self.levels + 1} positive ints (one per level, finest first, for "
                    f"--levels {self.levels}), got {self.batch_sizes!r}"
                )
        if self.coarse_levels and self.resolved_allocation == "mlmc":
            smallest = min(self.batch_sizes or [self.batch_size])
            if smallest < MLMC_MIN_BATCH:
                raise ConfigError(
                    f"--allocation mlmc measures each level's variance from at least {MLMC_MIN_BATCH} samples, but "
                    f"--batch-size{'s' if self.batch_sizes else ''} gives a level {smallest}: with fewer the "
                    f"variances are never measured and the sizes never adapt. Use --batch-size {MLMC_MIN_BATCH} or more"
                    f"{' (and every --batch-sizes entry >= ' + str(MLMC_MIN_BATCH) + ')' if self.batch_sizes else ''}")
        scaled = self.task in ("sr", "slice_sr")
        mult = 2 ** self.coarse_levels * (self.sr_scale if scaled else 1)
        if self.crop % mult:
            raise ConfigError(
                f"--crop {self.crop} must be a multiple of {mult} (2**levels"
                f"{' x sr_scale' if scaled else ''}) so every level has whole pixels; e.g. --crop {self.crop // mult * mult or mult}"
            )
        if not (self.device in ("auto", "cpu") or str(self.device).startswith("cuda")):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.val_crop and self.val_crop < 8:
            raise ConfigError(f"--val-crop must be 0 (full images) or >= 8, got {self.val_crop}")
        if self.val_points > MAX_VAL_POINTS:
            raise ConfigError(f"--val-points must be at most {MAX_VAL_POINTS} (each is a full validation pass; 24 "
                              f"log-spaced points resolve savings up to 256x), got {self.val_points!r}")
        if self.lr is not None and not (0 <= self.lr <= FLOAT32_MAX):
            raise ConfigError(f"--lr must be a finite number >= 0 (default for --optimizer {self.optimizer}: "
                              f"{DEFAULT_LR[self.optimizer]:g}), got {self.lr!r}")
        if self.weight_decay > FLOAT32_MAX:
            raise ConfigError(f"--weight-decay must be a float32 number (<= {FLOAT32_MAX:.3g}), got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1) (0.9 is usual), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.warmup < 0 or self.warmup >= 1:
            raise ConfigError(f"--warmup is a fraction of all steps in [0, 1), got {self.warmup}")
        if self.data != "bundled" and not os.path.isdir(self.data) and not is_volume_file(self.data):
            raise ConfigError(f"--data {self.data!r} is neither 'bundled', a folder of images or volumes, nor a volume "
                              "file (NIfTI, .npy, TIFF stack)")
        if self.val_data not in (None, "bundled") and not os.path.isdir(self.val_data) and not is_volume_file(self.val_data):
            raise ConfigError(f"--val-data {self.val_data!r} is not a folder of images or volumes, nor a volume file")
        if self.test_data is not None and not os.path.isdir(self.test_data) and not is_volume_file(self.test_data):
            raise ConfigError(f"--test-data {self.test_data!r} is not a folder of images or volumes, nor a volume file")
        if self.mf_sigma is not None and (not isinstance(self.mf_sigma, (int, float)) or not self.mf_sigma > 0):
            raise ConfigError(f"--mf-sigma must be > 0 reference pixels (e.g. {2 ** self.levels / 2:g} for --levels "
                              f"{self.levels}), got {self.mf_sigma!r}")
        if (isinstance(self.mf_sigma_floor, bool) or not isinstance(self.mf_sigma_floor, (int, float))
                or not (math.isfinite(self.mf_sigma_floor) and self.mf_sigma_floor >= 0)):
            raise ConfigError(f"--mf-sigma-floor must be a finite number >= 0 grid pixels (0.5: grids too coarse for "
                              f"--mf-sigma use sigma = s/2; 0: off), got {self.mf_sigma_floor!r}")
        if not isinstance(self.mf_order, int) or isinstance(self.mf_order, bool) or self.mf_order < 0:
            raise ConfigError(f"--mf-order must be an int >= 0, got {self.mf_order!r}")
        return self


def _user_model_check(path: str) -> None:
    from msconv._imports import resolve

    if not callable(resolve(path, "--model")):
        raise ValueError(f"--model {path!r} is not callable; give a function or class taking (in_channels, out_channels)")


def _user_task_check(path: str) -> None:
    from msconv.tasks import task_class

    task_class(path)


def _opt(name: str) -> str:
    return name.replace("_", "-")


_TRUE, _FALSE = ("true", "yes", "on", "1", "y"), ("false", "no", "off", "0", "n")


def _check_type(f: dataclasses.Field, v) -> None:
    """``v`` has field ``f``'s type (None only where the default is None; floats finite)."""
    name, kind = _opt(f.name), f.type
    if v is None:
        if f.default is None:
            return
        raise ConfigError(f"--{name} cannot be empty (null); give a {kind} (default: {f.default!r}) or leave it out")
    if kind == "bool":
        ok = isinstance(v, bool)
    elif kind == "int":
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif kind == "float":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and not math.isfinite(v):
            raise ConfigError(f"--{name} must be a finite number, got {v!r}")
    elif kind == "str":
        ok = isinstance(v, str)
    else:
        ok = True  # lists are checked by _coerce and the option's own rule
    if not ok:
        raise ConfigError(f"--{name} must be {'an' if kind == 'int' else 'a'} {kind}, got {v!r} ({type(v).__name__})")


def _coerce_scalar(f: dataclasses.Field, v, source: str):
    """A YAML string given for a bool/int/float field, as that type (PyYAML reads ``1e-3`` and
    quoted values as strings); anything that does not convert is left for :func:`_check_type`."""
    if not isinstance(v, str):
        if f.type == "float" and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        return v
    text = v.strip()
    if f.type == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{source}: {f.name} must be true or false (yes/no), got {v!r}")
    if f.type in ("int", "float"):
        try:
            return int(text) if f.type == "int" else float(text)
        except ValueError:
            raise ConfigError(f"{source}: {f.name} must be a{'n int' if f.type == 'int' else ' number'}, got {v!r}") from None
    return v


def _coerce(name: str, v, source: str):
    """YAML and CLI values to the field's type; lists may be given as '4,4,4'."""
    f = _FIELDS[name]
    if f.type in ("bool", "int", "float"):
        return _coerce_scalar(f, v, source)
    if name == "precision" and isinstance(v, int) and not isinstance(v, bool):
        return str(v)  # YAML reads `precision: 32` as a number
    if name in ("batch_sizes", "inject_nan_at") and v is not None:
        if isinstance(v, str):
            try:
                v = [int(s) for s in v.replace(" ", "").split(",") if s]
            except ValueError as e:
                raise ConfigError(f"{source}: {name} must be comma-separated ints like 4,4,4, got {v!r}") from e
        elif isinstance(v, int):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(i, int) for i in v):
            raise ConfigError(f"{source}: {name} must be a list of ints, got {v!r}")
        return list(v)
    return v


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_yaml(path: str) -> dict:
    """The mapping in a YAML config file (keys = TrainConfig fields, '-' or '_')."""
    import yaml

    try:
        with open(path) as fh:
            d = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e}") from e
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path!r} is not a text file (not UTF-8); give a YAML file of option: value lines, "
                          "e.g. a run's config.json") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path!r} is not valid YAML: {e}") from e
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"--config: {path!r} must hold a mapping of option: value, got {type(d).__name__}")
    d = {str(k).replace("-", "_"): v for k, v in d.items()}
    for k in RUN_RECORD_KEYS:  # a run's config.json is a valid config file: its record of what ran is not an option
        d.pop(k, None)
    return d


def options_before(recorded: dict) -> dict:
    """For the options missing from a run's recorded options (``config.json`` or a checkpoint's
    ``config``, written before those options existed), what that run computed with, where it differs
    from today's default: the restricted coarse problem, MGE stages, full crops on every stage."""
    then = {"coarse_task": "restricted", "fmg_plain_stages": False, "fmg_crop": recorded.get("crop", 128)}
    return {k: v for k, v in then.items() if k not in recorded}


def options_of_run(out: str) -> dict:
    """The options a run in folder ``out`` was started with (its ``config.json``), for ``--resume``
    without repeating them; ``max_steps`` (one invocation's planned stop) and ``resume`` are left out.
    ``{}`` when the folder has no config.json."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        return {}
    d = load_yaml(path)
    for k in ("max_steps", "resume"):
        d.pop(k, None)
    return {**d, **options_before(d)}
