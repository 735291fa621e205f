"""The training loop behind ``msconv train``: single-scale, MGE or Full-Multiscale, one code path.

Every mode is a :class:`msconv.multilevel.Schedule` of stages (see :func:`msconv.train.build_run`);
the loop runs its steps, steps the learning-rate schedule after every step (skipped ones included,
so step t always runs at the schedule's rate for t), and hands each step's record to the log sinks
(CSV, TensorBoard, progress bar). Everything random comes from generators whose state is
checkpointed (the crop sampler, the corruption generator), so a run stopped at any step and
resumed from its checkpoint ends with the same weights as an uninterrupted run. Work units,
FLOPs and wall-clock count the training steps only (validation and checkpointing are excluded).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from msconv.data import ImageSet
from msconv.multilevel import Schedule
from msconv.nn import UnresolvedSigmaWarning
from msconv.train.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic
from msconv.train.config import DEFAULT_LR, ConfigError, TrainConfig
from msconv.train.metrics import psnr_ssim
from msconv.train.run import build_run
from msconv.train.sinks import CsvLog, ProgressBar, TensorBoardLog

__all__ = ["Trainer", "train", "NonFiniteError", "ENGINE"]

ENGINE = "msconv.multilevel.Schedule (stages of msconv.multilevel.MGE)"
# Validation points span work units from budget / VAL_SPAN to the budget.
VAL_SPAN = 256.0

# Fields that change what a run computes; a checkpoint only resumes a run that agrees on them.
_RUN_ONLY = {"out", "resume", "progress", "tensorboard", "threads", "max_steps", "ckpt_every", "inject_nan_at", "device"}
# Fields a resumed run may change (the remedies a non-finite stop advises); the rest must agree.
RESUME_MAY_CHANGE = ("lr", "on_nonfinite", "max_skips", "divergence_factor")
# The divergence guard compares a loss with the median of the stage's last GUARD_WINDOW good
# losses, once the stage has GUARD_WARMUP of them (early losses fall fast and say little).
GUARD_WINDOW, GUARD_WARMUP = 50, 20
# The divergence guard keeps a snapshot of the run state every this many steps (not every step: a
# full copy of model and optimizer per step costs as much as a small model's step); a stop on
# divergence rolls back to the newest snapshot whose next step still had a good loss.
GUARD_SNAPSHOT_EVERY = 10
# Seconds a rank waits for its peers (rendezvous and every collective) under torchrun.
DIST_TIMEOUT_S = float(os.environ.get("MSCONV_DIST_TIMEOUT", 300))


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``on_nonfinite='stop'``)."""


NONFINITE = "the loss or a gradient is not finite"


def make_output_folder(out: str) -> None:
    """Create ``out`` (``--out``) or raise :class:`ConfigError` saying why it cannot hold the run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is an existing file, not a folder; give a folder path (it is created if missing)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out!r}: cannot create the output folder ({e.strerror or e}: {e.filename or out}); "
                          "give a path in a folder you can write to") from None
    probe = os.path.join(out, f".msconv-write-test-{os.getpid()}")
    try:  # os.access is not enough (root, network file systems): try to write
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--out {out!r} is not writable ({e.strerror or e}); give a folder you can write to") from None


def start_distributed() -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` (``WORLD_SIZE`` > 1) torch.distributed is initialised
    with a timeout, so a hung rank fails its peers instead of blocking them; else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from msconv.multilevel.distributed import init_distributed

    rank, world, _ = init_distributed(timeout=DIST_TIMEOUT_S)
    return rank, world


def _check_divisible(cfg: TrainConfig, world: int) -> None:
    from msconv.train.run import base_batch_sizes

    sizes = base_batch_sizes(cfg)
    if any(n % world for n in sizes):
        raise ConfigError(f"torchrun with {world} processes shares every level's batch equally, but the batch sizes "
                          f"are {sizes}; use --batch-size{'s' if cfg.batch_sizes else ''} a multiple of {world} "
                          f"(e.g. --batch-size {max(world, cfg.batch_size // world * world)})")


# What a checkpoint from before a field existed ran with, where that differs from today's default.
_BEFORE_FIELD = {"coarse_task": "restricted"}


def _default(name: str):
    """What a checkpoint from before field ``name`` existed ran with (its behaviour then)."""
    if name in _BEFORE_FIELD:
        return _BEFORE_FIELD[name]
    return next(f.default for f in TrainConfig.fields() if f.name == name)


def _count(ck: dict, key: str) -> int:
    """``ck[key]`` as a count >= 0; ValueError naming the key otherwise."""
    v = ck[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v != int(v):
        raise ValueError(f"{key!r} must be a count >= 0, got {v!r}")
    return int(v)


def _centre_crop(im: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    h, w = im.shape[1:]
    th = min(h, side) if side else h
    tw = min(w, side) if side else w
    th, tw = th - th % multiple, tw - tw % multiple
    top, left = (h - th) // 2, (w - tw) // 2
    return im[:, top:top + th, left:left + tw]


def _to_cpu(obj):
    """``obj`` with every tensor in it moved to the CPU (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class Trainer:
    """Build everything from a :class:`TrainConfig`; :meth:`run` trains and returns the result.

    ``on_step(trainer, step)`` is called after every completed step (tests use it to
    interrupt a run at an arbitrary point).
    """

    def __init__(self, cfg: TrainConfig, on_step=None, data: tuple[ImageSet, ImageSet] | None = None):
        self.cfg = cfg = cfg.validated()
        self.on_step = on_step
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        make_output_folder(cfg.out)
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        self.rank, self.world = start_distributed()
        if self.world > 1:
            _check_divisible(cfg, self.world)
            if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
                cfg = self.cfg = cfg.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        run = build_run(cfg, data)
        self.parts = run  # the built pieces (msconv.train.Run)
        self.train_set, self.val_set, self.task, self.model = run.train_set, run.val_set, run.task, run.model
        self.device, self.optimizer, self.scheduler = run.device, run.optimizer, run.scheduler
        self._set_up_execution()
        self.sampler, self.corrupt_rng = run.sampler, run.corrupt_rng
        # Fixed corruptions from their own seed: every mode of a comparison is judged on
        # exactly the same validation inputs.
        self.val_pairs = self._corrupted_pairs(self.val_set.images, cfg.val_crop, cfg.seed + 2)
        # FLOPs are counted by the loop (once per distinct step shape, by switching the estimator's
        # count_flops on for that step) because the counter's per-op overhead would otherwise
        # inflate every step's wall-clock.
        self.schedule = Schedule(
            run.stages, cfg.restriction, run.allocation, sample_batches=self.draw, batches_on_stage_grid=True,
            validate=self.stage_val_loss if cfg.fmg_adaptive else None,
            validate_every=cfg.fmg_validate_every, patience=cfg.fmg_patience, fast_forward_scheduler=self.scheduler,
            estimator_kwargs={"count_flops": False, "pyramid_fn": self.task.pyramid_pair,
                              "unit_pixels": cfg.crop * cfg.crop})
        self.stages = self.schedule.stages
        self.estimators = [st.estimator for st in self.stages]
        self.total_steps = self.schedule.total_steps
        self.planned_work = sum(s.iterations * s.work_per_step for s in self.stages)
        self.finished = False
        self.step = 0
        self.work_units = 0.0
        self.flops = 0
        self.wall = 0.0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.val_history: list[dict] = []
        self.next_val = 0
        self.flops_cache: dict[str, int] = {}
        # The divergence guard's reference: the current stage's recent good losses.
        self.guard = {"stage": 0, "losses": []}
        self.why_skipped: str | None = None
        # The divergence guard's snapshots: the newest one (taken every GUARD_SNAPSHOT_EVERY steps,
        # not yet known good) and the newest one whose next step's loss was good (its weights are
        # known to be fine): what a stop on divergence leaves in the checkpoint.
        self._pending_state: dict | None = None
        self._last_good_state: dict | None = None

    def _set_up_execution(self) -> None:
        """Memory format, compilation, precision and determinism (none changes the weights saved:
        ``self.model`` stays the plain module; ``self.forward_model`` is what training steps call)."""
        cfg = self.cfg
        if cfg.deterministic:
            # cuBLAS needs a fixed workspace for deterministic GEMMs; set before its first use.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # Every grid is another input size: dynamic shapes avoid one recompilation per grid.
        self.forward_model = torch.compile(self.model, dynamic=True) if cfg.compile else self.model
        self.autocast_dtype = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
        self.scaler = (torch.amp.GradScaler(self.device.type, init_scale=2.0 ** 12)
                       if cfg.precision == "fp16" else None)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ data and validation
    def _corrupted_pairs(self, images, side: int, seed: int):
        """(x, y) per image, centre-cropped to ``side`` (0: whole), corrupted once from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        pairs = []
        for im in images:
            y = _centre_crop(im, side, self.task.size_multiple).unsqueeze(0)
            x, y = self.task.corrupt(y, g)
            pairs.append((x.to(self.device), y.to(self.device)))
        return pairs

    def draw(self, sizes, level: int = 0) -> list:
        """One fresh corrupted batch per estimator level, ``[(x_l, y_l)]`` with ``sizes[l]`` samples,
        on grid ``level`` (the stage's finest), on the device."""
        # The stage being drawn for (the schedule sets it before drawing its batches) says the
        # crop side and the resize of its samples (small patches, progressive resizing).
        stage = self.schedule.stage
        crop, resize = (stage.crop, stage.resize) if stage is not None else (None, None)
        out = []
        for n in sizes:
            clean = self.sampler.next_batch(n, crop)
            if resize is not None:
                # Nearest-neighbour, as Composer's progressive resizing resizes a batch.
                clean = F.interpolate(clean, size=(resize, resize), mode="nearest")
            # Corruption runs on the CPU generator (reproducible on any device), then moves.
            x, y = self.task.corrupt_on_grid(clean, self.corrupt_rng, level, self.cfg.restriction)
            mf = self.memory_format
            out.append((x.to(self.device, non_blocking=True, memory_format=mf),
                        y.to(self.device, non_blocking=True, memory_format=mf)))
        if self.world > 1:
            # Every rank draws the same global batch (same seeds) and trains on its share.
            from msconv.multilevel.distributed import shard_batches

            out = shard_batches(out, self.rank, self.world)
        return out

    def stage_val_loss(self) -> float:
        """Validation MSE on the current stage's grid (the adaptive stage-end rule's signal)."""
        from msconv import grid_scale

        level = self.schedule.stage.level
        self.model.eval()
        total = 0.0
        with torch.no_grad(), grid_scale(2.0 ** level):
            for x, y in self.val_pairs:
                xs, ys = self.task.restrict_pair(x, y, level, self.cfg.restriction)
                total += float(F.mse_loss(self.model(xs), ys))
        self.model.train()
        return total / len(self.val_pairs)

    def test(self) -> tuple[float | None, float | None]:
        """Mean PSNR/SSIM on ``--test-data`` at full size; (None, None) without one."""
        if not self.cfg.test_data:
            return None, None
        from msconv.data import load_folder

        ds = load_folder(self.cfg.test_data, self.cfg.gray, "skip" if self.cfg.skip_bad_files else "error")
        return self.validate(self._corrupted_pairs(ds.images, 0, self.cfg.seed + 3))

    def validate(self, pairs=None) -> tuple[float, float]:
        """Mean PSNR/SSIM of the model's outputs on ``pairs`` (default: the validation pairs)."""
        from msconv import grid_scale

        self.model.eval()
        ps, ss = [], []
        with torch.no_grad(), grid_scale(1.0):
            for x, y in (self.val_pairs if pairs is None else pairs):
                p, s = psnr_ssim(self.model(x)[0], y[0])
                ps.append(p)
                ss.append(s)
        self.model.train()
        return sum(ps) / len(ps), sum(ss) / len(ss)

    def _val_threshold(self, j: int) -> float:
        """Work units at which validation point ``j`` falls: 0 (the start), then ``val_points``
        points log-spaced from ``planned_work / VAL_SPAN`` to ``planned_work``."""
        n = self.cfg.val_points
        if j == 0:
            return 0.0
        if n == 1:
            return self.planned_work
        return self.planned_work * VAL_SPAN ** (-(n - j) / (n - 1))

    def _val_due(self) -> bool:
        # The same work-unit thresholds in every mode of a comparison, so all are measured at the
        # same costs; log-spaced, because savings are ratios: a mode that reaches a quality with 16x
        # less work must have validation points that early, not ten evenly spaced ones.
        if self.next_val > self.cfg.val_points:
            return False
        return self.work_units >= self._val_threshold(self.next_val) - 1e-9

    def _record_val(self, sinks) -> dict:
        psnr, ssim = self.validate()
        while self._val_due():
            self.next_val += 1
        rec = {"step": self.step, "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall,
               "psnr": psnr, "ssim": ssim}
        self.val_history.append(rec)
        for s in sinks:
            s.validation(rec)
        return rec

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "format": FORMAT,
            "config": {k: v for k, v in self.cfg.to_dict().items() if k not in _RUN_ONLY},
            "step": self.step, "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall,
            "skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips,
            "val_history": self.val_history, "next_val": self.next_val, "flops_cache": dict(self.flops_cache),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
            "corrupt_rng": self.corrupt_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "schedule": self.schedule.state_dict(), "finished": self.finished,
            "guard": {"stage": self.guard["stage"], "losses": list(self.guard["losses"])},
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save(self, state: dict | None = None) -> None:
        """Write ``state`` (default: the current one) to OUT/checkpoint.pt; under torchrun rank 0 only
        (every rank holds the same state)."""
        if self.rank == 0:
            save_atomic(self.state_dict() if state is None else state, self.ckpt_path)

    def load(self) -> None:
        ck = load_checkpoint(self.ckpt_path)
        saved = ck.get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"--resume: {self.ckpt_path!r} has no run configuration ('config'), so it cannot be "
                                  "checked against this run; start fresh without --resume (or with another --out)")
        mine = {k: v for k, v in self.cfg.to_dict().items() if k not in _RUN_ONLY}
        diff = sorted(k for k in mine if k not in RESUME_MAY_CHANGE and saved.get(k, _default(k)) != mine[k])
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in diff[:5])
            raise CheckpointError(
                f"--resume: {self.ckpt_path!r} belongs to a different run ({detail}); use the same options "
                f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may change on --resume), "
                "or another --out to start fresh"
            )
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.sampler.load_state_dict(ck["sampler"])
            self.corrupt_rng.set_state(ck["corrupt_rng"])
            torch.set_rng_state(ck["torch_rng"])
            self.schedule.load_state_dict(ck["schedule"])
            self.step, self.work_units, self.flops = _count(ck, "step"), float(ck["work_units"]), _count(ck, "flops")
            self.wall, self.skipped_total = float(ck["wall_clock_s"]), _count(ck, "skipped_total")
            self.consecutive_skips, self.val_history = _count(ck, "consecutive_skips"), list(ck["val_history"])
            self.next_val, self.flops_cache = _count(ck, "next_val"), dict(ck["flops_cache"])
            self.finished = bool(ck["finished"])
            guard = ck.get("guard", {"stage": 0, "losses": []})
            self.guard = {"stage": int(guard["stage"]), "losses": [float(v) for v in guard["losses"]]}
            if self.scaler is not None and ck.get("grad_scaler"):
                self.scaler.load_state_dict(ck["grad_scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(
                f"--resume: {self.ckpt_path!r} is incomplete or incompatible ({type(e).__name__}: {e}); start fresh "
                "without --resume (or with another --out)") from e
        old_lr = saved.get("lr")
        old_lr = DEFAULT_LR[self.cfg.optimizer] if old_lr is None else old_lr
        if old_lr != self.cfg.resolved_lr:
            self._rebase_lr(self.cfg.resolved_lr)

    def _rebase_lr(self, lr: float) -> None:
        """Continue the learning-rate schedule where it was, from peak ``lr`` instead of the saved one
        (``--resume --lr``)."""
        s = self.scheduler
        s.base_lrs = [lr for _ in s.base_lrs]
        for g, factor in zip(self.optimizer.param_groups, s.lr_lambdas):
            value = lr * factor(s.last_epoch)
            g["initial_lr"] = lr
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(value)
            else:
                g["lr"] = value
        s._last_lr = [self._group_lr(g) for g in self.optimizer.param_groups]

    # ------------------------------------------------------------------ one step
    def _one_step(self, stage, est, batches, draw_seconds):
        """Run one step; returns (loss value, skipped, batch sizes, learning rate used)."""
        cfg = self.cfg
        sizes = [x.shape[0] * self.world for x, _ in batches]
        key = f"{stage.index}:{sizes}"
        measure = cfg.count_flops and key not in self.flops_cache
        est.count_flops = measure
        t0 = time.perf_counter() - draw_seconds
        self.optimizer.zero_grad(set_to_none=True)
        # FLOP counting sees through eager ops only, so the measuring step runs uncompiled.
        model = self.model if measure else self.forward_model
        with self._autocast():
            loss = est.loss(model, F.mse_loss, batches)
        loss = loss.float()
        if cfg.inject_nan_at and self.step + 1 in cfg.inject_nan_at:  # 1-based, as logged
            loss = loss * float("nan")
        if self.scaler is None:
            est.backward(loss)
        else:
            est.backward(self.scaler.scale(loss))
            self.scaler.unscale_(self.optimizer)  # the checks below and the step see true gradients
        loss_all = loss.detach().reshape(())
        if self.world > 1:
            # The combined batch's gradient and loss, identical on every rank, so every rank takes
            # the same skip/stop decision.
            import torch.distributed as dist

            from msconv.multilevel.distributed import allreduce_gradients

            allreduce_gradients(self.model)
            loss_all = loss_all.clone()
            dist.all_reduce(loss_all)
            loss_all /= self.world
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads] + [loss_all])
        finite = bool(torch.isfinite(norms).all())
        loss_value = float(loss_all)
        self.why_skipped = None if finite else NONFINITE
        if finite:
            self.why_skipped = self._diverged(stage.index, loss_value)
            finite = self.why_skipped is None
        lr = self._lr() * stage.lr_scale
        if finite:
            self._scaled_step(stage.lr_scale)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow, raises it after a run of good steps
        with warnings.catch_warnings():
            # A skipped first step steps the schedule before any optimizer.step(); that is intended.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()  # the loop is the schedule's only owner; skipped steps count too
        self.wall += time.perf_counter() - t0
        cost = est.last_cost
        if measure:
            self.flops_cache[key] = int(cost.flops)
        self.work_units += float(cost.work_units) * self.world  # every rank did its share
        self.flops += self.flops_cache.get(key, 0) * self.world
        return loss_value, not finite, sizes, lr

    def _lr(self) -> float:
        return self._group_lr(self.optimizer.param_groups[0])

    @staticmethod
    def _group_lr(group) -> float:
        lr = group["lr"]
        return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)

    def _diverged(self, stage_index: int, loss: float) -> str | None:
        """Why a finite ``loss`` counts as diverged (None if it does not): far above the running
        median of the stage's recent good losses. An exploding loss is still finite for a while,
        and the weights that produce it are already ruined."""
        if self.guard["stage"] != stage_index:
            self.guard = {"stage": stage_index, "losses": []}
        recent, factor = self.guard["losses"], self.cfg.divergence_factor
        if not factor or len(recent) < GUARD_WARMUP:
            return None
        median = statistics.median(recent)
        if median > 0 and loss > factor * median:
            return (f"the loss {loss:.4g} is over {factor:g}x its running median {median:.4g} (divergence guard, "
                    f"--divergence-factor {factor:g})")
        return None

    def _remember_good_loss(self, loss: float) -> None:
        self.guard["losses"] = (self.guard["losses"] + [loss])[-GUARD_WINDOW:]

    def _scaled_step(self, factor: float) -> None:
        """optimizer.step() at ``factor`` times the scheduled LR (the schedule itself untouched)."""
        step = self.optimizer.step if self.scaler is None else (lambda: self.scaler.step(self.optimizer))
        if factor == 1.0:
            step()
            return
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * factor
        try:
            step()
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    # ------------------------------------------------------------------ the loop
    def _sinks(self) -> list:
        cfg = self.cfg
        if self.rank != 0:
            return []  # under torchrun rank 0 logs for all
        sinks = [CsvLog(os.path.join(cfg.out, "metrics.csv"), self.step if cfg.resume else None)]
        if cfg.tensorboard:
            sinks.append(TensorBoardLog(os.path.join(cfg.out, "tb")))
        sinks.append(ProgressBar(self.total_steps, self.step, f"{cfg.mode}/{cfg.conv}", len(self.stages), cfg.progress))
        return sinks

    def _stop_nonfinite(self, row: dict, sinks) -> None:
        """Count a skipped step; raise :class:`NonFiniteError` when the run must stop.

        The checkpoint it leaves: after a non-finite step, the state after it (the step changed no
        weight); after a diverged one, the latest state whose next loss was still good, because the
        weights that gave the exploding loss are already ruined."""
        cfg = self.cfg
        self.skipped_total += 1
        self.consecutive_skips += 1
        diverged = self.why_skipped != NONFINITE
        loss_note = "" if diverged else f" (loss={row['loss']})"  # a diverged step's reason gives the loss
        msg = f"step {self.step}: {self.why_skipped}{loss_note}; "
        if cfg.on_nonfinite == "stop" or self.consecutive_skips >= cfg.max_skips:
            if sinks:
                sinks[0].write(row)
            good = (self._last_good_state or self._pending_state) if diverged else None
            self.save(good)
            good_step = self.step if good is None else good["step"]
            why = ("--on-nonfinite stop" if cfg.on_nonfinite == "stop"
                   else f"{self.consecutive_skips} consecutive skipped steps (--max-skips {cfg.max_skips})")
            remedies = [f"lower the learning rate (--lr {cfg.resolved_lr / 4:.3g})", "check the data"]
            if cfg.on_nonfinite == "stop":
                remedies.append("or skip such steps (--on-nonfinite skip)")
            else:
                remedies.append(f"or allow more consecutive skips (--max-skips {cfg.max_skips * 4})")
            where = (f"the last good state (step {good_step}, before the loss diverged)" if diverged else
                     f"the state after step {good_step} (skipped steps change no weight)")
            raise NonFiniteError(
                msg + f"stopped ({why}). The weights were not updated by this step; {where} is in "
                f"{self.ckpt_path}. To continue from it: {', '.join(remedies)}, and run "
                f"`msconv train --resume --out {cfg.out}` with that option (the run's other options are read from "
                f"{os.path.join(cfg.out, 'config.json')})"
            )
        for s in sinks:
            s.note(msg + "step skipped, weights unchanged")

    def _snapshot(self) -> None:
        """Keep a copy of the run state for the divergence guard (on the host: it is rarely read)."""
        if self.cfg.divergence_factor:
            self._pending_state = copy.deepcopy(_to_cpu(self.state_dict()))

    def run(self) -> dict:
        """Train to the end of the schedule (or ``max_steps``); returns the result dict that is
        also written to ``OUT/result.json``."""
        with warnings.catch_warnings():
            # The run said it up front, with the CLI's options (build_run): the layers' own
            # warning on the first coarse step would repeat it in the library's terms.
            warnings.filterwarnings("ignore", category=UnresolvedSigmaWarning)
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        if cfg.resume:
            self.load()
        if self.rank == 0:
            with open(os.path.join(cfg.out, "config.json"), "w") as fh:
                json.dump({**cfg.to_dict(), "engine": ENGINE, "stages": [s.as_dict() for s in self.stages]}, fh,
                          indent=2)
        sinks = self._sinks()
        try:
            if self.step == 0 and not self.val_history:
                rec = self._record_val(sinks)
                row = {"step": 0, "work_units": 0.0, "flops": 0, "wall_clock_s": 0.0, "val_psnr": rec["psnr"],
                       "val_ssim": rec["ssim"], "stage": 0, "level": self.stages[0].base_level}
                for s in sinks:
                    s.write(row)
            stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
            self._snapshot()
            steps = iter(self.schedule) if not self.finished else iter(())
            while self.step < stop_at:
                t0 = time.perf_counter()
                st = next(steps, None)  # draws the step's batches
                if st is None:
                    break
                stage = st.stage
                loss, skipped, sizes, lr = self._one_step(stage, st.estimator, st.batches, time.perf_counter() - t0)
                self.step += 1
                row = {"step": self.step, "stage": stage.index, "level": stage.base_level, "loss": loss, "lr": lr,
                       "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall,
                       "batch_sizes": " ".join(map(str, sizes)), "skipped": int(skipped)}
                if skipped:
                    self._stop_nonfinite(row, sinks)
                else:
                    self.consecutive_skips = 0
                    self._remember_good_loss(loss)
                    # This step's loss was good, so the weights it started from were: a snapshot
                    # taken right before it is known good.
                    if self._pending_state is not None:
                        self._last_good_state, self._pending_state = self._pending_state, None
                stage_end = stage.steps_run >= stage.iterations
                self.finished = stage_end and stage.index == len(self.stages) - 1
                if self._val_due() or self.finished:
                    rec = self._record_val(sinks)
                    row.update(val_psnr=rec["psnr"], val_ssim=rec["ssim"])
                for s in sinks:
                    s.write(row)
                if self.step % cfg.ckpt_every == 0 or stage_end or self.step == stop_at:
                    self.save()
                if self.step % GUARD_SNAPSHOT_EVERY == 0:
                    self._snapshot()
                if self.on_step is not None:
                    self.on_step(self, self.step)
        finally:
            for s in sinks:
                s.close()
        result = self.result()
        if self.finished:
            result["test_psnr"], result["test_ssim"] = self.test()
            if self.rank == 0:
                with open(os.path.join(cfg.out, "result.json"), "w") as fh:
                    json.dump(result, fh, indent=2)
                torch.save(self.model.state_dict(), os.path.join(cfg.out, "model.pt"))
        return result

    def result(self) -> dict:
        final = self.val_history[-1] if self.val_history else {"psnr": None, "ssim": None}
        return {
            "mode": self.cfg.mode, "conv": self.cfg.conv, "psnr": final["psnr"], "ssim": final["ssim"],
            "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall, "iterations": self.step,
            "skipped_steps": self.skipped_total, "complete": self.finished, "engine": ENGINE, "processes": self.world,
            "stages": [s.as_dict() for s in self.stages], "val_history": self.val_history,
        }


def train(cfg: TrainConfig, **kw) -> dict:
    """Run one training job (see :class:`Trainer`)."""
    return Trainer(cfg, **kw).run()
