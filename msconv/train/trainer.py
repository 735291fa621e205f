"""The training driver behind ``msconv train``: single-scale, MGE or Full-Multiscale.

Everything random comes from generators whose state is checkpointed (the crop sampler, the
corruption generator), so a run stopped at any step and resumed from its checkpoint ends
with the same weights as an uninterrupted run. Work units, FLOPs and wall-clock count the
training steps only (validation and checkpointing are excluded from all three).
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
import torch.nn.functional as F

from msconv.data import CropSampler, ImageSet, load_dataset
from msconv.models import build_model
from msconv.tasks import build_task
from msconv.train.config import TrainConfig
from msconv.train.estimator import ENGINE, make_estimator
from msconv.train.io import CheckpointError, CsvLog, ScalarWriter, load_checkpoint, psnr_ssim, save_atomic
from msconv.train.schedule import plan_stages

__all__ = ["Trainer", "train", "NonFiniteError"]

# Fields that change what a run computes; a checkpoint only resumes a run that agrees on them.
_RUN_ONLY = {"out", "resume", "progress", "tensorboard", "threads", "max_steps", "ckpt_every", "inject_nan_at", "device"}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch build/machine; use --device cpu")
    return dev


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
        self.cfg = cfg.validated()
        self.on_step = on_step
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        os.makedirs(cfg.out, exist_ok=True)
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")

        on_bad = "skip" if cfg.skip_bad_files else "error"
        train_set, val_set = data or load_dataset(cfg.data, cfg.val_data, cfg.gray, cfg.val_fraction, cfg.split_seed, on_bad)
        self.train_set, self.val_set = train_set, val_set
        self.task = build_task(
            cfg.task, noise_sigma=cfg.resolved_noise_sigma, noise_restriction=cfg.noise_restriction, blur_sigma=cfg.blur_sigma, mask_fraction=cfg.mask_fraction,
            mask_kind=cfg.mask_kind, scale=cfg.sr_scale, kernel=cfg.sr_kernel, pre_upsample=cfg.model != "espcn",
        )
        c = train_set.channels
        upscale = cfg.sr_scale if (cfg.task == "sr" and cfg.model == "espcn") else 1
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, self.task.in_channels(c), self.task.out_channels(c), cfg.conv, upscale,
                                 mf_sigma=cfg.mf_sigma, mf_order=cfg.mf_order,
                                 depth=cfg.depth, width=cfg.width, blocks=cfg.blocks)
        self.device = _resolve_device(cfg.device)
        self.model.to(self.device)
        self._warn_unresolved_mf(cfg)
        self.stages = plan_stages(cfg)
        # Large-batch LR rule per stage (fmg): the schedule's LR times (B_stage / B_fine)^p.
        p = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[cfg.lr_batch_scaling]
        self.lr_factors = [(s.batch_sizes[0] / self.stages[-1].batch_sizes[0]) ** p for s in self.stages]
        self.total_steps = sum(s.iterations for s in self.stages)
        self.planned_work = sum(s.iterations * s.work_per_step for s in self.stages)
        self.optimizer = self._make_optimizer()
        from msconv.optim import WarmupPolyLR

        warm = int(cfg.warmup * self.total_steps)
        self.scheduler = WarmupPolyLR(self.optimizer, warm, max(self.total_steps, warm + 1), cfg.lr_power)
        self.sampler = CropSampler(train_set, cfg.crop, seed=cfg.seed)
        self.corrupt_rng = torch.Generator().manual_seed(cfg.seed + 1)
        # Fixed corruptions from their own seed: every mode of a comparison is judged on
        # exactly the same validation inputs.
        self.val_pairs = self._corrupted_pairs(val_set.images, cfg.val_crop, cfg.seed + 2)
        self.fmg = None
        if cfg.mode == "fmg":
            # The coarse-to-fine schedule is msconv.FullMultiscale: it owns the stages' MGE
            # estimators, steps the LR schedule (one schedule over all stages) and, with
            # --fmg-adaptive, ends a stage early when validation on its grid stops improving.
            from msconv.multilevel import FullMultiscale

            self.fmg = FullMultiscale(
                cfg.levels, [s.iterations for s in self.stages], [s.batch_sizes for s in self.stages],
                cfg.restriction, cfg.allocation, sample_batches=self._draw, scheduler=self.scheduler,
                validate=self._stage_val_loss if cfg.fmg_adaptive else None,
                validate_every=cfg.fmg_validate_every, patience=cfg.fmg_patience,
                estimator_kwargs={"count_flops": False, "pyramid_fn": self.task.pyramid_pair},
            )
            self.estimators = [st.estimator for st in self.fmg.stages]
        else:
            # Single-scale (levels = 0) has nothing to allocate across levels.
            self.estimators = [make_estimator(s.levels, s.batch_sizes, cfg.restriction,
                                              cfg.allocation if s.levels else "fixed", s.base_level,
                                              self.task.pyramid_pair)
                               for s in self.stages]
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

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _warn_unresolved_mf(cfg) -> None:
        """Mesh-free layers on grids coarser than 2σ: the derivative taps are a small fraction of
        their fine-grid size (≈ 0 beyond 4σ), the layer is close to a 1×1 mix there, and what the
        coarse grids learn does not carry over (measured: σ = ½ at s = 2 and 4 both break a
        Full-Multiscale DnCNN; bench/results/paper_transfer)."""
        coarsest = 2 ** (cfg.levels if cfg.mode != "single" else 0)
        sigma = 0.5 if cfg.mf_sigma is None else cfg.mf_sigma
        if cfg.conv == "mf" and sigma < coarsest / 2:
            import warnings

            warnings.warn(
                f"--conv mf: sigma={sigma:g} reference pixels is not resolved on the coarsest grid (s={coarsest}; "
                f"needs sigma >= s/2 = {coarsest / 2:g}): its derivative taps nearly vanish there and training on it "
                f"does not transfer to the fine grid. Set --mf-sigma {coarsest / 2:g} or more, or use --conv standard",
                UserWarning, stacklevel=3)

    def _make_optimizer(self):
        cfg, params = self.cfg, self.model.parameters()
        lr = cfg.resolved_lr
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        from msconv.optim import LAMB, LARS

        if cfg.optimizer == "lars":
            return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, exclude_1d=True)
        return LAMB(params, lr=lr, weight_decay=cfg.weight_decay, exclude_1d=True)

    def _corrupted_pairs(self, images, side: int, seed: int):
        """(x, y) per image, centre-cropped to ``side`` (0: whole), corrupted once from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        pairs = []
        for im in images:
            y = _centre_crop(im, side, self.task.size_multiple).unsqueeze(0)
            x, y = self.task.corrupt(y, g)
            pairs.append((x.to(self.device), y.to(self.device)))
        return pairs

    # ------------------------------------------------------------------ pieces of a step
    def stage_of(self, step: int) -> int:
        acc = 0
        for k, s in enumerate(self.stages):
            acc += s.iterations
            if step < acc:
                return k
        return len(self.stages) - 1

    def _draw(self, sizes):
        out = []
        for n in sizes:
            clean = self.sampler.next_batch(n)
            # Corruption runs on the CPU generator (reproducible on any device), then moves.
            x, y = self.task.corrupt(clean, self.corrupt_rng)
            out.append((x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
        return out

    def _stage_val_loss(self) -> float:
        """Validation MSE on the current Full-Multiscale stage's grid (the adaptive rule's signal)."""
        from msconv import grid_scale

        level = self.fmg.stage.level
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

    def _val_due(self) -> bool:
        # Validation points at equal work-unit fractions of the planned budget, so every
        # mode of a comparison is measured at the same costs.
        if self.next_val > self.cfg.val_points:
            return False
        return self.work_units >= self.planned_work * self.next_val / self.cfg.val_points - 1e-9

    def _record_val(self, writer, log):
        psnr, ssim = self.validate()
        while self._val_due():
            self.next_val += 1
        rec = {"step": self.step, "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall,
               "psnr": psnr, "ssim": ssim}
        self.val_history.append(rec)
        writer.add_scalar("val/psnr", psnr, self.step)
        writer.add_scalar("val/ssim", ssim, self.step)
        writer.add_scalar("val/psnr_vs_work_units", psnr, int(round(self.work_units)))
        return rec

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {
            "format": "msconv-train-1",
            "config": {k: v for k, v in self.cfg.to_dict().items() if k not in _RUN_ONLY},
            "step": self.step, "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall,
            "skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips,
            "val_history": self.val_history, "next_val": self.next_val, "flops_cache": dict(self.flops_cache),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(),
            "corrupt_rng": self.corrupt_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "estimators": [e.state_dict() for e in self.estimators],
            "fmg": self.fmg.state_dict() if self.fmg is not None else None, "finished": self.finished,
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
            if self.fmg is not None:
                self.fmg.load_state_dict(ck["fmg"])
            else:
                for e, s in zip(self.estimators, ck["estimators"]):
                    e.load_state_dict(s)
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"--resume: {self.ckpt_path!r} is incomplete or incompatible ({e}); start fresh") from e
        self.step, self.work_units, self.flops = int(ck["step"]), float(ck["work_units"]), int(ck["flops"])
        self.wall, self.skipped_total = float(ck["wall_clock_s"]), int(ck["skipped_total"])
        self.consecutive_skips, self.val_history = int(ck["consecutive_skips"]), list(ck["val_history"])
        self.next_val, self.flops_cache = int(ck["next_val"]), dict(ck["flops_cache"])
        self.finished = bool(ck["finished"])

    # ------------------------------------------------------------------ the loop
    def _step_source(self):
        """Yields (stage index, estimator, batches, seconds spent drawing) for every step to run."""
        if self.fmg is not None:
            it = iter(self.fmg)
            while True:
                t0 = time.perf_counter()
                try:
                    st = next(it)  # draws the batches (and steps the LR schedule for the previous step)
                except StopIteration:
                    return
                yield st.stage.index, st.estimator, st.batches, time.perf_counter() - t0
        while self.step < self.total_steps:
            k = self.stage_of(self.step)
            est = self.estimators[k]
            t0 = time.perf_counter()
            batches = self._draw(list(est.batch_sizes))
            yield k, est, batches, time.perf_counter() - t0

    def _stage_done(self, k: int) -> bool:
        if self.fmg is not None:
            st = self.fmg.stages[k]
            return st.steps_run >= st.iterations
        return self.step == sum(s.iterations for s in self.stages[: k + 1])

    def _one_step(self, k, est, batches, draw_seconds):
        """Run one step; returns (loss value, skipped, batch sizes)."""
        cfg = self.cfg
        sizes = [x.shape[0] for x, _ in batches]
        key = f"{k}:{sizes}"
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
        if finite:
            self._scaled_step(self.lr_factors[k])
            if self.fmg is None:  # FullMultiscale steps the schedule itself
                self.scheduler.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.wall += time.perf_counter() - t0
        cost = est.last_cost
        if measure:
            self.flops_cache[key] = int(cost.flops)
        self.work_units += float(cost.work_units)
        self.flops += self.flops_cache.get(key, 0)
        return float(loss.detach()), not finite, sizes

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

    def run(self) -> dict:
        """Train to the end of the schedule (or ``max_steps``); returns the result dict that is
        also written to ``OUT/result.json``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if cfg.resume:
            self.load()
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump({**cfg.to_dict(), "engine": self.result()["engine"], "stages": [s.as_dict() for s in self.stages]}, fh, indent=2)
        log = CsvLog(os.path.join(cfg.out, "metrics.csv"), self.step if cfg.resume else None)
        writer = ScalarWriter(os.path.join(cfg.out, "tb"), cfg.tensorboard)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not cfg.progress, dynamic_ncols=True,
                   desc=f"{cfg.mode}/{cfg.conv}", leave=True)
        last_psnr = self.val_history[-1]["psnr"] if self.val_history else float("nan")
        try:
            if self.step == 0 and not self.val_history:
                last_psnr = self._record_val(writer, log)["psnr"]
                log.write({"step": 0, "work_units": 0.0, "flops": 0, "wall_clock_s": 0.0, "val_psnr": last_psnr,
                           "val_ssim": self.val_history[-1]["ssim"], "stage": 0,
                           "level": self.stages[0].base_level})
            stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
            source = self._step_source() if not self.finished else iter(())
            while self.step < stop_at:
                nxt = next(source, None)
                if nxt is None:
                    break
                k = nxt[0]
                loss, skipped, sizes = self._one_step(*nxt)
                stage = self.stages[k]
                self.step += 1
                lr = self.optimizer.param_groups[0]["lr"]
                lr = (float(lr) if not isinstance(lr, torch.Tensor) else float(lr.item())) * self.lr_factors[k]
                row = {"step": self.step, "stage": k, "level": stage.base_level, "loss": loss, "lr": lr,
                       "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall,
                       "batch_sizes": " ".join(map(str, sizes)), "skipped": int(skipped)}
                if skipped:
                    self.skipped_total += 1
                    self.consecutive_skips += 1
                    msg = (f"step {self.step}: the loss or a gradient is not finite (loss={loss}); ")
                    if cfg.on_nonfinite == "stop" or self.consecutive_skips >= cfg.max_skips:
                        log.write(row)
                        self.save()
                        why = ("--on-nonfinite stop" if cfg.on_nonfinite == "stop"
                               else f"{self.consecutive_skips} consecutive skipped steps (--max-skips {cfg.max_skips})")
                        raise NonFiniteError(
                            msg + f"stopped ({why}). The weights were not updated by it; the last good state is in "
                            f"{self.ckpt_path}. Lower --lr, check the data, or use --on-nonfinite skip, then --resume"
                        )
                    bar.write(msg + "step skipped, weights unchanged")
                else:
                    self.consecutive_skips = 0
                writer.add_scalar("train/loss", loss if math.isfinite(loss) else float("nan"), self.step)
                writer.add_scalar("train/work_units", self.work_units, self.step)
                writer.add_scalar("train/lr", lr, self.step)
                stage_end = self._stage_done(k)
                self.finished = stage_end and k == len(self.stages) - 1
                if self._val_due() or self.finished:
                    rec = self._record_val(writer, log)
                    last_psnr = rec["psnr"]
                    row.update(val_psnr=rec["psnr"], val_ssim=rec["ssim"])
                log.write(row)
                if self.step % cfg.ckpt_every == 0 or stage_end or self.step == stop_at:
                    self.save()
                bar.set_postfix_str(
                    f"stage {k + 1}/{len(self.stages)} level {stage.base_level} loss {loss:.4g} "
                    f"val {last_psnr:.2f}dB wu {self.work_units:.0f} t {self.wall:.0f}s", refresh=False)
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(self, self.step)
        finally:
            bar.close()
            writer.close()
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
            "skipped_steps": self.skipped_total, "complete": self.finished,
            "engine": "msconv.multilevel.FullMultiscale (stages of msconv.multilevel.MGE)" if self.fmg is not None else ENGINE,
            "stages": [s.as_dict() for s in self.stages], "val_history": self.val_history,
        }


def train(cfg: TrainConfig, **kw) -> dict:
    """Run one training job (see :class:`Trainer`)."""
    return Trainer(cfg, **kw).run()
