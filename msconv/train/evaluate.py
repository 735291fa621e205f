"""Validation and test of a training run: fixed corrupted pairs, PSNR/SSIM at the fine grid, and
the validation loss on a coarse grid (the adaptive stage-end signal)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msconv.data import ImageSet
from msconv.grid import grid_scale
from msconv.tasks import Task
from msconv.train.config import ConfigError
from msconv.train.metrics import SSIM_MIN_SIDE, psnr_ssim

__all__ = ["Evaluator", "centre_crop", "val_threshold", "VAL_SPAN"]

# Validation points span work units from the planned work / VAL_SPAN to the planned work.
VAL_SPAN = 256.0


def centre_crop(im: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    """The centre ``side × side`` of a (C, H, W) image (0: whole), each side a multiple of ``multiple``;
    of a (C, D, H, W) volume the centre ``side``³."""
    index = [slice(None)]
    for n in im.shape[1:]:
        t = min(n, side) if side else n
        t -= t % multiple
        index.append(slice((n - t) // 2, (n - t) // 2 + t))
    return im[tuple(index)]


def val_threshold(j: int, points: int, planned_work: float) -> float:
    """Work units at which validation point ``j`` falls: 0 (the start), then ``points`` points
    log-spaced from ``planned_work / VAL_SPAN`` to ``planned_work``. Log-spaced, and the same in
    every mode of a comparison, because savings are ratios: a mode that reaches a quality with 16x
    less work must have validation points that early."""
    if j == 0:
        return 0.0
    if points == 1:
        return planned_work
    return planned_work * VAL_SPAN ** (-(points - j) / (points - 1))


class Evaluator:
    """Validation of ``model`` on ``images`` centre-cropped to ``side`` and corrupted once by
    ``task`` from ``seed`` (every mode of a comparison is judged on the same inputs)."""

    def __init__(self, task: Task, model: torch.nn.Module, device: torch.device, images: ImageSet, side: int, seed: int,
                 restriction: str, option: str = "validation data") -> None:
        self.task, self.model, self.device, self.restriction = task, model, device, restriction
        self.pairs = self.corrupted_pairs(images, side, seed, option)

    def corrupted_pairs(self, images: ImageSet, side: int, seed: int, option: str) -> list:
        """(x, y) per image, centre-cropped to ``side`` (0: whole), corrupted once from ``seed``.
        :class:`ConfigError` naming the file and ``option`` when an image is too small to be scored."""
        g = torch.Generator().manual_seed(seed)
        pairs = []
        for im, name in zip(images.images, images.names):
            y = centre_crop(im, side, self.task.size_multiple).unsqueeze(0)
            if min(y.shape[2:]) < SSIM_MIN_SIDE:
                raise ConfigError(
                    f"{option}: image {name!r} is {tuple(im.shape[1:])} pixels, {tuple(y.shape[2:])} after cropping to "
                    f"a multiple of {self.task.size_multiple}; scoring (SSIM) needs at least {SSIM_MIN_SIDE} on every "
                    f"side. Remove it from {option}"
                    + (", or give --val-crop 0 or a larger one" if side and side < SSIM_MIN_SIDE else ""))
            x, y = self.task.corrupt(y, g)
            pairs.append((x.to(self.device), y.to(self.device)))
        return pairs

    def validate(self, pairs=None) -> tuple[float, float]:
        """Mean PSNR/SSIM of the model's outputs on ``pairs`` (default: the validation pairs)."""
        self.model.eval()
        ps, ss = [], []
        with torch.no_grad(), grid_scale(1.0):
            for x, y in (self.pairs if pairs is None else pairs):
                p, s = psnr_ssim(self.model(x)[0], y[0])
                ps.append(p)
                ss.append(s)
        self.model.train()
        return sum(ps) / len(ps), sum(ss) / len(ss)

    def sample(self, side: int = 128) -> torch.Tensor:
        """The first validation image as input | restored | clean side by side, (C, h, 3w) in [0, 1],
        each at most ``side`` pixels square (for TensorBoard); of a volume, its middle slice."""
        x, y = self.pairs[0]
        self.model.eval()
        with torch.no_grad(), grid_scale(1.0):
            pred = self.model(x).clamp(0, 1)
        self.model.train()
        seen = self.task.input_for_metrics(x).clamp(0, 1)
        if seen.shape[2:] != y.shape[2:]:  # a low-resolution input, shown at the target's size
            seen = F.interpolate(seen, size=y.shape[2:], mode="nearest")
        if y.dim() == 5:
            seen, pred, y = (t[:, :, t.shape[2] // 2] for t in (seen, pred, y))
        h, w = min(side, y.shape[2]), min(side, y.shape[3])
        return torch.cat([t[0, :, :h, :w] for t in (seen, pred, y)], dim=2).cpu()

    def loss_on_grid(self, level: int) -> float:
        """Validation MSE on grid ``level`` (the adaptive stage-end rule's signal)."""
        self.model.eval()
        total = 0.0
        with torch.no_grad(), grid_scale(2.0 ** level):
            for x, y in self.pairs:
                xs, ys = self.task.restrict_pair(x, y, level, self.restriction)
                total += float(F.mse_loss(self.model(xs), ys))
        self.model.train()
        return total / len(self.pairs)

    def test_pairs(self, folder: str, gray: bool, on_bad: str, seed: int, max_megapixels: float) -> list:
        """The corrupted full-size pairs of the images (or volumes) in ``folder`` (``--test-data``), for :meth:`validate`."""
        from msconv.data import load_folder
        from msconv.data.volumes import is_volume_data, load_volume_folder

        ds = (load_volume_folder(folder, on_bad) if is_volume_data(folder)
              else load_folder(folder, gray, on_bad, max_megapixels=max_megapixels))
        return self.corrupted_pairs(ds, 0, seed, "--test-data")
