"""Multiscale Gradient Estimation (SPEC §3): the telescoping multilevel loss.

For levels 0..L with independent batches B_l of N_l samples, inputs x and targets y at the
finest grid and restricted l times (R^l), and a per-pixel-mean loss ℓ:

    ĝ = Σ_{l<L} (1/N_l) Σ_{i∈B_l} [∇ℓ(f_{s_l}(R^l x_i), R^l y_i) − ∇ℓ(f_{s_{l+1}}(R^{l+1} x_i), R^{l+1} y_i)]
        + (1/N_L) Σ_{i∈B_L} ∇ℓ(f_{s_L}(R^L x_i), R^L y_i)

:meth:`MGE.loss` returns the scalar whose gradient is ĝ, so one ``backward()`` gives it. Its
value is the matching telescoping estimate of the fine loss.

Fusion. Grid j carries two evaluations: the fine term of batch j (weight +1) and the coarse
term of batch j−1 (weight −1). When the model has no batch-coupled layer they run as one forward
call on the concatenated inputs; the output is split and ``loss_fn`` applied to each part, which
is the same as per-sample weights ±1/N for a per-pixel-mean loss. BatchNorm that normalises with
batch statistics couples the samples of a call, so fusing would change every term: it is
detected and the terms then run in separate calls (``fuse="auto"`` warns once, ``fuse=True``
raises).
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from msconv.multilevel.allocation import ALLOCATIONS, RunningVariance, mlmc_batch_sizes, paper_batch_sizes
from msconv.multilevel.cost import LevelCost, StepCost, count_flops, work_units
from msconv.nn.grid import grid_scale
from msconv.ops.transfer import pyramid
from msconv.reference import RESTRICT_KINDS, max_levels

__all__ = ["MGE", "batch_coupled_modules", "per_sample_loss"]

Batch = tuple[torch.Tensor, torch.Tensor]


def batch_coupled_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose output for one sample depends on the other samples of the
    call: BatchNorm (any dimension, and SyncBatchNorm) in training mode, or with
    ``track_running_stats=False`` (which always normalises with batch statistics)."""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]


def per_sample_loss(loss_fn: Callable, pred: torch.Tensor, target) -> torch.Tensor:
    """Loss of every sample on its own, shape (N,), without autograd.

    MSE is computed in one vectorised expression; any other ``loss_fn`` is called once per sample.
    """
    with torch.no_grad():
        if loss_fn is F.mse_loss or (isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "mean"):
            return (pred - target).pow(2).flatten(1).mean(1)
        return torch.stack([loss_fn(pred[i : i + 1], target[i : i + 1]).reshape(()) for i in range(pred.shape[0])])


def _is_image(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MGE: {name} must be an int >= {minimum}, got {name}={value!r}")
    return value


def _default_multiple_of() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MGE:
    """Multiscale Gradient Estimation over levels ``base_level .. base_level + levels``.

    Args:
        levels: number L of coarser levels below the finest; ``levels=0`` is the plain loss.
        batch_sizes: N_l for every level, finest first (``levels + 1`` ints), or one int:
            ``fixed`` uses it for every level, ``paper`` multiplies it by 4 per coarser level,
            ``mlmc`` starts from it (as ``fixed``) and sets the budget from it.
        restriction: how inputs and targets reach coarser grids: ``average`` (default),
            ``full_weighting``, ``bilinear``, ``nearest`` (see :func:`msconv.restrict`).
        allocation: ``fixed``, ``paper`` or ``mlmc`` (see msconv.multilevel.allocation).
        base_level: the level of the estimator's finest grid relative to the grid the data
            arrives on (Full-Multiscale stage k uses ``base_level=k``); every evaluation runs in
            ``msconv.grid_scale(2 ** (base_level + l))``.
        fuse: ``"auto"`` (fuse same-resolution evaluations unless the model has batch-coupled
            layers), ``True`` (fuse; error if it would be wrong) or ``False``.
        count_flops: count FLOPs with ``torch.utils.flop_counter`` (small Python overhead per op).
        budget: ``mlmc`` only: work units per step to spend; default: the cost of the initial
            ``batch_sizes``.
        warmup_steps: ``mlmc`` only: steps with the initial sizes before the first reallocation.
        variance_decay: ``mlmc`` only: EMA factor of the running level variances.
        variance: ``mlmc`` only: what V_l measures, ``"gradient"`` (the level term's gradient
            variance from half batches; one extra backward per level when it runs) or ``"loss"``
            (per-sample loss differences; free); see msconv.multilevel.allocation.
        variance_every: ``mlmc`` with ``variance="gradient"``: measure every this many steps
            after the warm-up (every step during it).
        cost_measure: ``mlmc`` only: the per-sample cost C_l, ``"work"`` (pixels; default, exact
            for convolutional models and deterministic) or ``"flops"`` (measured).
        multiple_of: batch sizes from ``paper``/``mlmc`` are rounded to multiples of it; default
            the torch.distributed world size (each rank takes an equal share of every level).
        min_batch: smallest batch ``mlmc`` gives a level (at least 2 per rank, so that every
            level's variance can still be measured).
        pyramid_fn: ``pyramid_fn(x, y, depth, restriction) -> (xs, ys)``, the pair on grids
            0..depth, for data whose coarse grids are not plain restrictions of the fine pair
            (e.g. ``msconv.tasks.Denoise(noise_restriction="preserve").pyramid_pair``). Level 0
            must be the pair itself, or the estimator is no longer unbiased for it.

    ``est.batch_sizes`` is the current allocation (what the next step's batches should hold;
    :class:`msconv.multilevel.MultilevelBatchSampler` reads it when given the estimator).
    ``est.last_cost`` is the :class:`StepCost` of the latest call.

    Example::

        >>> est = msconv.MGE(levels=2, batch_sizes=[4, 8, 16])
        >>> batches = [(x0, y0), (x1, y1), (x2, y2)]   # (N_l, C, H, W) each, at the finest grid
        >>> loss = est.loss(model, F.mse_loss, batches)
        >>> est.backward(loss)                            # or loss.backward()
        >>> est.last_cost.work_units                      # 4·(1+1/4) + 8·(1/4+1/16) + 16/16
    """

    def __init__(
        self,
        levels: int,
        batch_sizes: int | Sequence[int],
        restriction: str = "average",
        allocation: str = "fixed",
        *,
        base_level: int = 0,
        fuse: bool | str = "auto",
        count_flops: bool = True,
        budget: float | None = None,
        warmup_steps: int = 2,
        variance_decay: float = 0.9,
        variance: str = "gradient",
        variance_every: int = 10,
        cost_measure: str = "work",
        multiple_of: int | None = None,
        min_batch: int = 1,
        pyramid_fn: Callable | None = None,
    ) -> None:
        self.levels = _check_int(levels, "levels", 0)
        self.base_level = _check_int(base_level, "base_level", 0)
        if restriction not in RESTRICT_KINDS:
            raise ValueError(f"MGE: unknown restriction={restriction!r}; use one of {RESTRICT_KINDS}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"MGE: unknown allocation={allocation!r}; use one of {ALLOCATIONS}")
        if fuse not in ("auto", True, False):
            raise ValueError(f"MGE: fuse must be 'auto', True or False, got fuse={fuse!r}")
        if cost_measure not in ("work", "flops"):
            raise ValueError(f"MGE: cost_measure must be 'work' or 'flops', got cost_measure={cost_measure!r}")
        if cost_measure == "flops" and not count_flops:
            raise ValueError("MGE: cost_measure='flops' needs count_flops=True; pass count_flops=True or cost_measure='work'")
        self.restriction, self.allocation, self.fuse = restriction, allocation, fuse
        if pyramid_fn is not None and not callable(pyramid_fn):
            raise TypeError(f"MGE: pyramid_fn must be callable (x, y, depth, restriction) -> (xs, ys), got {pyramid_fn!r}")
        self.pyramid_fn = pyramid_fn
        self.count_flops, self.cost_measure = count_flops, cost_measure
        self.multiple_of = _check_int(multiple_of if multiple_of is not None else _default_multiple_of(), "multiple_of", 1)
        self.min_batch = _check_int(min_batch, "min_batch", 1)
        if allocation == "mlmc":
            # A level's variance needs two samples on every rank (the halves, or a sample variance).
            self.min_batch = max(self.min_batch, 2 * self.multiple_of)
        self.warmup_steps = _check_int(warmup_steps, "warmup_steps", 0)
        self.batch_sizes = self._initial_sizes(batch_sizes)
        self.budget = float(budget) if budget is not None else self.step_work(self.batch_sizes)
        if self.budget <= 0:
            raise ValueError(f"MGE: budget must be > 0 work units per step, got budget={budget}")
        if variance not in ("gradient", "loss"):
            raise ValueError(f"MGE: variance must be 'gradient' or 'loss', got variance={variance!r}")
        self.variance_source = variance
        self.variance_every = _check_int(variance_every, "variance_every", 1)
        self.variance = RunningVariance(self.levels, variance_decay)
        self.steps = 0
        self.last_cost: StepCost | None = None
        self._level_flops_per_sample: list[float | None] = [None] * (self.levels + 1)
        self._warned_coupled = False

    # ------------------------------------------------------------------ configuration

    def _initial_sizes(self, batch_sizes) -> list[int]:
        n = self.levels + 1
        if isinstance(batch_sizes, (list, tuple)):
            sizes = list(batch_sizes)
            if self.allocation == "paper":
                sizes = sizes[:1]
            elif len(sizes) != n:
                raise ValueError(
                    f"MGE: batch_sizes has {len(sizes)} entries but levels={self.levels} needs {n} (one per level, "
                    f"finest first); pass {n} ints or a single int for every level"
                )
        else:
            sizes = [batch_sizes]
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
                raise ValueError(f"MGE: batch_sizes must be positive ints, got batch_sizes={batch_sizes!r}; e.g. batch_sizes=[8] * {n}")
        if self.allocation == "paper":
            return paper_batch_sizes(sizes[0], self.levels, self.multiple_of)
        return sizes * n if len(sizes) == 1 else sizes

    def level_work(self) -> list[float]:
        """Work units of one sample of each estimator level (fine + coarse evaluation)."""
        b = self.base_level
        return [4.0 ** -(b + l) + (4.0 ** -(b + l + 1) if l < self.levels else 0.0) for l in range(self.levels + 1)]

    def step_work(self, batch_sizes: Sequence[int]) -> float:
        """Nominal work units of a step with these batch sizes (exact for sizes divisible by 2**levels)."""
        return sum(n * c for n, c in zip(batch_sizes, self.level_work()))

    def _fusion(self, model: nn.Module) -> tuple[bool, str]:
        if self.fuse is False:
            return False, "fuse=False"
        coupled = batch_coupled_modules(model)
        if not coupled:
            return True, ""
        note = (
            f"the model normalises with batch statistics in {coupled[:3]}{' …' if len(coupled) > 3 else ''} "
            "(BatchNorm in training mode), so evaluations of different levels cannot share a forward call"
        )
        if self.fuse is True:
            raise ValueError(f"MGE: fuse=True but {note}; pass fuse='auto' (falls back to separate calls) or call model.eval()")
        if not self._warned_coupled:
            warnings.warn(f"MGE: {note}; running each level term in its own forward call", stacklevel=3)
            self._warned_coupled = True
        return False, note

    # ------------------------------------------------------------------ the estimator

    def _check_batches(self, batches) -> list[Batch]:
        n = self.levels + 1
        if not isinstance(batches, (list, tuple)) or len(batches) != n:
            got = f"{len(batches)} pairs" if isinstance(batches, (list, tuple)) else type(batches).__name__
            raise ValueError(
                f"MGE.loss: batches must be a list of levels + 1 = {n} pairs (x, y), one independent batch per "
                f"level, finest first; got {got}. Draw them with msconv.multilevel.MultilevelBatchSampler"
            )
        out = []
        for l, pair in enumerate(batches):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"MGE.loss: batches[{l}] must be a pair (x, y), got {type(pair).__name__}")
            x, y = pair
            if not _is_image(x):
                raise ValueError(
                    f"MGE.loss: batches[{l}][0] must be a floating (N, C, H, W) tensor, got "
                    f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"MGE.loss: batches[{l}] is empty; every level needs at least one sample")
            if isinstance(y, torch.Tensor) and y.shape[:1] != x.shape[:1]:
                raise ValueError(f"MGE.loss: batches[{l}] has x.shape={tuple(x.shape)} but y.shape={tuple(y.shape)}; "
                                 "x and y must hold the same samples")
            depth = self.base_level + l + (1 if l < self.levels else 0)
            allowed = max_levels(x.shape[2], x.shape[3])
            if depth > allowed:
                raise ValueError(
                    f"MGE.loss: batches[{l}][0].shape={tuple(x.shape)} can be restricted only {allowed} time(s) (each level "
                    f"halves H and W and needs H, W >= 2), but level {l} of levels={self.levels} with "
                    f"base_level={self.base_level} needs {depth}; use fewer levels or larger images"
                )
            out.append((x, y))
        return out

    def _levels_of(self, pair: Batch, l: int) -> tuple[list, list]:
        """x and y on grids base+l (and base+l+1 below the coarsest level)."""
        x, y = pair
        lo = self.base_level + l
        depth = lo + (1 if l < self.levels else 0)
        if self.pyramid_fn is not None:
            xs, ys = self.pyramid_fn(x, y, depth, self.restriction)
            return list(xs)[lo:], list(ys)[lo:]
        xs = pyramid(x, depth, self.restriction)[lo:]
        ys = pyramid(y, depth, self.restriction)[lo:] if _is_image(y) else [y] * len(xs)
        return xs, ys

    def loss(self, model: nn.Module, loss_fn: Callable | None = None, batches: Sequence[Batch] = ()) -> torch.Tensor:
        """The scalar whose gradient is ĝ (SPEC §3); call ``backward()`` on it once.

        Args:
            model: any module mapping (N, C, h, w) to a prediction at any resolution.
            loss_fn: ``loss_fn(pred, target) -> scalar``, a per-pixel mean over the batch
                (default ``F.mse_loss``).
            batches: ``levels + 1`` pairs ``(x, y)`` at the finest grid, pair l holding its own
                independent samples (``batch_sizes[l]`` of them, or this rank's share). ``y``
                that is a floating (N, C', H', W') tensor is restricted with ``x``; anything
                else (labels) is passed to ``loss_fn`` unchanged.

        Returns:
            A 0-dim tensor: ``Σ_{l<L} [ℓ_l(B_l) − ℓ_{l+1}(B_l)] + ℓ_L(B_L)``.
        """
        loss_fn = F.mse_loss if loss_fn is None else loss_fn
        batches = self._check_batches(batches)
        L, b = self.levels, self.base_level
        fused, note = self._fusion(model)
        fine_hw = [tuple(x.shape[2:]) for x, _ in batches]

        # grids[j] = [(pair l, sign, x_j, y_j)]: the fine term of pair j and the coarse term of pair j-1.
        grids: list[list] = [[] for _ in range(L + 1)]
        for l, pair in enumerate(batches):
            xs, ys = self._levels_of(pair, l)
            grids[l].append((l, 1.0, xs[0], ys[0]))
            if l < L:
                grids[l + 1].append((l, -1.0, xs[1], ys[1]))

        mlmc = self.allocation == "mlmc"
        grad_var = mlmc and self.variance_source == "gradient" and (
            self.steps < self.warmup_steps or self.steps % self.variance_every == 0)
        sample_losses: dict[tuple[int, float], torch.Tensor] = {}
        outputs: dict[tuple[int, float], tuple] = {}
        cost = StepCost(batch_sizes=[x.shape[0] for x, _ in batches], fused=fused, fusion_note=note)
        device = batches[0][0].device
        total = None
        for j, group in enumerate(grids):
            level = b + j
            lc = LevelCost(level=level, grid_scale=2.0**level)
            with grid_scale(2.0**level), count_flops(self.count_flops, device) as counted:
                same_shape = len({tuple(x.shape[1:]) for _, _, x, _ in group}) == 1
                if fused and len(group) > 1 and same_shape:
                    preds = model(torch.cat([x for _, _, x, _ in group])).split([x.shape[0] for _, _, x, _ in group])
                    lc.forward_calls = 1
                else:
                    preds = [model(x) for _, _, x, _ in group]
                    lc.forward_calls = len(group)
                for (l, sign, x, y), pred in zip(group, preds):
                    if _is_image(y) and isinstance(pred, torch.Tensor) and pred.shape != y.shape:
                        # mse_loss would broadcast and silently compare the wrong pixels.
                        raise ValueError(
                            f"MGE.loss: on level {level} the model output has shape {tuple(pred.shape)} but the "
                            f"restricted target batches[{l}][1] has {tuple(y.shape)}; the model must map every grid to "
                            "the target's grid (use padding='same'-style layers), or give non-image targets"
                        )
                    term = loss_fn(pred, y)
                    total = sign * term if total is None else total + sign * term
                    if grad_var:
                        outputs[(l, sign)] = (pred, y)
                    elif mlmc:
                        sample_losses[(l, sign)] = per_sample_loss(loss_fn, pred, y)
            lc.flops_forward, lc.seconds_forward = counted
            for l, _, x, _ in group:
                lc.samples += x.shape[0]
                lc.pixels += x.shape[0] * x.shape[2] * x.shape[3]
                lc.work_units += work_units(x.shape[0], x.shape[2], x.shape[3], *fine_hw[l])
            if lc.samples:
                self._level_flops_per_sample[j] = lc.flops_forward / lc.samples
            cost.levels.append(lc)

        cost.work_units = sum(lc.work_units for lc in cost.levels)
        cost.flops_forward = sum(lc.flops_forward for lc in cost.levels)
        cost.flops_backward = 2 * cost.flops_forward
        cost.seconds_forward = sum(lc.seconds_forward for lc in cost.levels)
        self.last_cost = cost
        if grad_var:
            self._measure_gradient_variance(model, loss_fn, outputs, device)
        elif mlmc:
            for l in range(self.levels + 1):
                fine = sample_losses[(l, 1.0)]
                self.variance.update(l, fine - sample_losses[(l, -1.0)] if l < self.levels else fine)
        self.steps += 1
        if mlmc:
            self._update_allocation()
        return total

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward(**kwargs)`` with its FLOPs and wall-clock added to ``last_cost``."""
        with count_flops(self.count_flops, loss.device) as counted:
            loss.backward(**kwargs)
        if self.last_cost is not None:
            self.last_cost.seconds_backward = counted[1]
            if self.count_flops:
                self.last_cost.flops_backward, self.last_cost.flops_backward_measured = counted[0], True

    # ------------------------------------------------------------------ mlmc

    def _level_costs(self) -> list[float]:
        if self.cost_measure == "flops" and all(f is not None for f in self._level_flops_per_sample):
            f = self._level_flops_per_sample
            return [f[l] + (f[l + 1] if l < self.levels else 0.0) for l in range(self.levels + 1)]
        return self.level_work()

    def _measure_gradient_variance(self, model: nn.Module, loss_fn: Callable, outputs: dict, device) -> None:
        """V_l = m/2 · ‖∇(Δℓ_A − Δℓ_B)‖² from the two halves A, B (m samples each) of level l's batch."""
        params = [p for p in model.parameters() if p.requires_grad]
        cost = self.last_cost
        with count_flops(self.count_flops, device) as counted:
            for l in range(self.levels + 1):
                pred, y = outputs[(l, 1.0)]
                m = pred.shape[0] // 2
                if m == 0:
                    continue

                def half(key, sl):
                    p, t = outputs[key]
                    return loss_fn(p[sl], t[sl] if isinstance(t, torch.Tensor) and t.shape[:1] == p.shape[:1] else t)

                a, b = slice(0, m), slice(m, 2 * m)
                diff = half((l, 1.0), a) - half((l, 1.0), b)
                if l < self.levels:
                    diff = diff - half((l, -1.0), a) + half((l, -1.0), b)
                grads = torch.autograd.grad(diff, params, retain_graph=True, allow_unused=True)
                sq = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
                self.variance.update_variance(l, m * sq / 2)
        # One backward through each level's graph: about 2/3 of a forward+backward work unit.
        cost.work_units_variance = (2.0 / 3.0) * sum(
            lc.work_units for lc in cost.levels)
        cost.work_units += cost.work_units_variance
        cost.flops_variance, cost.seconds_variance = counted

    def _update_allocation(self) -> None:
        if not self.variance.ready():
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Ranks see different shares; averaging keeps their allocations identical.
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            v = torch.tensor(self.variance.variance, dtype=torch.float64, device=dev)
            dist.all_reduce(v)
            self.variance.variance = (v / dist.get_world_size()).tolist()
        if self.steps < self.warmup_steps:
            return
        costs = self._level_costs()
        # The budget is in work units; a flops cost measure rescales it to FLOPs per step.
        budget = self.budget
        if self.cost_measure == "flops":
            budget = self.budget * sum(costs) / sum(self.level_work())
        self.batch_sizes = mlmc_batch_sizes(
            self.variance.variance, costs, budget, multiple_of=self.multiple_of, minimum=self.min_batch
        )

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Allocation state (plain Python values; safe for ``torch.load(weights_only=True)``)."""
        return {"batch_sizes": list(self.batch_sizes), "steps": self.steps, "variance": self.variance.state_dict(),
                "budget": self.budget}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sizes = list(state["batch_sizes"])
        self.steps = int(state["steps"])
        self.budget = float(state["budget"])
        self.variance.load_state_dict(state["variance"])

    def __repr__(self) -> str:
        extra = f", base_level={self.base_level}" if self.base_level else ""
        return (f"MGE(levels={self.levels}, batch_sizes={self.batch_sizes}, restriction={self.restriction!r}, "
                f"allocation={self.allocation!r}{extra})")
