"""The training loop behind ``msconv train``: every mode (single-scale, MGE, Full-Multiscale and the
baselines) is a :class:`msconv.multilevel.Schedule` of stages built by :func:`msconv.train.build_run`.

Who owns what: :class:`~msconv.train.state.RunState` the counters and validation record,
:class:`~msconv.train.guard.DivergenceGuard` the divergence check and its snapshots,
:class:`~msconv.train.evaluate.Evaluator` validation and test, :class:`~msconv.train.execution.Execution`
device, processes, precision and compilation, :class:`~msconv.train.step.TrainingStep` one step,
:class:`~msconv.train.lr.LearningRate` the rate (written before every step from the schedule's
position). The :class:`Trainer` wires them, runs the loop, checkpoints and reports.

Everything random comes from generators whose state is checkpointed (the crop sampler, the
corruption generator), so a run stopped at any step and resumed from its checkpoint ends with the
same weights as an uninterrupted run. Work units, FLOPs and wall-clock count the training steps
only (validation and checkpointing are excluded).
"""
from __future__ import annotations

import json
import os
import time
import warnings

import torch

from msconv.data import ImageSet
from msconv.multilevel import Schedule
from msconv.nn import UnresolvedSigmaWarning
from msconv.train.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_atomic
from msconv.train.config import TrainConfig
from msconv.train.evaluate import Evaluator
from msconv.train.batches import BatchDrawer
from msconv.train.folder import check_not_resumable, run_folder_lock
from msconv.train.execution import (RANK_LOCAL_OPTIONS, Execution, broadcast_from_rank0, check_backend, check_divisible,
                                    check_ranks_agree, make_output_folder, start_distributed)
from msconv.train.guard import DivergenceGuard
from msconv.train.resume import check_same_run, checkpoint_config
from msconv.train.run import architecture, build_run, lr_position
from msconv.train.sinks import CsvLog, ProgressBar, TensorBoardLog
from msconv.train.state import RunState
from msconv.train.step import NONFINITE, TrainingStep

__all__ = ["Trainer", "train", "NonFiniteError", "TrainingInterrupted", "ENGINE"]

ENGINE = "msconv.multilevel.Schedule (stages of msconv.multilevel.MGE)"


class NonFiniteError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``on_nonfinite='stop'``)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training; the message says where the last checkpoint is."""


def _stop_error(cfg: TrainConfig, why_skipped: str, loss: float, state: RunState, good_step: int, path: str):
    """The NonFiniteError of a stop at ``state.step``: what happened, where the good state is, the remedies."""
    diverged = why_skipped != NONFINITE
    note = "" if diverged else f" (loss={loss})"  # a diverged step's reason gives the loss
    why = ("--on-nonfinite stop" if cfg.on_nonfinite == "stop"
           else f"{state.consecutive_skips} consecutive skipped steps (--max-skips {cfg.max_skips})")
    remedies = [f"lower the learning rate (--lr {cfg.resolved_lr / 4:.3g})", "check the data",
                "or skip such steps (--on-nonfinite skip)" if cfg.on_nonfinite == "stop"
                else f"or allow more consecutive skips (--max-skips {cfg.max_skips * 4})"]
    where = (f"the last good state (step {good_step}, before the loss diverged)" if diverged else
             f"the state after step {good_step} (skipped steps change no weight)")
    return NonFiniteError(
        f"step {state.step}: {why_skipped}{note}; stopped ({why}). The weights were not updated by this step; {where} "
        f"is in {path}. To continue from it: {', '.join(remedies)}, and run `msconv train --resume --out {cfg.out}` "
        f"with that option (the run's other options are read from {os.path.join(cfg.out, 'config.json')})")


class Trainer:
    """Build everything from a :class:`TrainConfig`; :meth:`run` trains and returns the result.

    ``on_step(trainer, step)`` is called after every completed step (tests use it to interrupt a
    run at an arbitrary point). ``data``: (train, validation) image sets instead of loading them.
    """

    def __init__(self, cfg: TrainConfig, on_step=None, data: tuple[ImageSet, ImageSet] | None = None):
        self.cfg, self.on_step = cfg.validated(), on_step
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        make_output_folder(cfg.out)
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        if not cfg.resume and not cfg.overwrite:
            check_not_resumable(cfg.out, load_checkpoint)
        self.rank, self.world = start_distributed()
        if self.world > 1:
            check_ranks_agree("option", {k: v for k, v in cfg.to_dict().items() if k not in RANK_LOCAL_OPTIONS})
            check_divisible(cfg, self.world)
            if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
                cfg = self.cfg = cfg.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        self.parts = run = build_run(cfg, data)
        self.train_set, self.val_set, self.task, self.model = run.train_set, run.val_set, run.task, run.model
        if self.world > 1:
            check_ranks_agree("data", {"training images": self.train_set.fingerprint(),
                                       "validation images": self.val_set.fingerprint()})
        check_backend(run.device)
        self.device, self.optimizer, self.sampler, self.corrupt_rng = run.device, run.optimizer, run.sampler, run.corrupt_rng
        self.execution = Execution.set_up(cfg, self.model, self.device, self.rank, self.world)
        self.batches = BatchDrawer(self.sampler, self.task, self.corrupt_rng, cfg.restriction, self.execution)
        self.evaluator = Evaluator(self.task, self.model, self.device, self.val_set, cfg.val_crop, cfg.seed + 2,
                                   cfg.restriction, "--val-data" if cfg.val_data else "--data")
        # Read and checked now: a test folder that cannot be scored must not be found out after all the training.
        self.test_pairs = None if not cfg.test_data else self.evaluator.test_pairs(
            cfg.test_data, cfg.gray, "skip" if cfg.skip_bad_files else "error", cfg.seed + 3, cfg.max_megapixels)
        self.schedule = Schedule(
            run.stages, cfg.restriction, run.allocation, sample_batches=self.draw, batches_on_stage_grid=True,
            validate=(lambda: self.evaluator.loss_on_grid(self.schedule.stage.level)) if cfg.fmg_adaptive else None,
            validate_every=cfg.fmg_validate_every, patience=cfg.fmg_patience,
            # FLOPs are counted by the loop, once per distinct step shape: the counter's per-op
            # overhead would otherwise inflate every step's wall-clock.
            estimator_kwargs={"count_flops": False, "pyramid_fn": self.task.pyramid_pair,
                              "unit_pixels": cfg.crop ** self.train_set.dims, "dims": self.train_set.dims})
        self.stages, self.total_steps = self.schedule.stages, self.schedule.total_steps
        self.estimators = [st.estimator for st in self.stages]
        self.planned_work = run.work_target or self.schedule.planned_work()
        self.state, self.guard = RunState(), DivergenceGuard(cfg.divergence_factor)
        self.saved_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
        self.train_step = TrainingStep(self.model, self.optimizer, self.execution, self.guard, run.lr, cfg.inject_nan_at)

    def draw(self, sizes, level: int = 0) -> list:
        """One fresh corrupted batch per level on grid ``level``, shaped as the current stage says
        (see :class:`~msconv.train.batches.BatchDrawer`)."""
        return self.batches.draw(sizes, level, self.schedule.stage)

    def _record_val(self, sinks) -> dict:
        psnr, ssim = self.evaluator.validate()
        rec = self.state.record_validation(psnr, ssim, self.cfg.val_points, self.planned_work)
        for sink in sinks:
            sink.validation(rec)
        return rec

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {"format": FORMAT, "config": checkpoint_config(self.cfg), **self.state.state_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "corrupt_rng": self.corrupt_rng.get_state(),
                "torch_rng": torch.get_rng_state(), "schedule": self.schedule.state_dict(),
                "guard": self.guard.state_dict(),
                "grad_scaler": self.execution.scaler.state_dict() if self.execution.scaler is not None else None}

    def save(self, state: dict | None = None) -> None:
        """Write ``state`` (default: the current one) to OUT/checkpoint.pt; under torchrun rank 0 only.
        A failed write (full disk, ...) leaves the previous checkpoint whole and raises
        :class:`CheckpointError` saying so."""
        if self.rank != 0:
            return
        state = self.state_dict() if state is None else state
        try:
            save_atomic(state, self.ckpt_path)
        except OSError as e:
            raise CheckpointError(f"cannot write the checkpoint of step {state['step']} ({e.strerror or e}); "
                                  f"{self._last_checkpoint()}. Free space (or fix {self.cfg.out!r}) and run the same "
                                  "command again with --resume") from e
        self.saved_step = state["step"]

    def _last_checkpoint(self) -> str:
        if self.saved_step is None:
            return "no checkpoint of this run was written yet"
        return f"the checkpoint of step {self.saved_step} in {self.ckpt_path} is intact"

    def load(self) -> None:
        """Continue from OUT/checkpoint.pt (also one written before the learning rate became a pure
        function of the schedule position: its scheduler state is not needed)."""
        ck = load_checkpoint(self.ckpt_path)
        check_same_run(ck.get("config"), self.cfg, self.ckpt_path)
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.sampler.load_state_dict(ck["sampler"])
            self.corrupt_rng.set_state(ck["corrupt_rng"])
            torch.set_rng_state(ck["torch_rng"])
            self.schedule.load_state_dict(ck["schedule"])
            self.state.load_state_dict(ck)
            self.guard.load_state_dict(ck.get("guard", {"stage": 0, "losses": []}))
            if self.execution.scaler is not None and ck.get("grad_scaler"):
                self.execution.scaler.load_state_dict(ck["grad_scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            raise CheckpointError(
                f"--resume: {self.ckpt_path!r} is incomplete or incompatible ({type(e).__name__}: {e}); start fresh "
                "without --resume (or with another --out)") from e

    # ------------------------------------------------------------------ the loop
    def _sinks(self) -> list:
        cfg = self.cfg
        if self.rank != 0:
            return []  # under torchrun rank 0 logs for all
        self.csv = CsvLog(os.path.join(cfg.out, "metrics.csv"), self.state.step if cfg.resume else None)
        tb = [TensorBoardLog(os.path.join(cfg.out, "tb"), cfg.to_dict(), self.evaluator.sample)] if cfg.tensorboard else []
        sinks = [self.csv] + tb
        return sinks + [ProgressBar(self.total_steps, self.state.step, f"{cfg.mode}/{cfg.conv}", len(self.stages),
                                    cfg.progress)]

    def _skipped(self, why: str, row: dict, sinks) -> None:
        """Count a skipped step; raise :class:`NonFiniteError` when the run must stop, leaving in
        the checkpoint the state after it (a non-finite step changed no weight) or, after a
        diverged one, the newest state known good (the weights that gave the exploding loss are
        already ruined)."""
        cfg, s = self.cfg, self.state
        s.skipped_total += 1
        s.consecutive_skips += 1
        if cfg.on_nonfinite == "stop" or s.consecutive_skips >= cfg.max_skips:
            if sinks:
                self.csv.write(row)
            good = self.guard.last_good() if why != NONFINITE else None
            self.save(good)
            raise _stop_error(cfg, why, row["loss"], s, s.step if good is None else good["step"], self.ckpt_path)
        loss_note = "" if why != NONFINITE else f" (loss={row['loss']})"  # a diverged step's reason gives the loss
        note = f"step {s.step}: {why}{loss_note}; step skipped, weights unchanged"
        for sink in sinks:
            sink.note(note)

    def run(self) -> dict:
        """Train to the end of the schedule, the budget of a work-driven run, or ``max_steps``;
        returns the result dict that is also written to ``OUT/result.json``."""
        with warnings.catch_warnings():
            # The run said it up front, with the CLI's options (build_run): the layers' own
            # warning on the first coarse step would repeat it in the library's terms.
            warnings.filterwarnings("ignore", category=UnresolvedSigmaWarning)
            try:
                with run_folder_lock(self.cfg.out, enabled=self.rank == 0):
                    return self._run()
            except KeyboardInterrupt:
                raise TrainingInterrupted(f"interrupted at step {self.state.step}; {self._last_checkpoint()}. To "
                                          "continue: the same command again with --resume") from None

    def _run(self) -> dict:
        cfg, s = self.cfg, self.state
        if cfg.resume:
            self.load()
            self.saved_step = self.state.step
        broadcast_from_rank0(self.model)
        if self.rank == 0:
            with open(os.path.join(cfg.out, "config.json"), "w") as fh:
                # What ran, reusable as --config FILE for a new run: this invocation's resume, overwrite and
                # max_steps are not part of it.
                options = {**cfg.to_dict(), "resume": False, "overwrite": False, "max_steps": None}
                json.dump({**options, "engine": ENGINE, "stages": [st.as_dict() for st in self.stages],
                           "architecture": architecture(cfg, self.train_set.channels, self.train_set.dims)}, fh, indent=2)
        sinks = self._sinks()
        try:
            if s.step == 0 and not s.val_history:
                rec = self._record_val(sinks)
                for sink in sinks:
                    sink.write({"step": 0, "work_units": 0.0, "flops": 0, "wall_clock_s": 0.0, "val_psnr": rec["psnr"],
                                "val_ssim": rec["ssim"], "stage": 0, "level": self.stages[0].base_level})
            stop_at = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
            self.guard.snapshot(s.step, self.state_dict, force=True)
            steps = iter(self.schedule) if not s.finished else iter(())
            while s.step < stop_at:
                t0 = time.perf_counter()
                st = next(steps, None)  # draws the step's batches
                if st is None:
                    break
                stage, draw_s = st.stage, time.perf_counter() - t0
                key = f"{stage.index}:{[x.shape[0] * self.world for x, _ in st.batches]}"
                t = lr_position(self.parts, st.global_step, s.work_units)
                r = self.train_step(stage, st.estimator, st.batches, t, s.step + 1,
                                    cfg.count_flops and key not in s.flops_cache)
                s.count_step(r.work_units, r.seconds + draw_s, key, r.flops, self.world)
                row = {"step": s.step, "stage": stage.index, "level": stage.base_level, "loss": r.loss, "lr": r.lr,
                       "work_units": s.work_units, "flops": s.flops, "wall_clock_s": s.wall_clock_s,
                       "batch_sizes": " ".join(map(str, r.sizes)), "skipped": int(r.skipped is not None)}
                if r.skipped is not None:
                    self._skipped(r.skipped, row, sinks)
                else:
                    s.consecutive_skips = 0
                    self.guard.good_step(r.loss)
                stage_end = stage.steps_run >= stage.iterations
                spent = self.parts.work_target is not None and s.work_units >= self.parts.work_target - 1e-9
                s.finished = (stage_end and stage.index == len(self.stages) - 1) or spent
                if s.validation_due(cfg.val_points, self.planned_work) or s.finished:
                    rec = self._record_val(sinks)
                    row.update(val_psnr=rec["psnr"], val_ssim=rec["ssim"])
                for sink in sinks:
                    sink.write(row)
                if s.step % cfg.ckpt_every == 0 or stage_end or s.finished or s.step == stop_at:
                    self.save()
                self.guard.snapshot(s.step, self.state_dict)
                if self.on_step is not None:
                    self.on_step(self, s.step)
                if s.finished:
                    break
        finally:
            for sink in sinks:
                sink.close()
        result = self.result()
        if s.finished:
            # The model and the validation result first: the test evaluation can fail, the trained model must not be lost.
            result["test_psnr"] = result["test_ssim"] = None
            self._write_result(result)
            if self.rank == 0:
                save_atomic(self.model.state_dict(), os.path.join(cfg.out, "model.pt"))
            if self.test_pairs is not None:
                result["test_psnr"], result["test_ssim"] = self.evaluator.validate(self.test_pairs)
                self._write_result(result)
        return result

    def _write_result(self, result: dict) -> None:
        if self.rank == 0:
            with open(os.path.join(self.cfg.out, "result.json"), "w") as fh:
                json.dump(result, fh, indent=2)

    def result(self) -> dict:
        s = self.state
        final = s.val_history[-1] if s.val_history else {"psnr": None, "ssim": None}
        return {"mode": self.cfg.mode, "conv": self.cfg.conv, "psnr": final["psnr"], "ssim": final["ssim"],
                "work_units": s.work_units, "flops": s.flops, "wall_clock_s": s.wall_clock_s, "iterations": s.step,
                "skipped_steps": s.skipped_total, "complete": s.finished, "engine": ENGINE, "processes": self.world,
                "stages": [st.as_dict() for st in self.stages], "val_history": s.val_history}


def train(cfg: TrainConfig, **kw) -> dict:
    """Run one training job (see :class:`Trainer`)."""
    return Trainer(cfg, **kw).run()
