"""Full-Multiscale and MGE training inside PyTorch Lightning (``pip install msconv[lightning]``).

Lightning keeps what it owns — the device, the optimizer and LR-scheduler steps, precision,
logging, checkpoints of the module — and msconv drives the data and the loss: the
:class:`MultiscaleTraining` callback feeds the Trainer one :class:`MultiscaleBatch` per step of a
:class:`msconv.multilevel.Schedule` (any: ``FullMultiscale``, a one-stage MGE, a ``plan(...)``),
and computes that step's estimator loss with the module as the model. The estimator restricts
every level's batch to its grid and evaluates the module inside ``msconv.grid_scale``; stages
advance as the schedule's iterator does; the run ends when the schedule does. Your module
keeps its ``forward`` and ``configure_optimizers``; step its LR scheduler per step
(``"interval": "step"``) and Lightning steps it once per optimizer step, as usual::

    fmg = msconv.FullMultiscale(levels=2, iterations=400, batch_sizes=16, dataset=ds)
    ms = MultiscaleTraining(fmg, loss_fn=F.mse_loss)
    trainer = L.Trainer(max_steps=fmg.total_steps, callbacks=[ms])
    trainer.fit(module, train_dataloaders=ms.dataloader())

By default the callback computes the loss in place of the module's ``training_step`` (so an
existing module needs no change); pass ``wrap_training_step=False`` to keep yours and write
``return batch.loss(self, F.mse_loss)`` in it for a :class:`MultiscaleBatch`.

Works with ``lightning`` (``lightning.pytorch``, preferred when installed) or the standalone
``pytorch_lightning`` package; the callback subclasses the one found. Lightning fetches one batch
ahead, so a batch carries its own stage (a stage boundary never mixes two estimators) and an
adaptive allocation (``mlmc``) resizes batches one step later than in a plain loop. A Lightning
checkpoint holds the schedule's position (the callback's state), so ``trainer.fit(module,
ckpt_path=...)`` with a freshly built, identical schedule continues with the next batch. Under DDP,
build the schedule with ``rank=``/``world_size=`` (or inside ``setup``), so each rank draws its
share of every level.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn

from msconv.multilevel.schedule import Schedule

try:  # the unified package first: its Trainer rejects callbacks of the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl
    except ImportError as e:
        raise ImportError(
            "msconv.lightning needs PyTorch Lightning: pip install 'msconv[lightning]' (or pip install lightning)"
        ) from e

__all__ = ["MultiscaleBatch", "MultiscaleTraining"]


class MultiscaleBatch:
    """One schedule step as Lightning's batch: ``batches`` holds one ``(x, y)`` pair per level of
    the stage's estimator (``x``: (N_l, C, H, W) at the grid the data arrives on), ``stage`` the
    :class:`msconv.multilevel.Stage` it belongs to. Lightning moves it with :meth:`to`."""

    def __init__(self, stage, iteration: int, global_step: int, batches: list) -> None:
        self.stage, self.iteration, self.global_step, self.batches = stage, iteration, global_step, batches
        self.schedule_state: dict | None = None

    @property
    def level(self) -> int:
        """The stage's finest grid (0 = the data's grid)."""
        return self.stage.level

    def to(self, *args, **kwargs) -> "MultiscaleBatch":
        moved = [tuple(t.to(*args, **kwargs) if isinstance(t, torch.Tensor) else t for t in pair) for pair in self.batches]
        out = MultiscaleBatch(self.stage, self.iteration, self.global_step, moved)
        out.schedule_state = self.schedule_state
        return out

    def loss(self, model: nn.Module, loss_fn: Callable | None = None) -> torch.Tensor:
        """The stage estimator's loss (:meth:`msconv.MGE.loss`) of ``model`` on this batch."""
        return self.stage.estimator.loss(model, loss_fn, self.batches)

    def __iter__(self):
        # A plain ``x, y = batch`` lands here when the callback is missing from the Trainer.
        raise TypeError(
            "a MultiscaleBatch is not an (x, y) pair: pass the MultiscaleTraining callback to Trainer(callbacks=[...]), "
            "or compute the loss with batch.loss(self, loss_fn) in training_step"
        )

    def __repr__(self) -> str:
        shapes = [tuple(x.shape) for x, _ in self.batches]
        return f"MultiscaleBatch(stage={self.stage.index}, level={self.level}, iteration={self.iteration}, x shapes={shapes})"


class _ScheduleStream(torch.utils.data.IterableDataset):
    """The schedule's steps as an iterable data set (one pass = the whole schedule)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def __iter__(self):
        for step in self.schedule:
            if step.batches is None:
                raise ValueError(
                    f"MultiscaleTraining: {type(self.schedule).__name__} has no data source; build it with dataset= "
                    "or sample_batches="
                )
            batch = MultiscaleBatch(step.stage, step.iteration, step.global_step, step.batches)
            # The schedule's position after this step, taken now: Lightning fetches the next batch
            # before this one's step ends, and a checkpoint must resume with that next batch.
            batch.schedule_state = self.schedule.state_dict()
            yield batch


class MultiscaleTraining(pl.Callback):
    """Run a :class:`msconv.multilevel.Schedule` (Full-Multiscale, MGE, single-scale) in a Lightning Trainer.

    Args:
        schedule: the stages, with a data source (``dataset=`` or ``sample_batches=``).
        loss_fn: ``loss_fn(pred, target) -> scalar`` per-pixel mean (default ``F.mse_loss``).
        wrap_training_step: compute the estimator loss in place of the module's ``training_step``
            for a :class:`MultiscaleBatch` (restored after ``fit``); ``False`` leaves the module's
            own, which then calls ``batch.loss(self, loss_fn)``.
        log: log ``msconv/level``, ``msconv/stage`` and ``msconv/work_units`` every step.

    The run ends when the schedule does (one Lightning epoch). An early stage end (the
    schedule's ``validate=``) fast-forwards the Trainer's step-interval LR scheduler over the
    skipped iterations, so every stage starts at its planned rate.
    """

    def __init__(self, schedule: Schedule, loss_fn: Callable | None = None, *, wrap_training_step: bool = True,
                 log: bool = True) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"MultiscaleTraining: schedule must be a msconv.multilevel.Schedule (e.g. FullMultiscale), "
                            f"got {type(schedule).__name__}")
        if schedule.dataset is None and schedule.sample_batches is None:
            raise ValueError("MultiscaleTraining: the schedule has no data source; build it with dataset= or sample_batches=")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"MultiscaleTraining: loss_fn must be a function loss_fn(pred, target) -> scalar, got "
                            f"{loss_fn!r}; e.g. loss_fn=torch.nn.functional.mse_loss (the default when left out)")
        self.schedule, self.loss_fn = schedule, loss_fn
        self.wrap_training_step, self.log = wrap_training_step, log
        self._original_step = None
        self._position: dict | None = None

    def dataloader(self) -> torch.utils.data.DataLoader:
        """The Trainer's train dataloader: one :class:`MultiscaleBatch` per schedule step. The
        schedule draws and batches the data itself (its ``loader_kwargs`` set the workers)."""
        return torch.utils.data.DataLoader(_ScheduleStream(self.schedule), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer, pl_module) -> None:
        total = self.schedule.total_steps
        if 0 < trainer.max_steps < total:
            warnings.warn(f"MultiscaleTraining: Trainer(max_steps={trainer.max_steps}) stops before the schedule's "
                          f"{total} steps, so the finer stages will not all run; use max_steps={total}", stacklevel=2)
        if self.wrap_training_step:
            self._original_step = pl_module.__dict__.get("training_step")
            user_step = pl_module.training_step

            def training_step(batch, *args, **kwargs):
                if isinstance(batch, MultiscaleBatch):
                    return self._loss(pl_module, batch)
                return user_step(batch, *args, **kwargs)

            pl_module.training_step = training_step

    def on_train_start(self, trainer, pl_module) -> None:
        if self.schedule.fast_forward_scheduler is None:
            step_schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.interval == "step"]
            if len(step_schedulers) == 1:
                self.schedule.fast_forward_scheduler = step_schedulers[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, MultiscaleBatch):
            self._position = batch.schedule_state
            if not self.wrap_training_step and self.log:
                self._log(pl_module, batch)

    def state_dict(self) -> dict:
        """The schedule's position after the last finished step (saved in Lightning checkpoints)."""
        return {"schedule": self._position} if self._position is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume the schedule where the checkpoint's run stopped (``trainer.fit(..., ckpt_path=...)``)."""
        if not isinstance(state_dict, dict) or set(state_dict) - {"schedule"}:
            what = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"MultiscaleTraining.load_state_dict: expected what MultiscaleTraining.state_dict() "
                             f"returns (a dict with at most the key 'schedule'), got {what}; this is another "
                             "callback's state")
        if state_dict.get("schedule") is not None:
            self.schedule.load_state_dict(state_dict["schedule"])
            self._position = state_dict["schedule"]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True  # one epoch is the whole schedule; a second would start it again

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.wrap_training_step:
            if self._original_step is None:
                pl_module.__dict__.pop("training_step", None)
            else:
                pl_module.training_step = self._original_step

    # ------------------------------------------------------------------ loss and logging

    def _loss(self, pl_module, batch: MultiscaleBatch) -> torch.Tensor:
        loss = batch.loss(pl_module, self.loss_fn)
        if self.log:
            pl_module.log("train_loss", loss.detach(), prog_bar=True, batch_size=batch.batches[0][0].shape[0])
            self._log(pl_module, batch)
        return loss

    @staticmethod
    def _log(pl_module, batch: MultiscaleBatch) -> None:
        cost = batch.stage.estimator.last_cost
        pl_module.log("msconv/level", float(batch.level), batch_size=1)
        pl_module.log("msconv/stage", float(batch.stage.index), batch_size=1)
        if cost is not None:
            pl_module.log("msconv/work_units", float(cost.work_units), batch_size=1)
