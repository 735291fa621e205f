"""Multiscale Gradient Estimation: the telescoping multilevel loss.

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

import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from msconv.multilevel.allocation import Allocation, make_allocation
from msconv.multilevel.cost import LevelCost, StepCost, count_flops
from msconv.grid import grid_scale
from msconv.ops.transfer import pyramid
from msconv.reference import RESTRICT_KINDS, max_levels

__all__ = ["MGE", "batch_coupled_modules", "per_sample_loss", "level_work", "step_work"]

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


def level_work(levels: int, base_level: int = 0, dims: int = 2) -> list[float]:
    """Work units of one sample of each level of an estimator over ``base_level .. base_level +
    levels``: its fine evaluation on grid base+l plus, below the coarsest, its coarse one on
    base+l+1, relative to the level-0 grid (a grid l levels down has 2**(-l·dims) of the pixels:
    4**-l for images, 8**-l of the voxels for volumes, ``dims=3``)."""
    b, c = base_level, float(2 ** dims)
    return [c ** -(b + l) + (c ** -(b + l + 1) if l < levels else 0.0) for l in range(levels + 1)]


def step_work(batch_sizes: Sequence[int], base_level: int = 0, dims: int = 2) -> float:
    """Nominal work units of one estimator step with ``batch_sizes`` (finest first)."""
    return sum(n * c for n, c in zip(batch_sizes, level_work(len(batch_sizes) - 1, base_level, dims)))


def _sq_norm(grads) -> float:
    """Σ ‖g‖² over a list of gradients (None: no dependence), in float64."""
    return sum(float(g.double().pow(2).sum()) for g in grads if g is not None)


def _is_image(t) -> bool:
    """A floating batch of images (N, C, H, W) or volumes (N, C, D, H, W)."""
    return isinstance(t, torch.Tensor) and t.dim() in (4, 5) and t.is_floating_point()


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MGE: {name} must be an int >= {minimum}, got {name}={value!r}")
    return value


def _default_multiple_of() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _scalar_loss(term, level: int, pair: int) -> torch.Tensor:
    """``term`` if it is a one-element floating tensor; else a ValueError that says what came back.
    Per-sample or per-pixel losses would broadcast across levels of different batch sizes, or
    fail deep in autograd, and a Python number has no gradient."""
    if isinstance(term, torch.Tensor) and term.numel() == 1 and term.is_floating_point():
        return term.reshape(())
    got = (f"a tensor of shape {tuple(term.shape)} and dtype {term.dtype}" if isinstance(term, torch.Tensor)
           else f"{type(term).__name__} {term!r}"[:120])
    raise ValueError(
        f"MGE.loss: loss_fn(pred, target) must return a scalar tensor, the batch mean of the loss (e.g. "
        f"F.mse_loss(pred, target) with its default reduction='mean'); on level {level} (batches[{pair}]) it "
        f"returned {got}. Reduce it with .mean(), and return the tensor rather than a Python number"
    )


def check_batches(batches, levels: int, base_level: int, data_level: int) -> list[Batch]:
    """``batches`` as a list of ``levels + 1`` checked (x, y) pairs; ValueError saying what is wrong."""
    n = levels + 1
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
                f"MGE.loss: batches[{l}][0] must be a floating (N, C, H, W) (volumes: (N, C, D, H, W)) tensor, got "
                f"{getattr(x, 'shape', type(x).__name__)} {getattr(x, 'dtype', '')}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"MGE.loss: batches[{l}] is empty; every level needs at least one sample")
        if isinstance(y, torch.Tensor) and y.shape[:1] != x.shape[:1]:
            raise ValueError(f"MGE.loss: batches[{l}] has x.shape={tuple(x.shape)} but y.shape={tuple(y.shape)}; "
                             "x and y must hold the same samples")
        depth = base_level + l + (1 if l < levels else 0) - data_level
        allowed = min(max_levels(n, n) for n in x.shape[2:])
        if depth > allowed:
            raise ValueError(
                f"MGE.loss: batches[{l}][0].shape={tuple(x.shape)} can be restricted only {allowed} time(s) (each level "
                f"halves every side and needs sides >= 2), but level {l} of levels={levels} with "
                f"base_level={base_level} needs {depth}; use fewer levels or larger images"
            )
        out.append((x, y))
    return out


def fusion(model: nn.Module, fuse, warned: list) -> tuple[bool, str]:
    """(whether same-resolution evaluations may share one forward call, why not): not with
    ``fuse=False``, nor when the model normalises with batch statistics (``fuse=True`` then
    raises; ``"auto"`` warns once, recorded in ``warned``)."""
    if fuse is False:
        return False, "fuse=False"
    coupled = batch_coupled_modules(model)
    if not coupled:
        return True, ""
    note = (f"the model normalises with batch statistics in {coupled[:3]}{' …' if len(coupled) > 3 else ''} "
            "(BatchNorm in training mode), so evaluations of different levels cannot share a forward call")
    if fuse is True:
        raise ValueError(f"MGE: fuse=True but {note}; pass fuse='auto' (falls back to separate calls) or call model.eval()")
    if not warned:
        warnings.warn(f"MGE: {note}; running each level term in its own forward call", stacklevel=4)
        warned.append(True)
    return False, note


class MGE:
    """Multiscale Gradient Estimation over levels ``base_level .. base_level + levels``.

    Args:
        levels: number L of coarser levels below the finest; ``levels=0`` is the plain loss.
        batch_sizes: N_l for every level, finest first (``levels + 1`` ints), or one int:
            ``fixed`` uses it for every level, ``paper`` multiplies it by 4 per coarser level,
            ``mlmc`` starts from it (as ``fixed``) and sets the budget from it.
        restriction: how inputs and targets reach coarser grids: ``average`` (default),
            ``full_weighting``, ``bilinear``, ``nearest`` (see :func:`msconv.restrict`).
        allocation: the batch-size rule, an :class:`msconv.multilevel.Allocation` (``Fixed()``,
            ``Paper()``, ``MLMC(budget=..., variance=...)``) or its name ``"fixed"``, ``"paper"``,
            ``"mlmc"`` (defaults); the estimator binds its own copy, ``est.allocation``.
        base_level: the level of the estimator's finest grid relative to the grid the data
            arrives on (Full-Multiscale stage k uses ``base_level=k``); every evaluation runs in
            ``msconv.grid_scale(2 ** (base_level + l))``.
        data_level: the level the batches arrive on (0: the finest grid; at most ``base_level``).
            A coarse Full-Multiscale stage can be handed batches drawn directly on its own finest
            grid, so no fine-grid pixels are sampled, corrupted and restricted only to be averaged
            away; work units stay relative to level 0.
        fuse: ``"auto"`` (fuse same-resolution evaluations unless the model has batch-coupled
            layers), ``True`` (fuse; error if it would be wrong) or ``False``.
        count_flops: count FLOPs with ``torch.utils.flop_counter`` (small Python overhead per op).
        multiple_of: batch sizes from ``paper``/``mlmc`` are rounded to multiples of it; default
            the torch.distributed world size (each rank takes an equal share of every level).
        pyramid_fn: ``pyramid_fn(x, y, depth, restriction) -> (xs, ys)``, the pair on grids
            0..depth, for data whose coarse grids are not plain restrictions of the fine pair
            (e.g. ``msconv.tasks.Denoise(noise_restriction="preserve").pyramid_pair``). Level 0
            must be the pair itself, or the estimator is no longer unbiased for it.
        unit_pixels: the pixels of one work unit (one sample of the reference crop on the finest
            grid, e.g. 128 * 128). Default: the level-0 size of the batches given. Set it when
            batches come in other sizes than the reference (small patches, resized crops), so
            their work is counted in the same currency.
        grid_spacing: the spacing, in reference pixels, of the grid the batches' level 0 is on
            (``crop / side`` for crops resized to ``side``); every evaluation runs in
            ``msconv.grid_scale(grid_spacing * 2 ** level)``.

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
        allocation: str | Allocation = "fixed",
        *,
        base_level: int = 0,
        fuse: bool | str = "auto",
        count_flops: bool = True,
        multiple_of: int | None = None,
        pyramid_fn: Callable | None = None,
        data_level: int = 0,
        unit_pixels: int | None = None,
        grid_spacing: float = 1.0,
        dims: int = 2,
    ) -> None:
        self.levels = _check_int(levels, "levels", 0)
        if dims not in (2, 3) or isinstance(dims, bool):
            raise ValueError(f"MGE: dims must be 2 (images) or 3 (volumes), got dims={dims!r}")
        self.dims = dims
        self.base_level = _check_int(base_level, "base_level", 0)
        self.data_level = _check_int(data_level, "data_level", 0)
        self.unit_pixels = None if unit_pixels is None else _check_int(unit_pixels, "unit_pixels", 1)
        if isinstance(grid_spacing, bool) or not isinstance(grid_spacing, (int, float)) or not grid_spacing > 0:
            raise ValueError(f"MGE: grid_spacing must be a number > 0 (reference pixels per pixel of the batches' "
                             f"level-0 grid), got grid_spacing={grid_spacing!r}")
        self.grid_spacing = float(grid_spacing)
        if self.data_level > self.base_level:
            raise ValueError(f"MGE: data_level={data_level} is coarser than base_level={base_level}, the estimator's finest "
                             "grid; the batches must arrive on that grid or a finer one")
        if restriction not in RESTRICT_KINDS:
            raise ValueError(f"MGE: unknown restriction={restriction!r}; use one of {RESTRICT_KINDS}")
        if fuse not in ("auto", True, False):
            raise ValueError(f"MGE: fuse must be 'auto', True or False, got fuse={fuse!r}")
        self.restriction, self.fuse = restriction, fuse
        if pyramid_fn is not None and not callable(pyramid_fn):
            raise TypeError(f"MGE: pyramid_fn must be callable (x, y, depth, restriction) -> (xs, ys), got {pyramid_fn!r}")
        self.pyramid_fn = pyramid_fn
        self.count_flops = count_flops
        self.multiple_of = _check_int(multiple_of if multiple_of is not None else _default_multiple_of(), "multiple_of", 1)
        self.allocation = make_allocation(allocation).bind(self.levels, self.level_work(), self.multiple_of, count_flops)
        self.allocation.dims = self.dims
        self.batch_sizes = self.allocation.initial_sizes(
            list(batch_sizes) if isinstance(batch_sizes, (list, tuple)) else [batch_sizes])
        self.steps = 0
        self.last_cost: StepCost | None = None
        self._level_flops_per_sample: list[float | None] = [None] * (self.levels + 1)
        self._warned_coupled: list = []

    # ------------------------------------------------------------------ configuration

    def level_work(self) -> list[float]:
        """Work units of one sample of each estimator level (fine + coarse evaluation)."""
        return level_work(self.levels, self.base_level, self.dims)

    def step_work(self, batch_sizes: Sequence[int] | None = None) -> float:
        """Nominal work units of a step with these batch sizes (default: the current allocation;
        exact for sizes divisible by 2**levels)."""
        return step_work(self.batch_sizes if batch_sizes is None else batch_sizes, self.base_level, self.dims)

    # ------------------------------------------------------------------ the estimator

    def _levels_of(self, pair: Batch, l: int) -> tuple[list, list]:
        """x and y on grids base+l (and base+l+1 below the coarsest level)."""
        x, y = pair
        lo = self.base_level + l - self.data_level
        depth = lo + (1 if l < self.levels else 0)
        if self.pyramid_fn is not None:
            xs, ys = self.pyramid_fn(x, y, depth, self.restriction)
            return list(xs)[lo:], list(ys)[lo:]
        xs = pyramid(x, depth, self.restriction)[lo:]
        ys = pyramid(y, depth, self.restriction)[lo:] if _is_image(y) else [y] * len(xs)
        return xs, ys

    def loss(self, model: nn.Module, loss_fn: Callable | None = None, batches: Sequence[Batch] = ()) -> torch.Tensor:
        """The scalar whose gradient is ĝ (see the module docstring); call ``backward()`` on it once.

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
        batches = check_batches(batches, self.levels, self.base_level, self.data_level)
        L, b = self.levels, self.base_level
        fused, note = fusion(model, self.fuse, self._warned_coupled)
        fine_hw = [tuple(d * 2**self.data_level for d in x.shape[2:]) for x, _ in batches]

        # grids[j] = [(pair l, sign, x_j, y_j)]: the fine term of pair j and the coarse term of pair j-1.
        grids: list[list] = [[] for _ in range(L + 1)]
        for l, pair in enumerate(batches):
            xs, ys = self._levels_of(pair, l)
            grids[l].append((l, 1.0, xs[0], ys[0]))
            if l < L:
                grids[l + 1].append((l, -1.0, xs[1], ys[1]))

        measure = self.allocation.measurement(self.steps)
        grad_var, loss_var = measure == "gradient", measure == "loss"
        sample_losses: dict[tuple[int, float], torch.Tensor] = {}
        outputs: dict[tuple[int, float], tuple] = {}
        cost = StepCost(batch_sizes=[x.shape[0] for x, _ in batches], fused=fused, fusion_note=note)
        device = batches[0][0].device
        total = None
        for j, group in enumerate(grids):
            level = b + j
            lc = LevelCost(level=level, grid_scale=2.0**level)
            with grid_scale(self.grid_spacing * 2.0**level), count_flops(self.count_flops, device) as counted:
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
                    term = _scalar_loss(loss_fn(pred, y), level, l)
                    total = sign * term if total is None else total + sign * term
                    if grad_var:
                        outputs[(l, sign)] = (pred, y)
                    elif loss_var:
                        sample_losses[(l, sign)] = per_sample_loss(loss_fn, pred, y)
            lc.flops_forward, lc.seconds_forward = counted
            for l, _, x, _ in group:
                lc.samples += x.shape[0]
                lc.pixels += x.shape[0] * x[0, 0].numel()
                unit = self.unit_pixels or math.prod(fine_hw[l])
                lc.work_units += x.shape[0] * x[0, 0].numel() / unit
            if lc.samples:
                self._level_flops_per_sample[j] = lc.flops_forward / lc.samples
            cost.levels.append(lc)

        cost.work_units = sum(lc.work_units for lc in cost.levels)
        cost.flops_forward = sum(lc.flops_forward for lc in cost.levels)
        cost.flops_backward = 2 * cost.flops_forward
        cost.seconds_forward = sum(lc.seconds_forward for lc in cost.levels)
        self.last_cost = cost
        if grad_var:
            measure_gradient_variance(self, model, loss_fn, outputs, device)
        elif loss_var:
            for l in range(self.levels + 1):
                fine = sample_losses[(l, 1.0)]
                self.allocation.observe(l, fine - sample_losses[(l, -1.0)] if l < self.levels else fine)
        self.steps += 1
        sizes = self.allocation.reallocate(self.steps, self._level_costs())
        if sizes is not None:
            self.batch_sizes = sizes
        return total

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """``loss.backward(**kwargs)`` with its FLOPs and wall-clock added to ``last_cost``."""
        with count_flops(self.count_flops, loss.device) as counted:
            loss.backward(**kwargs)
        if self.last_cost is not None:
            self.last_cost.seconds_backward = counted[1]
            if self.count_flops:
                self.last_cost.flops_backward, self.last_cost.flops_backward_measured = counted[0], True

    # ------------------------------------------------------------------ variance measurement

    def _level_costs(self) -> list[float]:
        """Cost of one sample per level in the allocation's cost measure (work units, or FLOPs
        once every level's have been counted)."""
        if getattr(self.allocation, "cost_measure", "work") == "flops" and all(f is not None for f in self._level_flops_per_sample):
            f = self._level_flops_per_sample
            return [f[l] + (f[l + 1] if l < self.levels else 0.0) for l in range(self.levels + 1)]
        return self.level_work()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """Allocation state (plain Python values; safe for ``torch.load(weights_only=True)``)."""
        return {"batch_sizes": list(self.batch_sizes), "steps": self.steps, "allocation": self.allocation.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sizes = list(state["batch_sizes"])
        self.steps = int(state["steps"])
        self.allocation.load_state_dict(state["allocation"])

    def __repr__(self) -> str:
        extra = f", base_level={self.base_level}" if self.base_level else ""
        return (f"MGE(levels={self.levels}, batch_sizes={self.batch_sizes}, restriction={self.restriction!r}, "
                f"allocation={self.allocation!r}{extra})")


def measure_gradient_variance(est: "MGE", model: nn.Module, loss_fn: Callable, outputs: dict, device) -> None:
    """V_l = m/2 · ‖∇(Δℓ_A − Δℓ_B)‖² from the two halves A, B (m samples each) of level l's batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    cost = est.last_cost
    with count_flops(est.count_flops, device) as counted:
        for l in range(est.levels + 1):
            pred, y = outputs[(l, 1.0)]
            m = pred.shape[0] // 2
            if m == 0:
                continue

            def half(key, sl):
                p, t = outputs[key]
                return loss_fn(p[sl], t[sl] if isinstance(t, torch.Tensor) and t.shape[:1] == p.shape[:1] else t)

            a, b = slice(0, m), slice(m, 2 * m)
            diff = half((l, 1.0), a) - half((l, 1.0), b)
            grads = torch.autograd.grad(diff, params, retain_graph=True, allow_unused=True)
            if l == 0:
                # The fine evaluation alone is single-scale's gradient on these samples: its
                # half-batch difference gives single-scale's per-sample variance for free.
                est.allocation.observe_single(m * _sq_norm(grads) / 2)
            if l < est.levels:
                coarse = half((l, -1.0), a) - half((l, -1.0), b)
                coarse_grads = torch.autograd.grad(coarse, params, retain_graph=True, allow_unused=True)
                grads = [g if c is None else (-c if g is None else g - c) for g, c in zip(grads, coarse_grads)]
            est.allocation.observe(l, m * _sq_norm(grads) / 2)
    # One backward through each level's graph: about 2/3 of a forward+backward work unit.
    cost.work_units_variance = (2.0 / 3.0) * sum(
        lc.work_units for lc in cost.levels)
    cost.work_units += cost.work_units_variance
    cost.flops_variance, cost.seconds_variance = counted
