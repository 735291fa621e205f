"""Batch sizes per level: allocation rules as strategy objects.

* :class:`Fixed` — as given.
* :class:`Paper` — ``N_l = N_0 · 4**l`` (volumes: ``8**l``): every coarser level has a quarter of the pixels, so each
  level costs the same (the paper's choice).
* :class:`MLMC` — Giles' optimum for a multilevel Monte Carlo estimator: minimising the variance
  ``Σ V_l / N_l`` at a fixed cost ``Σ N_l C_l = budget`` gives
  ``N_l = budget · sqrt(V_l / C_l) / Σ_k sqrt(V_k C_k)``.
* :class:`Matched` — the same rule the other way round: the least cost ``Σ N_l C_l`` at which the
  estimator's variance ``Σ V_l / N_l`` equals single-scale SGD's ``V_single / B`` for the batch B
  the user would train with, so MGE takes single-scale's steps at single-scale's noise, cheaper.

An :class:`MGE` takes one of these objects (or its name, ``"fixed"``, ``"paper"``, ``"mlmc"``, ``"matched"``) as
``allocation=``; it binds its own copy, so one object can configure several estimators (e.g. the
stages of a Full-Multiscale run). A rule is one subclass of :class:`Allocation`: it says which
variance it needs measured each step (:meth:`Allocation.measurement`), folds the measurements into
its own state (:meth:`Allocation.observe`) and returns the next step's sizes
(:meth:`Allocation.reallocate`).

What ``V_l`` measures (``MLMC(variance=...)``).

* ``"gradient"`` (default): the per-sample variance of the level-l gradient term itself,
  ``tr Cov[Δg_i]`` with ``Δg_i = ∇ℓ_i(level l) − ∇ℓ_i(level l+1)`` (``∇ℓ_i(level L)`` on the
  coarsest level) — exactly the V_l of Giles' optimum. Per-sample gradients would cost more than
  the step they tune; instead the level's batch is split into halves A and B of m samples and
  ``tr Cov = m/2 · E‖Δḡ_A − Δḡ_B‖²``, where ``Δḡ_A − Δḡ_B`` is the gradient of one scalar
  (the half-batch loss differences), so it costs one extra backward pass through the graph the
  step already built, per level. It runs every step during the warm-up and every
  ``variance_every`` steps after it; its cost is booked in the step's cost.
* ``"loss"``: the variance over samples of the per-sample *loss* difference
  ``ℓ_i(level l) − ℓ_i(level l+1)``, read off the predictions the step computes anyway (free).
  Both are driven by how far the coarse model output is from the restricted fine one, but the
  loss proxy measures it in output space and tends to under-weight the fine levels (see
  bench/bench_mge.py), so it is the cheap option, not the default.

Either estimate is an exponential moving average across steps (:class:`RunningVariance`), so
one noisy batch does not swing the allocation. Under torch.distributed every rank measures on its
own share; :class:`MLMC` averages the variances over the ranks (one small all-reduce per
reallocation) so all ranks keep the same batch sizes.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch

__all__ = ["ALLOCATIONS", "Allocation", "Fixed", "Paper", "MLMC", "Matched", "make_allocation", "RunningVariance",
           "paper_batch_sizes", "mlmc_batch_sizes", "matched_batch_sizes", "budget_batch_sizes", "round_batch"]


def round_batch(n: float, multiple_of: int = 1, minimum: int = 1) -> int:
    """Round a batch size to the nearest multiple of ``multiple_of`` (e.g. the world size), at least ``minimum``."""
    m = max(multiple_of, 1)
    return max(int(round(n / m)) * m, -(-minimum // m) * m)


def paper_batch_sizes(n0: int, levels: int, multiple_of: int = 1, dims: int = 2) -> list[int]:
    """``[n0, 4 n0, 16 n0, …]`` for levels 0..``levels`` (volumes, ``dims=3``: ``[n0, 8 n0, 64 n0, …]``)."""
    return [round_batch(n0 * (2 ** dims) ** l, multiple_of) for l in range(levels + 1)]


def mlmc_batch_sizes(
    variances: Sequence[float], costs: Sequence[float], budget: float, *, multiple_of: int = 1, minimum: int = 1
) -> list[int]:
    """Giles' allocation ``N_l ∝ sqrt(V_l / C_l)`` with ``Σ N_l C_l ≈ budget``.

    ``variances[l]`` is the per-sample variance of level l's term, ``costs[l]`` the cost of one
    sample of it (any unit, as long as ``budget`` is in the same one). A level whose variance
    is zero gets ``minimum`` samples: it still has to be evaluated to keep the sum telescoping.
    """
    if len(variances) != len(costs):
        raise ValueError(f"mlmc_batch_sizes: {len(variances)} variances but {len(costs)} costs; give one of each per level")
    if any(c <= 0 for c in costs):
        raise ValueError(f"mlmc_batch_sizes: costs must be > 0, got {list(costs)}")
    v = [max(float(x), 0.0) for x in variances]
    denom = sum(math.sqrt(vl * cl) for vl, cl in zip(v, costs))
    if denom == 0.0:
        # No information yet: spread the budget evenly over the levels' costs.
        return [round_batch(budget / (len(costs) * cl), multiple_of, minimum) for cl in costs]
    return [round_batch(budget * math.sqrt(vl / cl) / denom, multiple_of, minimum) for vl, cl in zip(v, costs)]


def matched_batch_sizes(
    variances: Sequence[float], costs: Sequence[float], target: float, *, multiple_of: int = 1,
    minimum: int | Sequence[int] = 1, tolerance: float = 0.1,
) -> list[int]:
    """The least-cost sizes with ``Σ V_l / N_l <= target``: Giles' rule ``N_l = λ sqrt(V_l / C_l)``
    with λ set by the variance target instead of a budget.

    ``minimum`` (one int, or one per level) is a floor: a level held at it contributes
    ``V_l / minimum`` and the others share what is left of the target (the constrained optimum).
    The real-valued optimum is rounded to the nearest multiple of ``multiple_of``; while the
    rounded sizes miss the target by more than ``tolerance``, one more multiple goes to the level
    that buys the most variance per cost.
    """
    n = len(variances)
    if len(costs) != n:
        raise ValueError(f"matched_batch_sizes: {n} variances but {len(costs)} costs; give one of each per level")
    if any(c <= 0 for c in costs):
        raise ValueError(f"matched_batch_sizes: costs must be > 0, got {list(costs)}")
    if not target > 0:
        raise ValueError(f"matched_batch_sizes: target must be > 0, got target={target}")
    m = max(multiple_of, 1)
    floor = [minimum] * n if isinstance(minimum, int) else list(minimum)
    floor = [-(-f // m) * m for f in floor]
    v = [max(float(x), 0.0) for x in variances]
    held = [vl == 0.0 for vl in v]  # a zero-variance level needs only its floor
    while True:
        free = [l for l in range(n) if not held[l]]
        left = target - sum(v[l] / floor[l] for l in range(n) if held[l])
        if not free or left <= 0:
            real = [float(f) for f in floor]
            break
        lam = sum(math.sqrt(v[l] * costs[l]) for l in free) / left
        real = [float(floor[l]) if held[l] else lam * math.sqrt(v[l] / costs[l]) for l in range(n)]
        newly = [l for l in free if real[l] < floor[l]]
        if not newly:
            break
        for l in newly:
            held[l] = True
    sizes = [max(int(round(r / m)) * m, floor[l]) for l, r in enumerate(real)]
    while sum(vl / nl for vl, nl in zip(v, sizes)) > target * (1 + tolerance):
        gain = [(v[l] / sizes[l] - v[l] / (sizes[l] + m)) / (m * costs[l]) for l in range(n)]
        sizes[max(range(n), key=gain.__getitem__)] += m
    return sizes


def budget_batch_sizes(
    variances: Sequence[float], costs: Sequence[float], budget: float, *, multiple_of: int = 1, minimum: int = 1,
) -> list[int]:
    """The least-variance sizes with ``Σ N_l C_l <= budget`` and ``N_l >= minimum``: Giles' rule
    ``N_l = λ sqrt(V_l / C_l)`` with levels below the floor held at it (the constrained optimum),
    rounded, then trimmed where rounding went over the budget (the floors alone may exceed it:
    then the floors)."""
    n = len(variances)
    m = max(multiple_of, 1)
    floor = -(-minimum // m) * m
    v = [max(float(x), 0.0) for x in variances]
    held = [vl == 0.0 for vl in v]
    while True:
        free = [l for l in range(n) if not held[l]]
        left = budget - sum(floor * costs[l] for l in range(n) if held[l])
        denom = sum(math.sqrt(v[l] * costs[l]) for l in free)
        if not free or left <= 0 or denom == 0:
            real = [float(floor)] * n
            break
        lam = left / denom
        real = [float(floor) if held[l] else lam * math.sqrt(v[l] / costs[l]) for l in range(n)]
        newly = [l for l in free if real[l] < floor]
        if not newly:
            break
        for l in newly:
            held[l] = True
    sizes = [max(int(round(r / m)) * m, floor) for r in real]
    while sum(x * c for x, c in zip(sizes, costs)) > budget * (1 + 1e-9):
        above = [l for l in range(n) if sizes[l] > floor]
        if not above:
            break
        # Give back the multiple that costs the least variance per unit of work saved.
        loss = {l: (v[l] / (sizes[l] - m) - v[l] / sizes[l]) / (m * costs[l]) for l in above}
        sizes[min(above, key=loss.__getitem__)] -= m
    return sizes


class RunningVariance:
    """Exponential moving averages of the per-level sample mean and variance of a scalar.

    ``update(l, values)`` takes the per-sample values of level l in one step (1-D tensor).
    ``variance[l]`` is ``None`` until level l has been seen with at least two samples.
    """

    def __init__(self, levels: int, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"RunningVariance: decay must be in [0, 1), got decay={decay}")
        self.decay = decay
        self.variance: list[float | None] = [None] * (levels + 1)
        self.mean: list[float | None] = [None] * (levels + 1)
        self.updates = [0] * (levels + 1)

    def update(self, level: int, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        if values.numel() < 2:
            return
        var, mean = torch.var_mean(values)
        self.update_variance(level, float(var), float(mean))

    def update_variance(self, level: int, var: float, mean: float = 0.0) -> None:
        """Fold in a variance measured some other way (e.g. from gradients of half batches).
        A non-finite measurement (a step whose loss or gradient overflowed) is dropped: one such
        step would poison the running average, and with it every later batch size."""
        if not (math.isfinite(var) and math.isfinite(mean)):
            return
        if self.variance[level] is None:
            self.variance[level], self.mean[level] = var, mean
        else:
            d = self.decay
            self.variance[level] = d * self.variance[level] + (1 - d) * var
            self.mean[level] = d * self.mean[level] + (1 - d) * mean
        self.updates[level] += 1

    def ready(self) -> bool:
        return all(v is not None for v in self.variance)

    def allreduce_mean(self) -> None:
        """Average the variances over the torch.distributed ranks (no-op outside a multi-rank run):
        ranks measure on different shares, and must agree on the batch sizes drawn from them."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        v = torch.tensor(self.variance, dtype=torch.float64, device=dev)
        dist.all_reduce(v)
        self.variance = (v / dist.get_world_size()).tolist()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "variance": list(self.variance), "mean": list(self.mean), "updates": list(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.variance, self.mean, self.updates = list(state["variance"]), list(state["mean"]), list(state["updates"])


def check_sizes(sizes: Sequence, levels: int) -> None:
    """Batch sizes must be positive ints (the message names MGE's argument)."""
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"MGE: batch_sizes must be positive ints, got batch_sizes={list(sizes)!r}; "
                             f"e.g. batch_sizes=[8] * {levels + 1}")


def _check_int(value, name: str, minimum: int, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {name}={value!r}")
    return value


class Allocation:
    """How an :class:`MGE` sizes its levels' batches; the base class keeps them as given.

    An estimator calls :meth:`bind` once (getting its own copy with per-level state), then every
    step :meth:`measurement` (which variance to measure, if any), :meth:`observe` with what it
    measured, and :meth:`reallocate` for the next step's sizes. Subclass it for a new rule.
    """

    name = "fixed"
    levels: int = 0
    multiple_of: int = 1
    dims: int = 2

    def bind(self, levels: int, level_work: Sequence[float], multiple_of: int, count_flops: bool) -> "Allocation":
        """A copy of this rule for an estimator with ``levels`` coarser levels, the per-sample work
        ``level_work`` of each level and batch sizes rounded to multiples of ``multiple_of``. The
        estimator then sets ``dims`` (2, or 3 for volumes: a coarser grid holds 2**-dims of the cells)."""
        bound = copy.deepcopy(self)
        bound.levels, bound.multiple_of = levels, multiple_of
        bound.level_work = list(level_work)
        return bound

    def initial_sizes(self, sizes: list) -> list[int]:
        """The first step's sizes from what the user gave: one int for every level, or one per level."""
        n = self.levels + 1
        check_sizes(sizes, self.levels)
        if len(sizes) not in (1, n):
            raise ValueError(
                f"MGE: batch_sizes has {len(sizes)} entries but levels={self.levels} needs {n} (one per level, "
                f"finest first); pass {n} ints or a single int for every level"
            )
        return sizes * n if len(sizes) == 1 else list(sizes)

    def measurement(self, step: int) -> str | None:
        """What the estimator measures at ``step``: ``None``, ``"loss"`` (per-sample loss
        differences, :meth:`observe` gets a 1-D tensor) or ``"gradient"`` (half-batch gradient
        variance, :meth:`observe` gets a float)."""
        return None

    def observe(self, level: int, value) -> None:
        """Fold in level ``level``'s measurement of this step."""

    def observe_single(self, value: float) -> None:
        """Fold in the single-scale per-sample gradient variance measured with level 0's
        ``"gradient"`` measurement (its fine evaluation alone)."""

    def reallocate(self, step: int, level_costs: Sequence[float]) -> list[int] | None:
        """The next step's sizes after ``step`` steps (``None``: keep the current ones);
        ``level_costs[l]`` is the cost of one sample of level l in the estimator's cost measure."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Fixed(Allocation):
    """The batch sizes as given."""


class Paper(Allocation):
    """``N_l = N_0 · 4**l`` (volumes: ``8**l``) from the finest level's size (further sizes given are ignored)."""

    name = "paper"

    def initial_sizes(self, sizes: list) -> list[int]:
        check_sizes(sizes[:1], self.levels)
        return paper_batch_sizes(sizes[0], self.levels, self.multiple_of, self.dims)


class MLMC(Allocation):
    """Giles' allocation from running per-level variances under a per-step work budget.

    Args:
        budget: work units per step to spend; default: the cost of the initial batch sizes.
        warmup_steps: steps with the initial sizes before the first reallocation.
        variance_decay: EMA factor of the running level variances.
        variance: what V_l measures, ``"gradient"`` (the level term's gradient variance from half
            batches; one extra backward per level when it runs) or ``"loss"`` (per-sample loss
            differences; free).
        variance_every: with ``variance="gradient"``: measure every this many steps after the
            warm-up (every step during it).
        cost_measure: the per-sample cost C_l, ``"work"`` (pixels; default, exact for
            convolutional models and deterministic) or ``"flops"`` (measured; needs the
            estimator's ``count_flops=True``).
        min_batch: smallest batch a level gets (raised to 2 per rank so every level's variance
            can still be measured).
    """

    name = "mlmc"

    def __init__(self, budget: float | None = None, warmup_steps: int = 2, variance_decay: float = 0.9,
                 variance: str = "gradient", variance_every: int = 10, cost_measure: str = "work",
                 min_batch: int = 1) -> None:
        if budget is not None and not budget > 0:
            raise ValueError(f"MLMC: budget must be > 0 work units per step, got budget={budget}")
        if variance not in ("gradient", "loss"):
            raise ValueError(f"MLMC: variance must be 'gradient' or 'loss', got variance={variance!r}")
        if cost_measure not in ("work", "flops"):
            raise ValueError(f"MLMC: cost_measure must be 'work' or 'flops', got cost_measure={cost_measure!r}")
        if not 0.0 <= variance_decay < 1.0:
            raise ValueError(f"MLMC: variance_decay must be in [0, 1), got variance_decay={variance_decay}")
        self.budget = None if budget is None else float(budget)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0, "MLMC")
        self.variance_decay, self.variance_source = variance_decay, variance
        self.variance_every = _check_int(variance_every, "variance_every", 1, "MLMC")
        self.cost_measure = cost_measure
        self.min_batch = _check_int(min_batch, "min_batch", 1, "MLMC")
        self.variance: RunningVariance | None = None

    def bind(self, levels, level_work, multiple_of, count_flops) -> "MLMC":
        if self.cost_measure == "flops" and not count_flops:
            raise ValueError("MGE: cost_measure='flops' needs count_flops=True; pass count_flops=True or cost_measure='work'")
        bound = super().bind(levels, level_work, multiple_of, count_flops)
        # A level's variance needs two samples on every rank (the halves, or a sample variance).
        bound.min_batch = max(self.min_batch, 2 * multiple_of)
        bound.variance = RunningVariance(levels, self.variance_decay)
        return bound

    def initial_sizes(self, sizes: list) -> list[int]:
        sizes = super().initial_sizes(sizes)
        small = [(l, n) for l, n in enumerate(sizes) if n < self.min_batch]
        if small:
            raise ValueError(
                f"MGE: allocation 'mlmc' measures each level's variance from at least {self.min_batch} samples"
                f"{' per rank' if self.multiple_of > 1 else ''}, but batch_sizes {list(sizes)} give level "
                f"{small[0][0]} only {small[0][1]}: its variance is never measured and the sizes never adapt. Give "
                f"every level at least {self.min_batch} samples, or use allocation='fixed'")
        if self.budget is None:
            self.budget = sum(n * c for n, c in zip(sizes, self.level_work))
        return sizes

    def measurement(self, step: int) -> str | None:
        if self.variance_source == "loss":
            return "loss"
        return "gradient" if step < self.warmup_steps or step % self.variance_every == 0 else None

    def observe(self, level: int, value) -> None:
        if isinstance(value, torch.Tensor):
            self.variance.update(level, value)
        else:
            self.variance.update_variance(level, float(value))

    def reallocate(self, step: int, level_costs: Sequence[float]) -> list[int] | None:
        if not self.variance.ready():
            return None
        self.variance.allreduce_mean()
        if step < self.warmup_steps:
            return None
        # The budget is in work units; a flops cost measure rescales it to FLOPs per step.
        budget = self.budget * sum(level_costs) / sum(self.level_work)
        return self.sizes_from(self.variance.variance, list(level_costs), budget)

    def sizes_from(self, variances: Sequence[float], costs: Sequence[float], budget: float) -> list[int]:
        """The rule itself: Giles' optimum (override for another variance-driven rule)."""
        return mlmc_batch_sizes(variances, costs, budget, multiple_of=self.multiple_of, minimum=self.min_batch)

    def state_dict(self) -> dict:
        return {"variance": self.variance.state_dict(), "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        self.budget = float(state["budget"])
        self.variance.load_state_dict(state["variance"])

    def __repr__(self) -> str:
        return (f"MLMC(budget={self.budget}, warmup_steps={self.warmup_steps}, variance={self.variance_source!r}, "
                f"cost_measure={self.cost_measure!r})")


class Matched(MLMC):
    """Single-scale's gradient variance at the least cost: Giles' rule with a variance target.

    For the single-scale batch B the user would train with, the next step's sizes minimise
    ``Σ N_l C_l`` subject to ``Σ V_l / N_l = V_single / B`` (:func:`matched_batch_sizes`), where
    ``V_l`` is the per-sample variance of level l's gradient term (as :class:`MLMC` measures it,
    from half batches) and ``V_single`` that of the single-scale per-sample gradient, measured on
    the same half batches of level 0's fine evaluation alone (the same backward passes, so it
    costs nothing more). The sizes depend only on the ratios ``V_l / V_single``, taken as the
    quotients of running averages of ``V_l`` and of ``V_single`` with the same weights: averaging
    the per-measurement ratios instead is biased high, several-fold, since one measurement of
    ``V_single`` comes from a single pair of half batches and is often far below its mean. The
    averages decay fast (``variance_decay`` per measurement), since the gradients' scale falls by
    orders of magnitude in the first steps of training. MGE then takes single-scale's steps with
    single-scale's noise; what it saves is work. It pays only if ``(Σ_l sqrt(V_l C_l))² <
    V_single · C_single``, i.e. if the level differences' variances decay faster than the grids'
    costs grow; :attr:`predicted_work_ratio` is that ratio and a warning says when it is >= 1.
    Where it is, matching would cost more than single-scale: the work per step (averaged over a
    measurement period, the measurement included) is capped at ``max_work`` times single-scale's
    and the sizes are then Giles' least-variance ones for that budget
    (:func:`budget_batch_sizes`), noisier than single-scale.

    Args:
        batch: the single-scale batch B to match; default: the finest level's initial size.
        warmup_steps: steps with two samples per rank on every level (each measured) before the
            first reallocation.
        variance_every: measure the variances every this many steps after the warm-up, and
            re-solve the sizes from them; the measurement's extra backward pass is booked in
            the step's cost.
        variance_decay: EMA factor of the running averages (per measurement).
        min_batch: floor of a level's size on steps that do not measure (1 keeps the sum
            telescoping); measuring steps raise every level to 2 per rank (two halves).
        tolerance: rounding may leave the variance this fraction above the target.
        max_work: cap of a step's work as a multiple of single-scale's (B fine samples); ``None``:
            no cap (match the variance at any cost).
        cost_measure: ``"work"`` (default) or ``"flops"``, as for :class:`MLMC`.

    ``last`` holds the latest measurement (step, V_l, V_single, the sizes, the predicted variance
    ``Σ V_l / N_l`` and the target ``V_single / B``); ``history`` every one of them.
    """

    name = "matched"

    def __init__(self, batch: int | None = None, warmup_steps: int = 1, variance_every: int = 10,
                 variance_decay: float = 0.7, min_batch: int = 1, tolerance: float = 0.1,
                 max_work: float | None = 1.0, cost_measure: str = "work") -> None:
        super().__init__(None, warmup_steps, variance_decay, "gradient", variance_every, cost_measure, min_batch)
        if batch is not None:
            _check_int(batch, "batch", 1, "Matched")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"Matched: tolerance must be in [0, 1), got tolerance={tolerance}")
        if max_work is not None and not max_work > 0:
            raise ValueError(f"Matched: max_work must be > 0 (a multiple of single-scale's step work) or None, "
                             f"got max_work={max_work}")
        self.batch, self.tolerance, self.max_work = batch, tolerance, max_work
        self.single: RunningVariance | None = None
        self.last: dict | None = None
        self.history: list[dict] = []
        self.predicted_work_ratio: float | None = None
        self._warned = False

    def bind(self, levels, level_work, multiple_of, count_flops) -> "Matched":
        bound = super().bind(levels, level_work, multiple_of, count_flops)
        bound.measure_min = 2 * multiple_of
        bound.min_batch = -(-self.min_batch // multiple_of) * multiple_of
        bound.single = RunningVariance(0, self.variance_decay)  # V_single; bound.variance holds V_l
        bound._raw, bound._raw_single = [None] * (levels + 1), None
        bound._measuring_now = bound._retry = False
        return bound

    def initial_sizes(self, sizes: list) -> list[int]:
        sizes = Allocation.initial_sizes(self, sizes)
        b = self.batch if self.batch is not None else sizes[0]
        m = self.multiple_of
        if b % m:
            near = max(m, round(b / m) * m)
            raise ValueError(f"Matched: batch={b} (the single-scale batch to match) must be a multiple of the world "
                             f"size {m}, since every rank takes an equal share; use batch={near} (--batch-size {near})")
        self.batch = b
        # The cheapest step there is: every level at its floor. If that costs single-scale's B fine
        # samples or more, no allocation can match single-scale's variance for less.
        fine = self._fine_sample_work
        cheapest = sum(self.min_batch * c for c in self.level_work)
        if cheapest >= b * fine:
            need = math.floor(cheapest / fine / m) * m + m
            import warnings

            warnings.warn(
                f"Matched: batch={b} is too small for levels={self.levels}: the cheapest MGE step (every level at "
                f"{self.min_batch} sample(s)) costs {cheapest / fine:.2f} fine samples, single-scale's step {b}, so "
                f"matching single-scale's variance cannot save work. Use --batch-size {need} or more (batch={need}), "
                f"or fewer --levels", UserWarning, stacklevel=4)
        # Warm-up: two per rank on every level, the least that measures (the warm-up's work counts
        # against the budget like any step's).
        return [self.measure_min] * (self.levels + 1)

    @property
    def _fine_sample_work(self) -> float:
        """Work of one sample on the estimator's finest grid alone: single-scale's sample."""
        return self.level_work[-1] * float(2 ** self.dims) ** self.levels

    def _scheduled(self, step: int) -> bool:
        return step < self.warmup_steps or step % self.variance_every == 0 or self._retry

    def measurement(self, step: int) -> str | None:
        self._measuring_now = self._scheduled(step)
        return "gradient" if self._measuring_now else None

    def observe(self, level: int, value) -> None:
        self._raw[level] = float(value)

    def observe_single(self, value: float) -> None:
        self._raw_single = float(value)

    def _fold(self) -> None:
        """Fold this step's measurements (averaged over the ranks) into the running averages."""
        raw = RunningVariance(self.levels, 0.0)
        raw.variance = [math.nan if r is None else r for r in self._raw] + [
            math.nan if self._raw_single is None else self._raw_single]
        raw.allreduce_mean()
        *v, vs = raw.variance
        self._raw, self._raw_single = [None] * (self.levels + 1), None
        # A level too small to split (batches drawn before the sizes were raised, e.g. by a loader
        # that fetches one step ahead) or a zero gradient: nothing to learn; measure the next step.
        # A non-finite measurement (overflowed loss or gradient) is dropped the same way.
        self._retry = not (math.isfinite(vs) and vs > 0) or not all(math.isfinite(x) for x in v)
        if self._retry:
            return
        self.single.update_variance(0, vs)
        for l, vl in enumerate(v):
            self.variance.update_variance(l, vl)

    def reallocate(self, step: int, level_costs: Sequence[float]) -> list[int] | None:
        measured = self._measuring_now  # new figures came in with the step just taken
        if measured:
            self._fold()
        measuring = self._scheduled(step)
        if step < self.warmup_steps or not (self.variance.ready() and self.single.ready()):
            return None
        vs = float(self.single.variance[0])
        v = list(self.variance.variance)
        target = vs / self.batch
        costs = list(level_costs)
        if self.max_work is None:
            floor = self.measure_min if measuring else self.min_batch
            sizes, capped = matched_batch_sizes(v, costs, target, multiple_of=self.multiple_of, minimum=floor,
                                                tolerance=self.tolerance), False
        else:
            normal, meas, capped = self._capped(v, costs, target)
            sizes = meas if measuring else normal
        if measured:
            self._record(step, v, vs, target, sizes, capped)
        return sizes

    def _capped(self, v: list[float], costs: list[float], target: float) -> tuple[list[int], list[int], bool]:
        """(sizes of a step that does not measure, of one that does, whether the cap bound them).

        The cap holds on average over a measurement period of k steps: k − 1 plain steps and one
        that raises every level to two per rank and adds its extra backward pass (2/3 of its work)."""
        fine = costs[-1] * float(2 ** self.dims) ** self.levels  # single-scale's sample: the finest grid alone
        cap, k = self.max_work * self.batch * fine, self.variance_every
        work = lambda sizes: sum(n * c for n, c in zip(sizes, costs))  # noqa: E731
        normal = matched_batch_sizes(v, costs, target, multiple_of=self.multiple_of, minimum=self.min_batch,
                                     tolerance=self.tolerance)
        budget, capped = work(normal), False
        while True:
            meas = [max(n, self.measure_min) for n in normal]
            if ((k - 1) * work(normal) + (5.0 / 3.0) * work(meas)) / k <= cap * (1 + 1e-9):
                return normal, meas, capped
            if all(n <= self.min_batch for n in normal):
                return normal, meas, True  # the floors alone are over the cap: nothing cheaper measures
            budget *= 0.97
            normal = budget_batch_sizes(v, costs, budget, multiple_of=self.multiple_of, minimum=self.min_batch)
            capped = True

    def _record(self, step: int, v: list[float], vs: float, target: float, sizes: list[int], capped: bool) -> None:
        fine = self._fine_sample_work
        # Work of the unconstrained optimum relative to single-scale's B fine samples.
        self.predicted_work_ratio = sum(math.sqrt(max(vl, 0.0) * c) for vl, c in zip(v, self.level_work)) ** 2 / (vs * fine)
        self.last = {"step": step, "variances": list(v), "single_variance": vs, "batch_sizes": list(sizes),
                     "variance": sum(vl / n for vl, n in zip(v, sizes)), "target": target,
                     "work_per_step": sum(n * c for n, c in zip(sizes, self.level_work)) / fine,
                     "single_work_per_step": float(self.batch), "predicted_work_ratio": self.predicted_work_ratio,
                     "capped": capped}
        self.history.append(self.last)
        diffs = v[:-1]
        decay = [diffs[l] / diffs[l + 1] if diffs[l + 1] > 0 else math.inf for l in range(len(diffs) - 1)]
        if not self._warned and (self.predicted_work_ratio >= 1.0 or any(r >= 1.0 for r in decay)):
            import warnings

            self._warned = True
            ratios = ", ".join(f"{vl / vs:.3g}" for vl in v)
            # Say which condition fails: coarse differences that do not shrink towards the fine
            # grid, or (the usual case once a denoiser has learnt the image content) a finest
            # difference about as noisy as single-scale's own gradient.
            why = []
            if any(r >= 1.0 for r in decay):
                why.append(f"the differences do not shrink towards the fine grid (finer-over-coarser ratios "
                           f"{[round(r, 3) for r in decay]}; MGE needs them well below 1)")
            if v and v[0] / vs > 0.25:
                why.append(f"the finest difference alone has {v[0] / vs:.2g}x single-scale's per-sample variance "
                           f"at {self.level_work[0] / self._fine_sample_work:.3g}x a fine "
                           "sample's cost (a sample's fine and coarse gradients correlate too little)")
            warnings.warn(
                f"Matched: MGE cannot pay here: matching single-scale's gradient variance costs "
                f"{self.predicted_work_ratio:.2f}x its work at best"
                f"{'' if self.max_work is None else f' (steps are capped at {self.max_work:g}x its work, so MGE is noisier than it)'}. "
                f"Measured V_l / V_single = [{ratios}] (finest first; the last is the coarsest level's own "
                f"gradient){': ' + '; '.join(why) if why else ''}. Causes: gradient noise that does not correlate "
                f"across grids (white noise: a coarse sample has {2 ** self.dims}x fewer pixels per level to average it over), "
                f"mesh-free layers unresolved on the coarse grids, or too many --levels; single-scale (--mode single) "
                f"or Full-Multiscale (--mode fmg) then train better", UserWarning, stacklevel=4)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "single": self.single.state_dict(), "batch": self.batch,
                "warned": self._warned, "retry": self._retry, "variance_holds": "V_l"}

    def load_state_dict(self, state: dict) -> None:
        self.variance.load_state_dict(state["variance"])
        self.single.load_state_dict(state["single"])
        if state.get("variance_holds") != "V_l":  # saved when it held the ratios V_l / V_single
            vs = self.single.variance[0]
            self.variance.variance = [None if r is None or vs is None else r * vs for r in self.variance.variance]
        self.batch, self._warned = int(state["batch"]), bool(state["warned"])
        self._retry = bool(state.get("retry", False))

    def __repr__(self) -> str:
        return (f"Matched(batch={self.batch}, warmup_steps={self.warmup_steps}, variance_every={self.variance_every}, "
                f"max_work={self.max_work}, cost_measure={self.cost_measure!r})")


# Names accepted wherever an allocation is configured by string (CLI, YAML, MGE(allocation="paper")).
_BY_NAME = {"fixed": Fixed, "paper": Paper, "mlmc": MLMC, "matched": Matched}
ALLOCATIONS = tuple(_BY_NAME)


def make_allocation(allocation: str | Allocation) -> Allocation:
    """An :class:`Allocation` from itself or its name (``"fixed"``, ``"paper"``, ``"mlmc"``, ``"matched"`` with
    defaults)."""
    if isinstance(allocation, Allocation):
        return allocation
    if isinstance(allocation, str) and allocation in _BY_NAME:
        return _BY_NAME[allocation]()
    raise ValueError(f"MGE: unknown allocation={allocation!r}; use one of {ALLOCATIONS} or an msconv.multilevel.Allocation "
                     "object such as MLMC(budget=...)")
