"""A training run as a list of stages, each an :class:`MGE` estimator over levels.

A stage runs ``iterations`` steps of MGE over levels ``base_level .. base_level + levels`` with
``batch_sizes`` (finest first). Every mode is such a list:

* single-scale — one stage, ``levels=0`` (the plain loss on the data's grid);
* MGE — one stage, ``base_level=0``;
* Full-Multiscale — one stage per level from the coarsest (plain loss on level L) to the finest
  (MGE over 0..L); weights and optimizer state carry over from stage to stage.

:func:`plan` builds the list from a compute budget in fine-equivalent work units (or a total
step count), with each step's work from the estimator's own formula
(:func:`msconv.multilevel.step_work`). :class:`Schedule` iterates it, handing the loop one
:class:`ScheduleStep` per step; the loop owns the model, the optimizer and the learning-rate
scheduler (it steps the scheduler after every step). Adaptive stage ends: with ``validate=``, a
non-final stage ends early when validation stops improving; the iterations it skips still count
in the plan, and a scheduler given as ``fast_forward_scheduler=`` is stepped over them so the next
stage starts at its planned rate (the only time the schedule touches it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from msconv.multilevel.allocation import Allocation
from msconv.multilevel.cost import StepCost
from msconv.multilevel.estimator import MGE, step_work
from msconv.multilevel.sampler import IndexStream, multilevel_loader, resolve_rank_world

__all__ = ["MODES", "Stage", "ScheduleStep", "Schedule", "plan"]

MODES = ("single", "mge", "fmg")


@dataclass
class Stage:
    """One stage: ``iterations`` steps of MGE over levels ``base_level .. base_level + levels``.

    ``lr_scale`` multiplies the scheduled learning rate during the stage (large-batch rules);
    ``estimator`` is set when a :class:`Schedule` runs the stage; ``steps_run``,
    ``advanced_early`` and ``validation`` record what happened.

    Sample size: ``crop`` is the side, on the finest grid, of the crops the stage draws (None: the
    run's crop); ``resize`` the side they are resized to before the task corrupts them
    (progressive resizing; None: not resized). ``area`` is the work of one level-0 sample in work
    units (its pixels over the reference crop's); it scales :attr:`work_per_step`. ``dims``: 2 for
    images, 3 for volumes (a coarser grid then holds 1/8 of the voxels).
    """

    base_level: int
    levels: int
    batch_sizes: list[int]
    iterations: int
    index: int = 0
    lr_scale: float = 1.0
    crop: int | None = None
    resize: int | None = None
    area: float = 1.0
    dims: int = 2
    estimator: MGE | None = field(default=None, repr=False)
    steps_run: int = 0
    advanced_early: bool = False
    validation: list[float] = field(default_factory=list)

    @property
    def level(self) -> int:
        """The stage's finest grid (level 0 = the grid the data arrives on)."""
        return self.base_level

    @property
    def spacing(self) -> float:
        """Grid spacing of the stage's level-0 samples in reference pixels (``crop / resize`` for
        resized crops, else 1)."""
        return 1.0 if self.resize is None or self.crop is None else self.crop / self.resize

    @property
    def work_per_step(self) -> float:
        """Nominal work units of one step of this stage."""
        return step_work(self.batch_sizes, self.base_level, self.dims) * self.area

    def as_dict(self) -> dict:
        """The plan of this stage as plain values (what run files record)."""
        d = {"base_level": self.base_level, "levels": self.levels, "batch_sizes": list(self.batch_sizes),
             "iterations": self.iterations, "work_per_step": self.work_per_step}
        if self.crop is not None:
            d["crop"] = self.crop
        if self.resize is not None:
            d["resize"] = self.resize
        return d


def plan(mode: str, levels: int, batch_sizes: Sequence[int], *, budget: float | None = None,
         iterations: int | None = None, iteration_ratio: float = 2.0, batch_ratio: float = 2.0,
         lr_batch_power: float = 0.0, crop: int | None = None, fine_crop: int | None = None,
         plain_stages: bool = False, dims: int = 2) -> list[Stage]:
    """The stages of ``mode`` (``"single"``, ``"mge"`` or ``"fmg"``), scaled so the run spends
    ``budget`` work units or runs ``iterations`` steps in all (exactly one of them).

    ``batch_sizes`` are the finest stage's per-level sizes, finest first (single-scale uses the
    first). Full-Multiscale stage k (finest grid k) runs ``iteration_ratio**k`` times the
    iterations of the finest stage with batches ``batch_ratio**k`` times larger, and its learning
    rate is scaled by (its finest batch / the finest stage's)^``lr_batch_power``.

    ``plain_stages`` (Full-Multiscale): every stage trains on its own grid with the plain loss
    (``levels=0``) instead of MGE over its grid and the coarser ones.

    ``fine_crop`` (Full-Multiscale, with the reference ``crop``): stage k draws crops of side
    ``min(crop, fine_crop * 2**k)`` on the finest grid, i.e. ``fine_crop``-pixel patches on every
    grid until the reference crop's whole field of view fits: small patches on the fine grid,
    the full field of view on the coarse ones. Default: every stage draws the reference crop.

    ``dims``: 2 for images, 3 for volumes (work counts voxels: a crop of side p costs (p/crop)**3).
    """
    if mode not in MODES:
        raise ValueError(f"plan: mode={mode!r} is not one of {MODES}")
    if (budget is None) == (iterations is None):
        raise ValueError("plan: give exactly one of budget= (work units) or iterations= (steps)")
    _check_plan_numbers(mode, levels, batch_sizes, budget, iterations, iteration_ratio, batch_ratio)
    sizes = list(batch_sizes)
    if mode == "single":
        shapes = [(0, 0, sizes[:1], 1.0)]
    elif mode == "mge":
        shapes = [(0, levels, sizes, 1.0)]
    else:
        below = (lambda k: 0) if plain_stages else (lambda k: levels - k)
        shapes = [(k, below(k), [max(1, round(n * batch_ratio ** k)) for n in sizes[: below(k) + 1]],
                   iteration_ratio ** k) for k in range(levels, -1, -1)]
    if fine_crop is not None and mode != "fmg":
        raise ValueError(f"plan: fine_crop applies to mode='fmg' only, got mode={mode!r}")
    if fine_crop is not None and (crop is None or not 0 < fine_crop <= crop):
        raise ValueError(f"plan: fine_crop={fine_crop!r} needs the reference crop= and 0 < fine_crop <= crop, got crop={crop!r}")
    sides = [None if fine_crop is None else min(crop, fine_crop * 2 ** b) for b, *_ in shapes]
    areas = [1.0 if side is None else (side / crop) ** dims for side in sides]
    works = [step_work(bs, b, dims) * a for (b, _, bs, _), a in zip(shapes, areas)]
    if iterations is not None:
        if iterations < len(shapes):
            raise ValueError(f"plan: iterations={iterations} is fewer than the {len(shapes)} stages of mode={mode!r} "
                             f"(each runs at least one step); give iterations >= {len(shapes)}")
        total_rel = sum(r for *_, r in shapes)
        its = [max(1, round(iterations * r / total_rel)) for *_, r in shapes]
        its[-1] = max(1, iterations - sum(its[:-1])) if len(its) > 1 else iterations
        while sum(its) > iterations:  # the rounding gave more: take steps from the longest stage
            its[its.index(max(its))] -= 1
    else:
        scale = budget / sum(r * w for (*_, r), w in zip(shapes, works))
        its = [max(1, round(r * scale)) for *_, r in shapes]
    fine = shapes[-1][2][0]
    return [Stage(b, l, bs, it, index=i, lr_scale=(bs[0] / fine) ** lr_batch_power, crop=side, area=a, dims=dims)
            for i, ((b, l, bs, _), it, side, a) in enumerate(zip(shapes, its, sides, areas))]


def _check_plan_numbers(mode, levels, batch_sizes, budget, iterations, iteration_ratio, batch_ratio) -> None:
    """ValueError naming the argument when a number of :func:`plan` cannot make a plan."""
    def bad(name, v, want):
        raise ValueError(f"plan: {name}={v!r} is not valid; it must be {want}")

    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 0:
        bad("levels", levels, "an int >= 0")
    sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple)) else None
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        bad("batch_sizes", batch_sizes, "a non-empty list of ints >= 1, finest level first")
    if mode == "mge" and len(sizes) != levels + 1:
        bad("batch_sizes", batch_sizes, f"levels + 1 = {levels + 1} sizes for mode='mge'")
    if mode == "fmg" and len(sizes) not in (1, levels + 1):
        bad("batch_sizes", batch_sizes, f"1 or levels + 1 = {levels + 1} sizes for mode='fmg'")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        bad("budget", budget, "a finite number > 0 (work units)")
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1):
        bad("iterations", iterations, "an int >= 1")
    for name, v in (("iteration_ratio", iteration_ratio), ("batch_ratio", batch_ratio)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            bad(name, v, "a finite number > 0")


def _check_sampler_arity(fn: Callable, n: int, owner: str) -> None:
    """TypeError now, not at the first step, when ``sample_batches`` cannot take ``n`` positional arguments."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the first call will tell
    try:
        sig.bind(*range(n))
    except TypeError:
        call = "sample_batches(batch_sizes, level)" if n == 2 else "sample_batches(batch_sizes)"
        raise TypeError(f"{owner}: sample_batches{sig} cannot be called as {call}, which is how the schedule draws "
                        "each step's batches (a list of (x, y) per level, finest first)"
                        + (" with batches_on_stage_grid=True" if n == 2 else "")) from None


@dataclass
class ScheduleStep:
    """What one iteration of a :class:`Schedule` hands the training loop.

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


class Schedule:
    """Iterate a list of :class:`Stage` s, one :class:`MGE` per stage.

    Args:
        stages: the plan (e.g. from :func:`plan`), run in order.
        restriction, allocation: passed to each stage's :class:`MGE` (each binds its own copy of
            the allocation).
        dataset: a map-style data set of ``(x, y)`` at the finest grid; each stage then draws its
            batches with :func:`multilevel_loader` from one shared :class:`IndexStream`, so the
            run walks through the data once across stages and never repeats within a step.
        sample_batches: alternative data source, ``sample_batches(batch_sizes) -> [(x, y), …]``.
        batches_on_stage_grid: ``sample_batches(batch_sizes, level)`` draws each stage's batches
            directly on its finest grid (``level`` = the stage's base level) instead of the finest
            grid of the run, and each stage's MGE takes them there (``data_level``). A coarse stage
            then never samples, corrupts or restricts the fine pixels it would average away, which
            keeps its time per work unit at the fine stage's.
        loader_kwargs: extra DataLoader arguments (``num_workers`` ...).
        seed, shuffle: the data order.
        validate: ``validate() -> float`` (lower is better), called every ``validate_every``
            steps of a stage; when it has not improved by ``min_delta`` for ``patience`` calls, the
            stage ends early (the last stage always runs to the end). Read :attr:`stage` inside it
            to validate on the current grid.
        fast_forward_scheduler: a learning-rate scheduler that an early stage end steps once per
            skipped iteration, so one schedule spans the plan. The loop still steps it after every
            step it runs.
        estimator_kwargs: extra :class:`MGE` arguments (``fuse``, ``count_flops``, ``pyramid_fn`` ...).
        rank, world_size: this process's share of every level (default: torch.distributed).
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        restriction: str = "average",
        allocation: str | Allocation = "fixed",
        *,
        dataset=None,
        sample_batches: Callable[[list[int]], list] | None = None,
        batches_on_stage_grid: bool = False,
        loader_kwargs: dict | None = None,
        seed: int = 0,
        shuffle: bool = True,
        validate: Callable[[], float] | None = None,
        validate_every: int = 50,
        patience: int = 3,
        min_delta: float = 0.0,
        fast_forward_scheduler=None,
        estimator_kwargs: dict | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        owner = type(self).__name__
        if dataset is not None and sample_batches is not None:
            raise ValueError(f"{owner}: pass dataset= or sample_batches=, not both")
        for name, v in (("validate_every", validate_every), ("patience", patience)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{owner}: {name} must be an int >= 1, got {name}={v!r}")
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        kwargs = dict(estimator_kwargs or {})
        kwargs.setdefault("multiple_of", self.world_size)
        self.stages: list[Stage] = list(stages)
        if not self.stages:
            raise ValueError(f"{owner}: the plan has no stages")
        for i, st in enumerate(self.stages):
            st.index = i
            try:
                st.estimator = MGE(st.levels, st.batch_sizes, restriction, allocation, base_level=st.base_level,
                                   data_level=st.base_level if batches_on_stage_grid else 0,
                                   grid_spacing=st.spacing, **{"dims": st.dims, **kwargs})
            except ValueError as e:
                raise ValueError(f"{owner}: stage {i} (finest level {st.base_level}): {e}") from None
            st.batch_sizes = list(st.estimator.batch_sizes)
        if batches_on_stage_grid and sample_batches is None:
            raise ValueError(f"{type(self).__name__}: batches_on_stage_grid=True needs sample_batches=(batch_sizes, level)")
        if sample_batches is not None:
            _check_sampler_arity(sample_batches, 2 if batches_on_stage_grid else 1, type(self).__name__)
        self.dataset, self.sample_batches = dataset, sample_batches
        self.batches_on_stage_grid = batches_on_stage_grid
        self.loader_kwargs = dict(loader_kwargs or {})
        self.stream = IndexStream(len(dataset), shuffle, seed) if dataset is not None else None
        self.fast_forward_scheduler = fast_forward_scheduler
        self.validate, self.validate_every, self.patience, self.min_delta = validate, validate_every, patience, min_delta
        self.global_step = 0
        self.stage: Stage | None = None
        self._resume: dict | None = None
        self._consumed: list[int] = []
        self._stage_stream_state = None

    # ------------------------------------------------------------------ plan

    @property
    def total_steps(self) -> int:
        """Planned steps over all stages: the length one LR schedule must span."""
        return sum(s.iterations for s in self.stages)

    def planned_work(self) -> float:
        """Nominal work units of the whole plan (fine-equivalent forward+backward passes)."""
        return sum(s.iterations * s.work_per_step for s in self.stages)

    def lr_scheduler(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, power: float = 1.0):
        """A :class:`msconv.optim.WarmupPolyLR` over :attr:`total_steps` (linear decay by default, as
        ``msconv train`` uses); step it after every
        ``optimizer.step()``. Early stage ends fast-forward it (it becomes
        :attr:`fast_forward_scheduler`)."""
        from msconv.optim import WarmupPolyLR

        self.fast_forward_scheduler = WarmupPolyLR(optimizer, warmup_steps, self.total_steps, power)
        return self.fast_forward_scheduler

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
                sizes = list(stage.estimator.batch_sizes)
                if self.sample_batches is None:
                    yield None
                elif self.batches_on_stage_grid:
                    yield self.sample_batches(sizes, stage.base_level)
                else:
                    yield self.sample_batches(sizes)

    def __iter__(self) -> Iterator[ScheduleStep]:
        resume, self._resume = self._resume, None
        start = resume["stage"] if resume else 0
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
                yield ScheduleStep(stage, stage.steps_run - 1, self.global_step - 1, batches)
                # Runs when the loop asks for the next step, i.e. after its optimizer step.
                if self._should_advance(stage, tracker):
                    self._skip(stage.iterations - stage.steps_run)
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

    def _skip(self, n: int) -> None:
        self.global_step += n
        if self.fast_forward_scheduler is not None:
            for _ in range(n):
                self.fast_forward_scheduler.step()

    # ------------------------------------------------------------------ convenience loop

    def fit(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable | None = None,
        *,
        scheduler=None,
        on_step: Callable[[ScheduleStep, float], None] | None = None,
        nonfinite: str = "skip",
    ) -> list[dict]:
        """Run the whole schedule; returns one record per step (stage, level, loss, cost figures).

        ``scheduler`` (default: the one :meth:`lr_scheduler` built, if any) is stepped after every
        step. ``nonfinite``: what a non-finite loss or gradient does: ``"skip"`` (no optimizer step,
        recorded as ``skipped``) or ``"raise"`` (stop with a message; weights are untouched).
        """
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"FullMultiscale.fit: nonfinite must be 'skip' or 'raise', got nonfinite={nonfinite!r}")
        scheduler = scheduler if scheduler is not None else self.fast_forward_scheduler
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
            lr = float(optimizer.param_groups[0]["lr"])
            if finite:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            record = {"step": step.global_step, "stage": step.stage.index, "level": step.stage.level,
                      "loss": loss.item(), "skipped": not finite, "lr": lr, **step.last_cost.as_dict()}
            history.append(record)
            if on_step is not None:
                on_step(step, loss.item())
        return history

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Where the schedule is: stage, step counts, estimator allocations and the data position
        at the start of the current stage plus the blocks consumed since (exact with prefetching
        loader workers). Take it in the loop body, after the optimizer and scheduler steps,
        together with the model, optimizer and scheduler states; the resumed iterator continues
        with the next step. Plain Python values only."""
        stage = self.stage if self.stage is not None else self.stages[-1]
        return {
            "stage": stage.index,
            "global_step": self.global_step,
            "consumed": list(self._consumed),
            "stream": self._stage_stream_state,
            "estimators": [s.estimator.state_dict() for s in self.stages],
            "steps_run": [s.steps_run for s in self.stages],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict` at the next iteration of ``iter(self)``; ValueError when
        ``state`` is another schedule's (a different number of stages, or more steps run than planned)."""
        if not isinstance(state, dict):
            raise TypeError(f"Schedule.load_state_dict: expected the dict Schedule.state_dict() returns, got "
                            f"{type(state).__name__}")
        n, runs = len(self.stages), state.get("steps_run", [])
        if len(state.get("estimators", [])) != n or len(runs) != n or not 0 <= state.get("stage", -1) < n or any(
                r > s.iterations for r, s in zip(runs, self.stages)):
            raise ValueError(f"Schedule.load_state_dict: the state is another schedule's ({len(runs)} stage(s), steps run "
                             f"{runs}) and this one has {n} stage(s) of {[s.iterations for s in self.stages]} steps; "
                             "load it into the schedule it came from")
        for s, est, run in zip(self.stages, state["estimators"], state["steps_run"]):
            s.estimator.load_state_dict(est)
            s.steps_run = run
        self.global_step = state["global_step"]
        if self.stream is not None and state["stream"] is not None:
            self.stream.load_state_dict(state["stream"])
        self._stage_stream_state = state["stream"]
        self._consumed = list(state["consumed"])
        self._resume = {"stage": state["stage"], "consumed": list(state["consumed"])}

    def __repr__(self) -> str:
        plan_ = ", ".join(f"L{s.level}:{s.iterations}×{s.batch_sizes}" for s in self.stages)
        return f"{type(self).__name__}(stages=[{plan_}])"
