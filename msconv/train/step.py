"""One optimizer step of the training loop: the stage estimator's loss and backward, the
gradients averaged over torchrun processes, the finite/divergence check, the learning rate and
the update (or none, for a skipped step), and the step's cost."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msconv.multilevel.estimator import MGE
from msconv.multilevel.schedule import Stage
from msconv.train.execution import Execution
from msconv.train.guard import DivergenceGuard
from msconv.train.lr import LearningRate

__all__ = ["TrainingStep", "StepResult", "NONFINITE"]

NONFINITE = "the loss or a gradient is not finite"


@dataclass
class StepResult:
    """``loss`` (averaged over processes), ``skipped`` (the reason, None when the weights were
    updated), the global ``sizes`` of the levels, the ``lr`` used, its ``work_units``, the
    step shape's ``flops`` when they were counted on this step (else None) and ``seconds``."""

    loss: float
    skipped: str | None
    sizes: list[int]
    lr: float
    work_units: float
    flops: int | None
    seconds: float


class TrainingStep:
    """Callable: ``step(stage, estimator, batches, t, step_number, count_flops)`` runs one step at
    learning-rate position ``t``; ``inject_nan_at`` (1-based step numbers) is a testing hook."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, execution: Execution,
                 guard: DivergenceGuard, lr: LearningRate, inject_nan_at=None) -> None:
        self.model, self.optimizer, self.ex, self.guard, self.lr = model, optimizer, execution, guard, lr
        self.inject_nan_at = set(inject_nan_at or ())

    def __call__(self, stage: Stage, est: MGE, batches, t: int, step_number: int, count_flops: bool) -> StepResult:
        ex, opt = self.ex, self.optimizer
        t0 = time.perf_counter()
        sizes = [x.shape[0] * ex.world for x, _ in batches]
        est.count_flops = count_flops
        opt.zero_grad(set_to_none=True)
        # FLOP counting sees through eager ops only, so the counting step runs uncompiled.
        with ex.autocast():
            loss = est.loss(self.model if count_flops else ex.forward_model, F.mse_loss, batches)
        loss = loss.float()
        if step_number in self.inject_nan_at:
            loss = loss * float("nan")
        if ex.scaler is None:
            est.backward(loss)
        else:
            est.backward(ex.scaler.scale(loss))
            ex.scaler.unscale_(opt)  # the checks below and the step see true gradients
        loss_all = loss.detach().reshape(())
        if ex.world > 1:
            # The combined batch's gradient and loss, identical on every rank, so every rank takes
            # the same skip/stop decision.
            import torch.distributed as dist

            from msconv.multilevel.distributed import allreduce_gradients

            allreduce_gradients(self.model)
            loss_all = loss_all.clone()
            dist.all_reduce(loss_all)
            loss_all /= ex.world
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g) for g in grads] + [loss_all])).all())
        loss_value = float(loss_all)
        skipped = NONFINITE if not finite else self.guard.diverged(stage.index, loss_value)
        lr = self.lr.write(opt, t, stage.lr_scale)
        if skipped is None:
            (opt.step if ex.scaler is None else (lambda: ex.scaler.step(opt)))()
        else:
            opt.zero_grad(set_to_none=True)
        if ex.scaler is not None:
            ex.scaler.update()  # lowers the scale after an overflow, raises it after a run of good steps
        cost = est.last_cost
        return StepResult(loss_value, skipped, sizes, lr, float(cost.work_units) * ex.world,
                          int(cost.flops) if count_flops else None, time.perf_counter() - t0)
