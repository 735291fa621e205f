"""Use what was trained: load a run folder without its training data, and restore photos of any size.

>>> run = msconv.load_run("runs/compare/fmg")            # the model (eval mode), its task and options
>>> y = run.restore(x)                                    # x: (N, C, H, W) degraded images in [0, 1]

A run folder holds ``config.json`` (the options and the resolved architecture) and ``model.pt``
(the weights): both are all it takes. Large images are restored in overlapping tiles, so memory
stays bounded by the tile size; every tile sees at least the model's receptive field around the
pixels it keeps, so tiling does not change the result of a purely convolutional model.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msconv.grid import grid_scale as grid_scale_context

__all__ = ["LoadedRun", "load_run", "restore_tiled", "export_run", "RunFolderError", "EXPORT_FORMATS"]

# Default tile side: pixels of an image, voxels of a volume (a 96³ tile of a 16-channel 3-D model holds
# 57 MB per activation, as a 512² tile of a 64-channel 2-D one does 67 MB).
DEFAULT_TILE = {2: 512, 3: 96}

# Tile origins and halos are multiples of this, so the pooling cells of a UNet (up to 4 poolings) fall on
# the same pixels in a tile as in the whole image.
TILE_ALIGN = 16


class RunFolderError(ValueError):
    """A path that is not a finished training run (no config.json or model.pt); the message says which."""


@dataclass
class LoadedRun:
    """A trained model ready to restore images: ``model`` (eval mode, on ``device``), its ``task``, the
    run's options (``config``, a :class:`msconv.train.TrainConfig`), the channels the model sees per image
    (``channels``: 1 for a grayscale run), its output/input size ratio (``upscale``) and ``dims`` (2 for an
    image model, 3 for a volume model)."""

    model: torch.nn.Module
    task: object
    config: object
    channels: int
    upscale: int
    device: torch.device
    halo: int
    model_input_channels: int = 1
    dims: int = 2

    def model_input(self, observed: torch.Tensor) -> torch.Tensor:
        """The model's input for degraded images as a camera (scanner) gives them, (N, channels, h, w) or
        (N, channels, d, h, w): the image itself (denoise, deblur, rician), for super-resolution the
        low-resolution image, bicubic-upsampled first when the model expects that, and for slice
        super-resolution the thick-slice scan resampled to thin slices."""
        task = self.task
        if task.name == "inpaint":
            raise ValueError("restore: an inpainting model needs the mask of the missing pixels, which a photo does not "
                             "carry; restore with degrade=True (the task draws masks), or feed "
                             "torch.cat([image * mask, mask], 1) to run.model yourself")
        if task.name == "sr" and task.pre_upsample:
            return F.interpolate(observed, scale_factor=task.scale, mode="bicubic", align_corners=False)
        if task.name == "slice_sr":  # a thick-slice scan: resampled to thin slices along D, as in training
            d, h, w = observed.shape[2:]
            return F.interpolate(observed, size=(d * task.scale, h, w), mode="trilinear", align_corners=False)
        return observed

    def restore(self, observed: torch.Tensor, tile: int | None = None, grid_scale: float = 1.0) -> torch.Tensor:
        """Restored images (N, C, H', W') from degraded ones (N, C, h, w) in [0, 1], clipped to [0, 1]
        (a volume model: (N, C, D, H, W) volumes, ``tile`` voxels a side).
        ``C`` may differ from the model's channels: a grayscale model restores each colour channel
        on its own; a colour model gets a gray image as three equal channels (and returns their mean)."""
        tile = DEFAULT_TILE[self.dims] if tile is None else tile
        if observed.dim() != self.dims + 2:
            want = "(N, C, H, W)" if self.dims == 2 else "(N, C, D, H, W) volumes"
            raise ValueError(f"restore: observed must be {want} for this run's model, got shape {tuple(observed.shape)}")
        n, c = observed.shape[:2]
        x = observed.to(self.device, torch.float32)
        if c != self.channels:
            if self.channels == 1:
                x = x.reshape(n * c, 1, *x.shape[2:])
            elif c == 1:
                x = x.expand(n, self.channels, *x.shape[2:])
            else:
                raise ValueError(f"restore: the model takes {self.channels} channels, the images have {c}")
        out = restore_tiled(self.model, self.model_input(x), tile, self.halo, self.upscale, grid_scale)
        if c != self.channels:
            out = out.reshape(n, c, *out.shape[2:]) if self.channels == 1 else out.mean(1, keepdim=True)
        return out.clamp(0, 1)


def restore_tiled(model: torch.nn.Module, x: torch.Tensor, tile: int, halo: int, upscale: int = 1,
                  grid_scale: float = 1.0) -> torch.Tensor:
    """``model(x)`` computed tile by tile: each ``tile × tile`` block of the input (``tile``³ of a volume)
    is run with ``halo`` more pixels of context on every side (cut off at the edges), and only its own
    block of the output is kept (a sliding window: memory is bounded by the tile, not the input).
    x: (N, C, H, W) or (N, C, D, H, W); the output is (N, C_out, upscale·H, upscale·W) (every axis ×upscale)."""
    if not (isinstance(tile, int) and tile >= TILE_ALIGN):
        raise ValueError(f"restore: tile must be an int >= {TILE_ALIGN} pixels, got {tile!r}")
    tile = tile // TILE_ALIGN * TILE_ALIGN
    halo = -(-halo // TILE_ALIGN) * TILE_ALIGN
    size = x.shape[2:]
    out = None
    with torch.no_grad(), grid_scale_context(grid_scale):
        for start in itertools.product(*(range(0, n, tile) for n in size)):
            lo = [max(0, s - halo) for s in start]
            hi = [min(n, s + tile + halo) for s, n in zip(start, size)]
            y = model(x[(slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(lo, hi))])
            if out is None:
                out = y.new_empty(x.shape[0], y.shape[1], *(n * upscale for n in size))
            keep = [min(tile, n - s) for s, n in zip(start, size)]
            dst = tuple(slice(s * upscale, (s + k) * upscale) for s, k in zip(start, keep))
            src = tuple(slice((s - a) * upscale, (s - a + k) * upscale) for s, a, k in zip(start, lo, keep))
            out[(slice(None), slice(None)) + dst] = y[(slice(None), slice(None)) + src]
    return out


def _run_files(path: str) -> tuple[str, str]:
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    config, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.pt")
    if not os.path.isdir(folder):
        raise RunFolderError(f"run: {path!r} is not a run folder (or a model.pt in one)")
    if not os.path.isfile(config):
        raise RunFolderError(f"run: {folder!r} has no config.json, so it is not an msconv run folder (msconv train "
                             "writes one into --out)")
    if not os.path.isfile(weights):
        raise RunFolderError(f"run: {folder!r} has no model.pt: the run has not finished. Finish it with "
                             f"`msconv train --resume --out {folder}`")
    return config, weights


def load_run(path: str, device: str | torch.device = "cpu") -> LoadedRun:
    """The trained model of a run folder (or of ``path/model.pt``), rebuilt from the folder alone: its
    training data need not exist any more. The model is in eval mode on ``device``."""
    from msconv.models import build_model
    from msconv.multilevel.baselines import receptive_field
    from msconv.tasks import build_task
    from msconv.train.config import RUN_RECORD_KEYS, TrainConfig, options_before
    from msconv.train.run import architecture, task_options

    config_path, weights = _run_files(path)
    with open(config_path) as fh:
        recorded = json.load(fh)
    options = {k: v for k, v in recorded.items() if k not in RUN_RECORD_KEYS}
    options.update(options_before(options))
    # Where the data came from does not matter for using the model (and may be gone).
    options.update(data="bundled", val_data=None, test_data=None, resume=False, max_steps=None, overwrite=False)
    cfg = TrainConfig.from_dict(options, source=config_path)
    channels = 1 if cfg.gray else 3
    arch = recorded.get("architecture") or architecture(cfg, channels)  # runs recorded before the architecture was
    model = build_model(**arch)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RunFolderError(f"run: {weights!r} does not fit the model {config_path!r} describes ({e}); the files "
                             "belong to different runs") from None
    device = torch.device(device)
    model.to(device).eval()
    task = build_task(cfg.task, **task_options(cfg))
    dims = arch.get("dims", 2)
    halo = math.ceil(receptive_field(model, arch["in_channels"], dims=dims) / 2)
    return LoadedRun(model, task, cfg, channels, arch["upscale"], device, halo, arch["in_channels"], dims)


EXPORT_FORMATS = ("onnx", "torchscript", "pt2")


def export_run(path: str, fmt: str, out: str | None = None, grid_scale: float = 1.0, side: int = 64) -> str:
    """Write the model of run folder ``path`` as a file that runs without msconv: ``onnx`` (any input
    height and width), ``torchscript`` (``torch.jit.load``) or ``pt2`` (``torch.export``; loads with
    ``torch.export.load``). Mesh-free layers are first lowered to the exact ``nn.Conv2d`` of grid
    ``grid_scale`` (:func:`msconv.nn.bake`). Returns the file written (default ``path/model.<ext>``)."""
    from msconv.nn import bake

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export: --format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    run = load_run(path)
    model = bake(run.model, grid_scale).eval()
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    out = out or os.path.join(folder, "model." + {"onnx": "onnx", "torchscript": "ts.pt", "pt2": "pt2"}[fmt])
    spatial = (side, side + 8) if run.dims == 2 else (side // 2, side // 2 + 8, side // 2 + 4)
    example = torch.rand(2, run.model_input_channels, *spatial)
    names = ("height", "width") if run.dims == 2 else ("depth", "height", "width")
    if fmt == "onnx":
        axes = {0: "batch", **{2 + i: n for i, n in enumerate(names)}}
        torch.onnx.export(model, (example,), out, dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": axes, "output": axes})
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, example), out)
    else:
        Dim = torch.export.Dim
        shapes = {0: Dim("batch", min=1, max=4096), **{2 + i: Dim(n, min=16, max=16384) for i, n in enumerate(names)}}
        program = torch.export.export(model, (example,), dynamic_shapes=(shapes,))
        torch.export.save(program, out)
    return out
