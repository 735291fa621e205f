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

import json
import os
import time
import warnings

import torch
import torch.nn.functional as F

from msconv.data import ImageSet
from msconv.multilevel import Schedule
from msconv.train.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic
from msconv.train.config import TrainConfig
from msconv.train.metrics import psnr_ssim
from msconv.train.run import build_run
from msconv.train.sinks import CsvLog, ProgressBar, TensorBoardLog

__all__ = ["Trainer", "train", "NonFiniteError", "ENGINE"]

ENGINE = "msconv.multilevel.Schedule (stages of msconv.multilevel.MGE)"
# Validation points span work units from budget / VAL_SPAN to the budget.
VAL_SPAN = 256.0

# Fields that change what a run computes; a checkpoint only resumes a run that agrees on them.
_RUN_ONLY = {"out", "resume", "progress", "tensorboard", "threads", "max_steps", "ckpt_every", "inject_nan_at", "device"}


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``on_nonfinite='stop'``)."""


def _centre_crop(im: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    h, w = im.shape[1:]
    th = min(h, side) if side else h
    tw = min(w, side) if side else w
    th, tw = th - th % multiple, tw - tw % multiple
    top, left = (h - th) // 2, (w - tw) // 2
    return im[:, top:top + th, left:left + tw]


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
        os.makedirs(cfg.out, exist_ok=True)
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        run = build_run(cfg, data)
        self.parts = run  # the built pieces (msconv.train.Run)
        self.train_set, self.val_set, self.task, self.model = run.train_set, run.val_set, run.task, run.model
        self.device, self.optimizer, self.scheduler = run.device, run.optimizer, run.scheduler
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
            estimator_kwargs={"count_flops": False, "pyramid_fn": self.task.pyramid_pair})
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
        out = []
        for n in sizes:
            clean = self.sampler.next_batch(n)
            # Corruption runs on the CPU generator (reproducible on any device), then moves.
            x, y = self.task.corrupt_on_grid(clean, self.corrupt_rng, level, self.cfg.restriction)
            out.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
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
        }

    def save(self) -> None:
        save_atomic(self.state_dict(), self.ckpt_path)

    def load(self) -> None:
        ck = load_checkpoint(self.ckpt_path)
        mine = {k: v for k, v in self.cfg.to_dict().items() if k not in _RUN_ONLY}
        diff = sorted(k for k in mine if ck["config"].get(k) != mine[k])
        if diff:
            detail = ", ".join(f"{k}: checkpoint {ck['config'].get(k)!r} vs now {mine[k]!r}" for k in diff[:5])
            raise CheckpointError(
                f"--resume: {self.ckpt_path!r} belongs to a different run ({detail}); use the same options, "
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
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"--resume: {self.ckpt_path!r} is incomplete or incompatible ({e}); start fresh") from e
        self.step, self.work_units, self.flops = int(ck["step"]), float(ck["work_units"]), int(ck["flops"])
        self.wall, self.skipped_total = float(ck["wall_clock_s"]), int(ck["skipped_total"])
        self.consecutive_skips, self.val_history = int(ck["consecutive_skips"]), list(ck["val_history"])
        self.next_val, self.flops_cache = int(ck["next_val"]), dict(ck["flops_cache"])
        self.finished = bool(ck["finished"])

    # ------------------------------------------------------------------ one step
    def _one_step(self, stage, est, batches, draw_seconds):
        """Run one step; returns (loss value, skipped, batch sizes, learning rate used)."""
        cfg = self.cfg
        sizes = [x.shape[0] for x, _ in batches]
        key = f"{stage.index}:{sizes}"
        measure = cfg.count_flops and key not in self.flops_cache
        est.count_flops = measure
        t0 = time.perf_counter() - draw_seconds
        self.optimizer.zero_grad(set_to_none=True)
        loss = est.loss(self.model, F.mse_loss, batches)
        if cfg.inject_nan_at and self.step + 1 in cfg.inject_nan_at:  # 1-based, as logged
            loss = loss * float("nan")
        est.backward(loss)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads] + [loss.detach().reshape(())])
        finite = bool(torch.isfinite(norms).all())
        lr = self._lr() * stage.lr_scale
        if finite:
            self._scaled_step(stage.lr_scale)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped first step steps the schedule before any optimizer.step(); that is intended.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()  # the loop is the schedule's only owner; skipped steps count too
        self.wall += time.perf_counter() - t0
        cost = est.last_cost
        if measure:
            self.flops_cache[key] = int(cost.flops)
        self.work_units += float(cost.work_units)
        self.flops += self.flops_cache.get(key, 0)
        return float(loss.detach()), not finite, sizes, lr

    def _lr(self) -> float:
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)

    def _scaled_step(self, factor: float) -> None:
        """optimizer.step() at ``factor`` times the scheduled LR (the schedule itself untouched)."""
        if factor == 1.0:
            self.optimizer.step()
            return
        groups = self.optimizer.param_groups
        saved = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = g["lr"] * factor
        try:
            self.optimizer.step()
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr

    # ------------------------------------------------------------------ the loop
    def _sinks(self) -> list:
        cfg = self.cfg
        sinks = [CsvLog(os.path.join(cfg.out, "metrics.csv"), self.step if cfg.resume else None)]
        if cfg.tensorboard:
            sinks.append(TensorBoardLog(os.path.join(cfg.out, "tb")))
        sinks.append(ProgressBar(self.total_steps, self.step, f"{cfg.mode}/{cfg.conv}", len(self.stages), cfg.progress))
        return sinks

    def _stop_nonfinite(self, row: dict, sinks) -> None:
        """Count a skipped step; raise :class:`NonFiniteError` when the run must stop."""
        cfg = self.cfg
        self.skipped_total += 1
        self.consecutive_skips += 1
        msg = f"step {self.step}: the loss or a gradient is not finite (loss={row['loss']}); "
        if cfg.on_nonfinite == "stop" or self.consecutive_skips >= cfg.max_skips:
            sinks[0].write(row)
            self.save()
            why = ("--on-nonfinite stop" if cfg.on_nonfinite == "stop"
                   else f"{self.consecutive_skips} consecutive skipped steps (--max-skips {cfg.max_skips})")
            raise NonFiniteError(
                msg + f"stopped ({why}). The weights were not updated by it; the last good state is in "
                f"{self.ckpt_path}. Lower --lr, check the data, or use --on-nonfinite skip, then --resume"
            )
        for s in sinks:
            s.note(msg + "step skipped, weights unchanged")

    def run(self) -> dict:
        """Train to the end of the schedule (or ``max_steps``); returns the result dict that is
        also written to ``OUT/result.json``."""
        cfg = self.cfg
        if cfg.resume:
            self.load()
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump({**cfg.to_dict(), "engine": ENGINE, "stages": [s.as_dict() for s in self.stages]}, fh, indent=2)
        sinks = self._sinks()
        try:
            if self.step == 0 and not self.val_history:
                rec = self._record_val(sinks)
                row = {"step": 0, "work_units": 0.0, "flops": 0, "wall_clock_s": 0.0, "val_psnr": rec["psnr"],
                       "val_ssim": rec["ssim"], "stage": 0, "level": self.stages[0].base_level}
                for s in sinks:
                    s.write(row)
            stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
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
                stage_end = stage.steps_run >= stage.iterations
                self.finished = stage_end and stage.index == len(self.stages) - 1
                if self._val_due() or self.finished:
                    rec = self._record_val(sinks)
                    row.update(val_psnr=rec["psnr"], val_ssim=rec["ssim"])
                for s in sinks:
                    s.write(row)
                if self.step % cfg.ckpt_every == 0 or stage_end or self.step == stop_at:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self, self.step)
        finally:
            for s in sinks:
                s.close()
        result = self.result()
        if self.finished:
            result["test_psnr"], result["test_ssim"] = self.test()
            with open(os.path.join(cfg.out, "result.json"), "w") as fh:
                json.dump(result, fh, indent=2)
            torch.save(self.model.state_dict(), os.path.join(cfg.out, "model.pt"))
        return result

    def result(self) -> dict:
        final = self.val_history[-1] if self.val_history else {"psnr": None, "ssim": None}
        return {
            "mode": self.cfg.mode, "conv": self.cfg.conv, "psnr": final["psnr"], "ssim": final["ssim"],
            "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall, "iterations": self.step,
            "skipped_steps": self.skipped_total, "complete": self.finished, "engine": ENGINE,
            "stages": [s.as_dict() for s in self.stages], "val_history": self.val_history,
        }


def train(cfg: TrainConfig, **kw) -> dict:
    """Run one training job (see :class:`Trainer`)."""
    return Trainer(cfg, **kw).run()
