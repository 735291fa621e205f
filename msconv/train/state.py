"""What a training run has done so far: counters, validation record, FLOP cache — one dataclass
with its own state dict (the flat keys training checkpoints have always carried)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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
