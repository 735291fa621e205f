"""What a training run has done so far: counters, validation record, FLOP cache — one dataclass
with its own state dict (the flat keys training checkpoints have always carried)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from msconv.train.evaluate import val_threshold

__all__ = ["RunState"]


def _count(ck: dict, key: str) -> int:
    """``ck[key]`` as a count >= 0; ValueError naming the key otherwise."""
    v = ck[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v != int(v):
        raise ValueError(f"{key!r} must be a count >= 0, got {v!r}")
    return int(v)


@dataclass
class RunState:
    """Steps taken, fine-equivalent work units, FLOPs and training wall-clock spent, skipped steps,
    the validation records (and the index of the next validation point), the FLOPs of each distinct
    step shape, and whether the run finished. Work, FLOPs and wall-clock count training steps only."""

    step: int = 0
    work_units: float = 0.0
    flops: int = 0
    wall_clock_s: float = 0.0
    skipped_total: int = 0
    consecutive_skips: int = 0
    val_history: list = field(default_factory=list)
    next_val: int = 0
    flops_cache: dict = field(default_factory=dict)
    finished: bool = False

    def count_step(self, work_units: float, seconds: float, shape_key: str, flops: int | None, world: int) -> None:
        """One more step: its work (all processes), seconds, and the FLOPs of its shape (counted on
        the first step of each distinct shape, ``flops``; None on the others)."""
        self.step += 1
        self.wall_clock_s += seconds
        if flops is not None:
            self.flops_cache[shape_key] = flops
        self.work_units += work_units
        self.flops += self.flops_cache.get(shape_key, 0) * world

    def validation_due(self, points: int, planned_work: float) -> bool:
        """Whether the work spent has reached the next of ``points`` validation points."""
        return (self.next_val <= points
                and self.work_units >= val_threshold(self.next_val, points, planned_work) - 1e-9)

    def record_validation(self, psnr: float, ssim: float, points: int, planned_work: float) -> dict:
        """Append a validation record at the current position (past every point it covers)."""
        while self.validation_due(points, planned_work):
            self.next_val += 1
        rec = {"step": self.step, "work_units": self.work_units, "flops": self.flops,
               "wall_clock_s": self.wall_clock_s, "psnr": psnr, "ssim": ssim}
        self.val_history.append(rec)
        return rec

    def state_dict(self) -> dict:
        return {"step": self.step, "work_units": self.work_units, "flops": self.flops, "wall_clock_s": self.wall_clock_s,
                "skipped_total": self.skipped_total, "consecutive_skips": self.consecutive_skips,
                "val_history": list(self.val_history), "next_val": self.next_val, "flops_cache": dict(self.flops_cache),
                "finished": self.finished}

    def load_state_dict(self, ck: dict) -> None:
        """From :meth:`state_dict` (or a whole checkpoint, which holds these keys); KeyError or
        ValueError naming the key when one is missing or is not a count."""
        self.step, self.work_units, self.flops = _count(ck, "step"), float(ck["work_units"]), _count(ck, "flops")
        self.wall_clock_s, self.skipped_total = float(ck["wall_clock_s"]), _count(ck, "skipped_total")
        self.consecutive_skips, self.val_history = _count(ck, "consecutive_skips"), list(ck["val_history"])
        self.next_val, self.flops_cache = _count(ck, "next_val"), dict(ck["flops_cache"])
        self.finished = bool(ck["finished"])
