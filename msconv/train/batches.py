"""The training batches of a run: random crops, shaped as the stage being drawn for says (small
patches, resized crops, coarse grids), corrupted by the task from the run's own generator, on the
device, and this process's share under torchrun."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msconv.data import CropSampler
from msconv.multilevel.schedule import Stage
from msconv.tasks import Task
from msconv.train.execution import Execution

__all__ = ["BatchDrawer"]


class BatchDrawer:
    """``draw(sizes, level, stage)``: one fresh corrupted batch per estimator level, ``[(x_l, y_l)]``
    with ``sizes[l]`` samples (the global batch), on grid ``level``."""

    def __init__(self, sampler: CropSampler, task: Task, generator: torch.Generator, restriction: str,
                 execution: Execution) -> None:
        self.sampler, self.task, self.generator, self.restriction, self.ex = sampler, task, generator, restriction, execution

    def draw(self, sizes, level: int = 0, stage: Stage | None = None) -> list:
        """Crops of ``stage.crop`` pixels (default: the sampler's), resized to ``stage.resize``
        with nearest-neighbour sampling as Composer's progressive resizing does, then corrupted
        on grid ``level``."""
        crop, resize = (stage.crop, stage.resize) if stage is not None else (None, None)
        ex, out = self.ex, []
        for n in sizes:
            clean = self.sampler.next_batch(n, crop)
            if resize is not None:
                clean = F.interpolate(clean, size=(resize,) * (clean.dim() - 2), mode="nearest")
            # Corruption runs on the CPU generator (reproducible on any device), then moves.
            x, y = self.task.corrupt_on_grid(clean, self.generator, level, self.restriction)
            out.append(tuple(t.to(ex.device, non_blocking=True, memory_format=ex.memory_format) for t in (x, y)))
        if ex.world > 1:
            from msconv.multilevel.distributed import shard_batches

            out = shard_batches(out, ex.rank, ex.world)  # every rank draws the global batch, trains on its share
        return out
