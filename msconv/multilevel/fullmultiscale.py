"""Full-Multiscale training (SPEC §3): solve on coarse grids first, hot-start every finer one.

Stages run from the coarsest grid to the finest. At the stage whose finest grid is level k the
estimator is :class:`MGE` over levels k..L (``base_level=k``); the first stage (k = L) is the
plain loss on the coarsest grid. The model and optimizer are the caller's objects, so weights
and optimizer state (momentum, Adam moments, LARS buffers) carry over from stage to stage
untouched. One learning-rate schedule spans all stages: a scheduler handed to
:class:`FullMultiscale` is stepped once after every step and, when the adaptive rule ends a stage
early, fast-forwarded over the iterations it skipped, so every stage starts at its planned rate.

Use it as an iterator in your own loop::

    fmg = msconv.FullMultiscale(levels=3, iterations=800, batch_sizes=64, dataset=ds)
    sched = fmg.lr_scheduler(opt, warmup_steps=50)      # spans fmg.total_steps; fmg steps it
    for step in fmg:
        opt.zero_grad()
        loss = step.loss(model, F.mse_loss, step.batches)
        step.backward(loss)                                # or loss.backward()
        opt.step()
        log(step.stage.level, step.global_step, loss.item(), step.last_cost.work_units)

or call :meth:`FullMultiscale.fit`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from msconv.multilevel.allocation import round_batch
from msconv.multilevel.cost import StepCost
from msconv.multilevel.estimator import MGE
from msconv.multilevel.sampler import IndexStream, _dist_rank_world, multilevel_loader

__all__ = ["FullMultiscale", "Stage", "FMGStep"]


@dataclass
class Stage:
    """One Full-Multiscale stage: MGE over levels ``level .. levels`` for ``iterations`` steps."""

    index: int
    level: int
    iterations: int
    batch_sizes: list[int]
    estimator: MGE
    steps_run: int = 0
    advanced_early: bool = False
    validation: list[float] = field(default_factory=list)


@dataclass
class FMGStep:
    """What one iteration of :class:`FullMultiscale` hands the training loop.

    ``batches`` is ``[(x_0, y_0), …]`` (one pair per estimator level, at the finest grid the data
    arrives on) when the schedule draws the data, else ``None`` and the loop supplies its own.
    """

    stage: Stage
    iteration: int
    global_step: int
    batches: list | None

    @property
    def estimator(self) -> MGE:
        return self.stage.estimator

    @property
    def batch_sizes(self) -> list[int]:
        """The global N_l this step's batches should hold (the estimator's current allocation)."""
        return self.stage.estimator.batch_sizes

    @property
    def last_cost(self) -> StepCost | None:
        return self.stage.estimator.last_cost

    def loss(self, model: nn.Module, loss_fn: Callable | None = None, batches: Sequence | None = None) -> torch.Tensor:
        """:meth:`MGE.loss` of this stage's estimator on ``batches`` (default: this step's)."""
        batches = self.batches if batches is None else batches
        if batches is None:
            raise ValueError(
                "FMGStep.loss: this FullMultiscale has no data source; pass batches= (one (x, y) pair per level, "
                f"sizes {self.batch_sizes}) or build FullMultiscale with dataset= or sample_batches="
            )
        return self.stage.estimator.loss(model, loss_fn, batches)

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward()`` with its FLOPs and time recorded in ``last_cost``."""
        self.stage.estimator.backward(loss, **kwargs)


def _per_stage(value, n: int, name: str, default_rule: Callable[[Any, int], Any]) -> list:
    """A per-stage list (coarse to fine) from a list of n entries or one value and a rule."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"FullMultiscale: {name} has {len(value)} entries but levels={n - 1} gives {n} stages; pass one entry "
                f"per stage (coarsest first) or a single value for the coarsest stage"
            )
        return list(value)
    return [default_rule(value, i) for i in range(n)]


class FullMultiscale:
    """The coarse-to-fine schedule over levels ``levels`` (coarsest) .. 0 (finest).

    Args:
        levels: L, the coarsest level; there are L + 1 stages.
        iterations: steps per stage, coarsest first: a list of L + 1 ints, or one int for the
            coarsest stage, halved (at least 1) for every finer stage.
        batch_sizes: per stage, coarsest first: a list of L + 1 entries (an int for every level of
            that stage, or that stage's list of per-level sizes), or one int for the coarsest
            stage, halved (at least 1, rounded to the world size) for every finer stage. The
            ``allocation`` then spreads a stage's int over its levels (``paper``: ×4 per coarser).
        restriction, allocation: passed to each stage's :class:`MGE`.
        dataset: a map-style data set of ``(x, y)`` at the finest grid; each stage then draws its
            batches with :func:`multilevel_loader` from one shared :class:`IndexStream`, so the
            run walks through the data once across stages and never repeats within a step.
        sample_batches: alternative data source, ``sample_batches(batch_sizes) -> [(x, y), …]``.
        loader_kwargs: extra DataLoader arguments (``num_workers`` ...).
        seed, shuffle: the data order.
        scheduler: an LR scheduler (any ``torch.optim.lr_scheduler``) built for
            :attr:`total_steps` steps; FullMultiscale calls its ``step()`` after every step, so the
            loop must not. :meth:`lr_scheduler` builds the warm-up/poly one.
        validate: ``validate() -> float`` (lower is better), called every ``validate_every``
            steps of a stage; when it has not improved by ``min_delta`` for ``patience`` calls, the
            stage ends early (the finest stage always runs to the end). Read
            :attr:`stage` inside it to validate on the current grid.
        estimator_kwargs: extra :class:`MGE` arguments (``fuse``, ``count_flops`` ...).
        rank, world_size: this process's share of every level (default: torch.distributed).
    """

    def __init__(
        self,
        levels: int,
        iterations: int | Sequence[int],
        batch_sizes: int | Sequence,
        restriction: str = "average",
        allocation: str = "fixed",
        *,
        dataset=None,
        sample_batches: Callable[[list[int]], list] | None = None,
        loader_kwargs: dict | None = None,
        seed: int = 0,
        shuffle: bool = True,
        scheduler=None,
        validate: Callable[[], float] | None = None,
        validate_every: int = 50,
        patience: int = 3,
        min_delta: float = 0.0,
        estimator_kwargs: dict | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
            raise ValueError(f"FullMultiscale: levels must be an int >= 0 (the coarsest level), got levels={levels!r}")
        if dataset is not None and sample_batches is not None:
            raise ValueError("FullMultiscale: pass dataset= or sample_batches=, not both")
        for name, v in (("validate_every", validate_every), ("patience", patience)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FullMultiscale: {name} must be an int >= 1, got {name}={v!r}")
        self.levels = levels
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        n = levels + 1
        iters = _per_stage(iterations, n, "iterations", lambda v, i: max(1, v // 2**i) if isinstance(v, int) else v)
        for v in iters:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"FullMultiscale: iterations must be ints >= 0, got iterations={iterations!r}")
        w = self.world_size
        sizes = _per_stage(batch_sizes, n, "batch_sizes",
                           lambda v, i: round_batch(v / 2**i, w, w) if isinstance(v, int) and v > 0 else v)
        kwargs = dict(estimator_kwargs or {})
        kwargs.setdefault("multiple_of", w)
        self.stages: list[Stage] = []
        for i, (it, bs) in enumerate(zip(iters, sizes)):
            level = levels - i
            try:
                est = MGE(i, bs, restriction, allocation, base_level=level, **kwargs)
            except ValueError as e:
                raise ValueError(f"FullMultiscale: stage {i} (finest level {level}): {e}") from None
            self.stages.append(Stage(index=i, level=level, iterations=it, batch_sizes=list(est.batch_sizes), estimator=est))
        self.dataset, self.sample_batches = dataset, sample_batches
        self.loader_kwargs = dict(loader_kwargs or {})
        self.stream = IndexStream(len(dataset), shuffle, seed) if dataset is not None else None
        self.scheduler = scheduler
        self.validate, self.validate_every, self.patience, self.min_delta = validate, validate_every, patience, min_delta
        self.global_step = 0
        self.stage: Stage | None = None
        self._resume: dict | None = None

    # ------------------------------------------------------------------ plan

    @property
    def total_steps(self) -> int:
        """Planned steps over all stages: the length one LR schedule must span."""
        return sum(s.iterations for s in self.stages)

    def planned_work(self) -> float:
        """Nominal work units of the whole plan (fine-equivalent forward+backward passes)."""
        return sum(s.iterations * s.estimator.step_work(s.batch_sizes) for s in self.stages)

    def lr_scheduler(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, power: float = 2.0):
        """A :class:`msconv.optim.WarmupPolyLR` over :attr:`total_steps`, attached to this schedule."""
        from msconv.optim import WarmupPolyLR

        self.scheduler = WarmupPolyLR(optimizer, warmup_steps, self.total_steps, power)
        return self.scheduler

    # ------------------------------------------------------------------ iteration

    def _data(self, stage: Stage, skip_totals: Sequence[int]) -> Iterator[list | None]:
        remaining = stage.iterations - len(skip_totals)
        if self.dataset is not None:
            for total in skip_totals:  # resume: the blocks the interrupted run consumed
                self.stream.take(total)
            if remaining <= 0:
                return
            yield from multilevel_loader(self.dataset, stage.estimator, steps=remaining, stream=self.stream,
                                         rank=self.rank, world_size=self.world_size, **self.loader_kwargs)
        else:
            for _ in range(remaining):
                yield self.sample_batches(list(stage.estimator.batch_sizes)) if self.sample_batches else None

    def __iter__(self) -> Iterator[FMGStep]:
        resume, self._resume = self._resume, None
        start = resume["stage"] if resume else 0
        if resume and resume["pending"] and self.scheduler is not None:
            self.scheduler.step()  # the saved step's own scheduler step had not run yet
        for stage in self.stages[start:]:
            self.stage = stage
            if resume and stage.index == start:
                skip = resume["consumed"]
            else:
                skip, stage.steps_run, self._consumed = [], 0, []
                self._stage_stream_state = self.stream.state_dict() if self.stream else None
            tracker = [math.inf, 0]  # best validation value, calls without improvement
            for batches in self._data(stage, skip):
                if stage.steps_run >= stage.iterations:
                    break
                # Count the step before handing it out, so state_dict() taken in the loop body
                # describes the step as done.
                self._consumed.append(sum(x.shape[0] for x, _ in batches) * self.world_size if self.stream else 0)
                stage.steps_run += 1
                self.global_step += 1
                self._pending = True
                yield FMGStep(stage, stage.steps_run - 1, self.global_step - 1, batches)
                # Runs when the loop asks for the next step, i.e. after its optimizer step.
                self._pending = False
                if self.scheduler is not None:
                    self.scheduler.step()
                if self._should_advance(stage, tracker):
                    self._skip_schedule(stage.iterations - stage.steps_run)
                    stage.advanced_early = True
                    break
        self.stage = None

    def _should_advance(self, stage: Stage, tracker: list) -> bool:
        if self.validate is None or stage.index == len(self.stages) - 1 or stage.steps_run % self.validate_every:
            return False
        value = float(self.validate())
        stage.validation.append(value)
        if value < tracker[0] - self.min_delta:
            tracker[0], tracker[1] = value, 0
        else:
            tracker[1] += 1
        return tracker[1] >= self.patience and stage.steps_run < stage.iterations

    def _skip_schedule(self, n: int) -> None:
        self.global_step += n
        if self.scheduler is not None:
            for _ in range(n):
                self.scheduler.step()

    # ------------------------------------------------------------------ convenience loop

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable | None = None,
        *,
        on_step: Callable[[FMGStep, float], None] | None = None,
        nonfinite: str = "skip",
    ) -> list[dict]:
        """Run the whole schedule; returns one record per step (stage, level, loss, cost figures).

        ``nonfinite``: what a non-finite loss or gradient does: ``"skip"`` (no optimizer step,
        recorded as ``skipped``) or ``"raise"`` (stop with a message; weights are untouched).
        """
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"FullMultiscale.fit: nonfinite must be 'skip' or 'raise', got nonfinite={nonfinite!r}")
        history = []
        for step in self:
            optimizer.zero_grad(set_to_none=True)
            loss = step.loss(model, loss_fn)
            step.backward(loss)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
            if not finite and nonfinite == "raise":
                raise FloatingPointError(
                    f"FullMultiscale.fit: non-finite loss or gradient at step {step.global_step} (stage {step.stage.index}, "
                    f"level {step.stage.level}, loss={loss.item()}); lower the learning rate, or pass nonfinite='skip'"
                )
            if finite:
                optimizer.step()
            record = {"step": step.global_step, "stage": step.stage.index, "level": step.stage.level,
                      "loss": loss.item(), "skipped": not finite, "lr": float(optimizer.param_groups[0]["lr"]),
                      **step.last_cost.as_dict()}
            history.append(record)
            if on_step is not None:
                on_step(step, loss.item())
        return history

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Where the schedule is: stage, step counts, estimator allocations and the data position
        at the start of the current stage plus the blocks consumed since (exact with prefetching
        loader workers). Take it in the loop body, after the optimizer step, together with the
        model, optimizer and scheduler states; the resumed iterator continues with the next step
        (and first runs the scheduler step the saved one still owed). Plain Python values only."""
        stage = self.stage if self.stage is not None else self.stages[-1]
        return {
            "stage": stage.index,
            "global_step": self.global_step,
            "consumed": list(getattr(self, "_consumed", [])),
            "stream": getattr(self, "_stage_stream_state", None),
            "estimators": [s.estimator.state_dict() for s in self.stages],
            "steps_run": [s.steps_run for s in self.stages],
            "pending": getattr(self, "_pending", False),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` at the next iteration of ``iter(self)``."""
        for s, est, run in zip(self.stages, state["estimators"], state["steps_run"]):
            s.estimator.load_state_dict(est)
            s.steps_run = run
        self.global_step = state["global_step"]
        if self.stream is not None and state["stream"] is not None:
            self.stream.load_state_dict(state["stream"])
        self._stage_stream_state = state["stream"]
        self._consumed = list(state["consumed"])
        self._resume = {"stage": state["stage"], "consumed": list(state["consumed"]), "pending": state["pending"]}

    def __repr__(self) -> str:
        plan = ", ".join(f"L{s.level}:{s.iterations}×{s.batch_sizes}" for s in self.stages)
        return f"FullMultiscale(levels={self.levels}, stages=[{plan}])"
