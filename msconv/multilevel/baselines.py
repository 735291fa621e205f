"""The single-scale schedules a practitioner would run instead of multiscale training, as stage plans.

Each function returns a list of single-level :class:`Stage` s (``levels=0``) that spends a budget
of fine-equivalent work units (one work unit = one sample of the reference crop, ``crop × crop``
pixels, forward and backward), so it runs through the same loop, data, corruption, model,
optimizer and validation as single-scale, MGE and Full-Multiscale, and is compared at equal work:

* :func:`plan_small_patches` — plain single-scale training on small patches: a patch of side
  ``p`` costs ``(p / crop)**2`` work units, so the same budget buys ``(crop / p)**2`` times more
  samples (the DnCNN protocol trains on 40² patches);
* :func:`plan_progressive_resizing` — Composer's ``ProgressiveResizing`` schedule (fastai's
  progressive resizing): crops shrunk by ``initial_scale`` for the first ``delay`` of the steps,
  growing linearly to full size, full size for the last ``finetune`` of the steps, the side
  pinned to a multiple of ``increment`` pixels; crops are resized with nearest-neighbour
  sampling as Composer's ``resize_batch`` does, and the task's corruption is applied at the
  resized size (inputs and targets both resized);
* :func:`plan_progressive_patches` — Restormer's progressive patch sizes: patch sides in the
  proportions 128:160:192:256:320:384 of the final crop, each phase's batch holding the same
  pixels as the final one, and the phases' step counts in Restormer's proportions
  92k:64k:48k:36k:36k:24k.

Step counts are chosen so the plan's nominal work is the budget (to within one step's work).
"""
from __future__ import annotations

import copy
import math
import torch
import torch.nn as nn

from msconv.multilevel.schedule import Stage

__all__ = ["BASELINES", "plan_small_patches", "plan_progressive_resizing", "plan_progressive_patches",
           "progressive_resizing_side", "receptive_field", "RESTORMER_PATCHES", "RESTORMER_ITERATIONS"]

BASELINES = ("small", "progressive", "patches")
# Restormer (Zamir et al., CVPR 2022), progressive learning: patch sides and iterations per phase.
RESTORMER_PATCHES = (128, 160, 192, 256, 320, 384)
RESTORMER_ITERATIONS = (92_000, 64_000, 48_000, 36_000, 36_000, 24_000)


def _check_side(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _round_to(v: float, multiple: int) -> int:
    return max(multiple, int(round(v / multiple)) * multiple)


def _check_budget(budget) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite number > 0 work units, got {budget!r}")
    return float(budget)


def _stage(side: int, crop: int, batch: int, iterations: int, resize: int | None = None, dims: int = 2) -> Stage:
    seen = resize if resize is not None else side
    return Stage(0, 0, [batch], iterations, crop=side, resize=resize, area=(seen / crop) ** dims, dims=dims)


def _indexed(stages: list[Stage]) -> list[Stage]:
    for i, s in enumerate(stages):
        s.index = i
    return stages


def plan_small_patches(crop: int, patch: int, batch: int, budget: float, dims: int = 2) -> list[Stage]:
    """One stage of ``patch × patch`` crops, ``batch`` per step, as many steps as ``budget`` buys
    (``budget / (batch * (patch / crop)**2)``, at least one; volumes, ``dims=3``: ``**3``)."""
    _check_side("crop", crop)
    _check_side("patch", patch)
    _check_side("batch", batch)
    budget = _check_budget(budget)
    if patch > crop:
        raise ValueError(f"small patches: patch={patch} is larger than the reference crop={crop}; use patch <= crop")
    work = batch * (patch / crop) ** dims
    return _indexed([_stage(patch, crop, batch, max(1, round(budget / work)), dims=dims)])


def progressive_resizing_side(progress: float, crop: int, initial_scale: float = 0.5, delay: float = 0.5,
                              finetune: float = 0.2, increment: int = 4) -> int:
    """The side Composer's ``ProgressiveResizing`` gives a ``crop``-sided batch at ``progress``
    (elapsed fraction of training, 0..1): ``initial_scale`` until ``delay``, then linear to 1 at
    ``1 - finetune``, pinned to a multiple of ``increment`` (at least ``increment``, at most ``crop``)."""
    if progress >= delay:
        span = 1.0 - finetune - delay
        frac = min((progress - delay) / span, 1.0) if span > 0 else 1.0
    else:
        frac = 0.0
    scale = initial_scale + (1.0 - initial_scale) * frac
    return min(crop, max(increment, round(crop * scale / increment) * increment))


def plan_progressive_resizing(crop: int, batch: int, budget: float, initial_scale: float = 0.5, delay: float = 0.5,
                              finetune: float = 0.2, increment: int = 4, dims: int = 2) -> list[Stage]:
    """Composer's progressive-resizing schedule (defaults: Composer's) as stages of constant side,
    with the total step count chosen so the plan spends ``budget`` work units (a step at side
    ``s`` costs ``batch * (s / crop)**dims``)."""
    _check_side("crop", crop)
    _check_side("batch", batch)
    _check_side("increment", increment)
    budget = _check_budget(budget)
    if not 0 < initial_scale <= 1:
        raise ValueError(f"progressive resizing: initial_scale must be in (0, 1], got {initial_scale!r}")
    if not (0 <= delay and 0 <= finetune and delay + finetune <= 1):
        raise ValueError(f"progressive resizing: need delay >= 0, finetune >= 0 and delay + finetune <= 1, got "
                         f"delay={delay!r}, finetune={finetune!r}")

    def sides(total: int) -> list[int]:
        return [progressive_resizing_side(t / total, crop, initial_scale, delay, finetune, increment) for t in range(total)]

    def work(total: int) -> float:
        return sum(batch * (s / crop) ** dims for s in sides(total))

    # Work grows with the step count by about one step's work per step: start from the mean
    # cost per step of a finely resolved schedule, then take the nearest count.
    probe = 1000
    per_step = work(probe) / probe
    guess = max(1, round(budget / per_step))
    total = min(range(max(1, guess - 3), guess + 4), key=lambda t: abs(work(t) - budget))
    stages: list[Stage] = []
    for s in sides(total):
        resize = None if s == crop else s
        if stages and stages[-1].resize == resize:
            stages[-1].iterations += 1
        else:
            stages.append(_stage(crop, crop, batch, 1, resize, dims))
    return _indexed(stages)


def plan_progressive_patches(crop: int, batch: int, budget: float, multiple: int = 8, dims: int = 2) -> list[Stage]:
    """Restormer's progressive patch sizes scaled to a final ``crop`` and ``batch``: phase i uses
    patches of side ``crop * RESTORMER_PATCHES[i] / 384`` (rounded to ``multiple``) with the batch
    that holds ``batch`` final crops' pixels (voxels, ``dims=3``), and spends
    ``RESTORMER_ITERATIONS[i] / 300k`` of ``budget``."""
    _check_side("crop", crop)
    _check_side("batch", batch)
    budget = _check_budget(budget)
    total_its = sum(RESTORMER_ITERATIONS)
    stages = []
    for p, its in zip(RESTORMER_PATCHES, RESTORMER_ITERATIONS):
        side = min(crop, _round_to(crop * p / RESTORMER_PATCHES[-1], multiple))
        n = max(1, round(batch * (crop / side) ** dims))
        per_step = n * (side / crop) ** dims
        steps = max(1, round(budget * its / total_its / per_step))
        if stages and stages[-1].crop == side:
            stages[-1].iterations += steps
        else:
            stages.append(_stage(side, crop, n, steps, dims=dims))
    return _indexed(stages)


def receptive_field(model: nn.Module, in_channels: int, probe: int | None = None, dims: int = 2) -> int:
    """The side of the input region that reaches one output pixel, measured: the extent of the
    gradient of a centre output pixel with respect to a random ``probe × probe`` input (capped at
    ``probe``), on a copy of the model with random weights (a zero-initialised head, as residual
    denoisers have, would hide every path but the skip connection). ``model`` is not touched.
    ``dims=3``: a volume model, probed with a ``probe``³ input (the widest axis's extent). Default probe: 96
    pixels or 64 voxels, doubled while the field fills it (up to 384 pixels, 128 voxels)."""
    if probe is None:
        probe, cap = (96, 384) if dims == 2 else (64, 128)
        while True:
            extent = receptive_field(model, in_channels, probe, dims)
            if extent < probe or probe >= cap:
                return extent
            probe *= 2
    extent = _gradient_extent(model, in_channels, probe, dims, positive=False)
    if extent == 1 and any(p.numel() > 1 for p in model.parameters()):
        # Every ReLU on the paths to the centre pixel was off for this draw (likely in narrow models): all
        # weights positive on a positive input keep every unit on, so the extent is the paths' own.
        extent = _gradient_extent(model, in_channels, probe, dims, positive=True)
    return extent


def _gradient_extent(model: nn.Module, in_channels: int, probe: int, dims: int, positive: bool) -> int:
    probe_model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(0)
    p = next(probe_model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for q in probe_model.parameters():
            w = torch.randn(q.shape, generator=g)
            q.copy_((w.abs() if positive else w).to(q.device, q.dtype))
    x = torch.rand(1, in_channels, *(probe,) * dims, generator=g).to(device, dtype).requires_grad_(True)
    out = probe_model(x)
    out[(...,) + tuple(n // 2 for n in out.shape[2:])].sum().backward()
    mag = x.grad.abs().sum(dim=(0, 1))
    extents = []
    for axis in range(dims):
        hit = mag.sum(dim=tuple(a for a in range(dims) if a != axis)).nonzero().flatten()
        if hit.numel() == 0:
            return 1
        extents.append(int(hit.max() - hit.min()))
    return max(extents) + 1
