"""Cost accounting for one multilevel step : work units, FLOPs and wall-clock.

Units
-----
* **work units** — fine-equivalent forward+backward passes of one sample: an evaluation of
  ``n`` samples on a grid of ``h × w`` pixels costs ``n · h·w / (H·W)``, where ``H × W`` is the
  finest grid the data arrives on (level 0, also during a coarse Full-Multiscale stage, so that
  every schedule is measured in the same currency as single-scale training). One single-scale
  step with batch N costs exactly N work units. For a fully convolutional model, work is
  proportional to pixels, so this is the paper's "number of fine convolutions".
* **FLOPs** — counted by ``torch.utils.flop_counter.FlopCounterMode`` around every forward
  evaluation. Backward FLOPs are *measured* when the backward runs through
  :meth:`MGE.backward`; after a plain ``loss.backward()`` they are estimated as twice the
  forward FLOPs (the usual convolution rule: one pass for the input gradient, one for the
  weight gradient) and ``flops_backward_measured`` is False.
* **seconds** — wall-clock of the forward evaluations (``time.perf_counter``; on CUDA the
  device is synchronised at the boundaries so the figure is real) and, through
  :meth:`MGE.backward`, of the backward.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["LevelCost", "StepCost", "count_flops", "work_units"]


def work_units(samples: int, h: int, w: int, fine_h: int, fine_w: int) -> float:
    """Fine-equivalent forward+backward passes: ``samples · h·w / (fine_h·fine_w)``."""
    return samples * (h * w) / (fine_h * fine_w)


@dataclass
class LevelCost:
    """The evaluations that ran on one grid during a step.

    ``level`` is the absolute level (0 = the finest grid the data arrives on), ``grid_scale``
    is ``2**level``. ``samples`` counts every sample evaluated on this grid (the fine term of
    one estimator level plus the coarse term of the next finer one).
    """

    level: int
    grid_scale: float
    samples: int = 0
    pixels: int = 0
    work_units: float = 0.0
    flops_forward: int = 0
    seconds_forward: float = 0.0
    forward_calls: int = 0


@dataclass
class StepCost:
    """Everything one :meth:`MGE.loss` call (and optionally its backward) cost.

    ``levels`` holds one :class:`LevelCost` per grid, finest first. ``batch_sizes`` are the
    sample counts of the pairs actually given, ``fused`` says whether same-resolution
    evaluations shared one forward call (``fusion_note`` says why not when they did not).
    """

    work_units: float = 0.0
    flops_forward: int = 0
    flops_backward: int = 0
    flops_backward_measured: bool = False
    seconds_forward: float = 0.0
    seconds_backward: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    fused: bool = False
    fusion_note: str = ""
    work_units_variance: float = 0.0
    flops_variance: int = 0
    seconds_variance: float = 0.0
    levels: list[LevelCost] = field(default_factory=list)

    @property
    def flops(self) -> int:
        """Forward + backward (+ mlmc variance measurement) FLOPs; backward estimated unless
        ``flops_backward_measured``."""
        return self.flops_forward + self.flops_backward + self.flops_variance

    @property
    def seconds(self) -> float:
        return self.seconds_forward + self.seconds_backward + self.seconds_variance

    def as_dict(self) -> dict:
        """Flat figures for logs and CSV rows (per-level work as ``work_units_l<k>``)."""
        out = {
            "work_units": self.work_units,
            "flops": self.flops,
            "flops_forward": self.flops_forward,
            "flops_backward": self.flops_backward,
            "flops_backward_measured": self.flops_backward_measured,
            "seconds": self.seconds,
            "seconds_forward": self.seconds_forward,
            "seconds_backward": self.seconds_backward,
            "batch_sizes": list(self.batch_sizes),
            "fused": self.fused,
            "work_units_variance": self.work_units_variance,
        }
        for lc in self.levels:
            out[f"work_units_l{lc.level}"] = lc.work_units
            out[f"flops_forward_l{lc.level}"] = lc.flops_forward
        return out


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def count_flops(enabled: bool, device: torch.device | None = None):
    """Yield a one-element list that holds, on exit, (FLOPs, seconds) of the enclosed code."""
    result = [0, 0.0]
    mode = FlopCounterMode(display=False) if enabled else contextlib.nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    with mode:
        yield result
    _sync(device)
    result[1] = time.perf_counter() - t0
    if enabled:
        result[0] = int(mode.get_total_flops())
