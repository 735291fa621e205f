"""``msconv apply``: restore a file or a folder of photos with a trained run, writing images of the
same bit depth (8 or 16 bits, gray or colour) and, when clean references are known, PSNR/SSIM.
A volume run restores volumes (NIfTI, ``.npy``, TIFF stacks) by a sliding window of ``tile``³ voxels,
writing NIfTI (with the input's affine and header) or ``.npy``.

Two ways to judge a model: ``reference=`` a folder of clean images with the same names as the
inputs, or ``degrade=True``: the inputs are clean, the run's own task degrades them (seeded), the
model restores them, and both the degraded input and the result are scored against the original.
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import torch

from msconv.data import IMAGE_EXTENSIONS, ImageReadError
from msconv.restore import DEFAULT_TILE, LoadedRun

__all__ = ["read_photo", "write_photo", "apply_run", "input_files"]


def read_photo(path: str) -> tuple[torch.Tensor, int]:
    """(image (C, H, W) float32 in [0, 1] with C = 1 or 3, bits 8 or 16) of a PNG/JPEG/BMP/TIFF file."""
    from PIL import Image

    try:
        if path.lower().endswith((".tif", ".tiff")):
            import tifffile  # PIL reads 16-bit colour TIFFs as 8 bits

            a = tifffile.imread(path)
            bits = 16 if a.dtype.itemsize > 1 else 8
            a = a.astype(np.float64) / (1.0 if a.dtype.kind == "f" else 65535.0 if bits == 16 else 255.0)
            if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 3, 4):
                a = np.moveaxis(a, 0, -1)  # planar (C, H, W) storage
        else:
            with Image.open(path) as im:
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    a, bits = np.asarray(im, dtype=np.float64) / 65535.0, 16
                else:
                    a, bits = np.asarray(im.convert("L" if im.mode in ("L", "LA", "1") else "RGB")) / 255.0, 8
    except Exception as e:  # noqa: BLE001 - any decoder's failure means the file is unusable
        raise ImageReadError(f"cannot read image file {path!r}: {type(e).__name__}: {e}") from e
    a = np.clip(np.nan_to_num(a), 0, 1)
    t = torch.from_numpy(a.astype(np.float32))
    t = t.unsqueeze(0) if t.dim() == 2 else t[..., :3].permute(2, 0, 1)
    return t.contiguous(), bits


def write_photo(image: torch.Tensor, path_stem: str, bits: int) -> str:
    """Write (C, H, W) in [0, 1] as an 8-bit PNG, a 16-bit PNG (gray) or a 16-bit TIFF (colour); returns the path."""
    from PIL import Image

    a = image.detach().clamp(0, 1).cpu().permute(1, 2, 0).numpy()
    if bits == 8:
        path = path_stem + ".png"
        q = np.rint(a * 255).astype(np.uint8)
        Image.fromarray(q[..., 0] if q.shape[2] == 1 else q).save(path)
        return path
    q = np.rint(a * 65535).astype(np.uint16)
    if q.shape[2] == 1:
        path = path_stem + ".png"
        Image.fromarray(q[..., 0]).save(path)
    else:
        import tifffile

        path = path_stem + ".tif"
        tifffile.imwrite(path, q, photometric="rgb")
    return path


def input_files(path: str) -> list[str]:
    """``path`` itself, or the images in folder ``path`` (sorted, not recursive)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--input {path!r} is neither an image file nor a folder")
    files = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n)))
    if not files:
        raise FileNotFoundError(f"--input {path!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _reference(folder: str, name: str) -> str:
    stem = os.path.splitext(name)[0]
    for n in sorted(os.listdir(folder)):
        if os.path.splitext(n)[0] == stem and n.lower().endswith(IMAGE_EXTENSIONS):
            return os.path.join(folder, n)
    raise FileNotFoundError(f"--reference {folder!r} has no image named {stem}.* for input {name!r}")


def _score(pred: torch.Tensor, ref: torch.Tensor, name: str) -> tuple[float, float]:
    from msconv.train.metrics import psnr_ssim

    if pred.shape != ref.shape:
        raise ValueError(f"--reference: {name!r} is {tuple(ref.shape)} (C, H, W) but the restored image is "
                         f"{tuple(pred.shape)}; references must be the clean originals of the inputs")
    return psnr_ssim(pred, ref)


def apply_run(run: LoadedRun, inputs: str, out: str, *, reference: str | None = None, degrade: bool = False,
              tile: int | None = None, grid_scale: float = 1.0, seed: int = 0, progress: bool = True) -> list[dict]:
    """Restore every image of ``inputs`` (file or folder) into folder ``out``; one row per image (name,
    output path, size, and with ``reference`` or ``degrade`` the PSNR/SSIM of the result and of the
    degraded input), also written to ``out/restore.csv``. ``tile``: default :data:`DEFAULT_TILE`."""
    from tqdm import tqdm

    if reference is not None and degrade:
        raise ValueError("--reference and --degrade: give one (degrade scores against the inputs themselves)")
    tile = DEFAULT_TILE[run.dims] if tile is None else tile
    if run.dims == 3:
        files = volume_inputs(inputs)
        stems = [os.path.basename(f).split(".")[0] for f in files]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise ValueError(f"--input {inputs!r} holds several volumes named {twice[0]!r} (in subfolders or with "
                             "other extensions); their results would overwrite each other in --out. Restore them "
                             "folder by folder")
        rows = [_apply_volume(run, f, out, reference, degrade, tile, grid_scale, seed)
                for f in tqdm(files, desc="restore", unit="volume", disable=not progress)]
        return _write_rows(rows, out)
    files = input_files(inputs)
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for f in tqdm(files, desc="restore", unit="image", disable=not progress):
        name = os.path.basename(f)
        stem = os.path.join(out, os.path.splitext(name)[0])
        image, bits = read_photo(f)
        clean = None
        if degrade:
            clean = _crop_to_multiple(image, getattr(run.task, "size_multiple", 1))
            observed = _degrade_per_channel(run, clean, g)
            seen = _as_image(run, run.task.input_for_metrics(observed), clean.shape[0]).clamp(0, 1)
            write_photo(seen, stem + "_input", bits)
            restored = _restore_degraded(run, observed, clean.shape[0], tile, grid_scale)
        else:
            restored = run.restore(image.unsqueeze(0), tile=tile, grid_scale=grid_scale)[0]
            if reference is not None:
                clean, _ = read_photo(_reference(reference, name))
        path = write_photo(restored, stem + ("_restored" if degrade else ""), bits)
        row = {"image": name, "output": os.path.basename(path), "height": restored.shape[1],
               "width": restored.shape[2], "channels": restored.shape[0], "bits": bits}
        if clean is not None:
            row["psnr"], row["ssim"] = _score(restored.cpu(), clean, name)
            if degrade and seen.shape == clean.shape:
                row["input_psnr"], row["input_ssim"] = _score(seen, clean, name)
        rows.append(row)
    return _write_rows(rows, out)


def _write_rows(rows: list[dict], out: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "restore.csv"), "w", newline="") as fh:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return rows


def volume_inputs(path: str) -> list[str]:
    """``path`` itself (a volume file), or the volumes in folder ``path`` (sorted, recursive)."""
    from msconv.data.volumes import VOLUME_EXTENSIONS, _volume_files, is_volume_file

    if os.path.isfile(path):
        if not is_volume_file(path):
            raise FileNotFoundError(f"--input {path!r} is not a volume (NIfTI, .npy, TIFF stack), and this run's model "
                                    "restores volumes")
        return [path]
    files = _volume_files(path) if os.path.isdir(path) else []
    if not files:
        raise FileNotFoundError(f"--input {path!r} is neither a volume file nor a folder holding volumes "
                                f"({', '.join(VOLUME_EXTENSIONS)})")
    return files


def _apply_volume(run: LoadedRun, f: str, out: str, reference: str | None, degrade: bool, tile: int,
                  grid_scale: float, seed: int) -> dict:
    """Restore one volume file into ``out`` (NIfTI in, NIfTI out; else .npy); its row of scores."""
    from msconv.data.volumes import _ext, load_volume, save_volume
    from msconv.restore import restore_tiled

    name = os.path.basename(f)
    ext = _ext(name)
    stem = os.path.join(out, name[: -len(ext)] if ext else name)
    suffix = ext if ext in (".nii", ".nii.gz") else ".npy"
    os.makedirs(out, exist_ok=True)
    vol, info = load_volume(f, with_info=True)
    clean = None
    if degrade:
        clean = _crop_to_multiple(vol, getattr(run.task, "size_multiple", 1))
        observed, _ = run.task.corrupt(clean.unsqueeze(0), torch.Generator().manual_seed(seed))
        seen = run.task.input_for_metrics(observed)[0].clamp(0, 1)
        save_volume(seen, stem + "_input" + suffix, like=f, info=info)
        restored = restore_tiled(run.model, observed.to(run.device), tile, run.halo, run.upscale, grid_scale)[0]
        restored = restored.clamp(0, 1).cpu()
    else:
        restored = run.restore(vol.unsqueeze(0), tile=tile, grid_scale=grid_scale)[0].cpu()
        if reference is not None:
            ref = [p for p in volume_inputs(reference) if os.path.basename(p) == name]
            if not ref:
                raise FileNotFoundError(f"--reference {reference!r} has no volume named {name!r}")
            clean, ref_info = load_volume(ref[0], with_info=True)
            # Each file is scaled by its own range (noise widens the input's): score the result on the
            # reference's scale, in the same intensity units.
            span = (ref_info.hi - ref_info.lo) or 1.0
            restored_on_ref = ((info.lo + restored * (info.hi - info.lo)) - ref_info.lo) / span
    path = save_volume(restored, stem + ("_restored" if degrade else "") + suffix, like=f, info=info)
    row = {"image": name, "output": os.path.basename(path), "depth": restored.shape[1], "height": restored.shape[2],
           "width": restored.shape[3], "channels": restored.shape[0]}
    if clean is not None:
        row["psnr"], row["ssim"] = _score(restored if degrade else restored_on_ref.clamp(0, 1), clean, name)
        if degrade and seen.shape == clean.shape:
            row["input_psnr"], row["input_ssim"] = _score(seen, clean, name)
    return row


def _crop_to_multiple(image: torch.Tensor, m: int) -> torch.Tensor:
    """(C, H, W) or (C, D, H, W) cropped so every side is a multiple of ``m``."""
    return image[(slice(None),) + tuple(slice(0, n - n % m) for n in image.shape[1:])]


def _degrade_per_channel(run: LoadedRun, clean: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The task's degradation of a clean (C, H, W) image, as (1 or C, C_in, h, w): each channel alone for a
    grayscale model."""
    if run.channels == 1:
        x = clean.unsqueeze(1)
    else:  # a colour model sees a gray photo as three equal channels
        x = clean.expand(run.channels, *clean.shape[1:]).unsqueeze(0)
    observed, _ = run.task.corrupt(x, g)
    return observed


def _restore_degraded(run: LoadedRun, observed: torch.Tensor, channels: int, tile: int, grid_scale: float) -> torch.Tensor:
    """Restore what :func:`_degrade_per_channel` made (it is the model's input already)."""
    from msconv.restore import restore_tiled

    out = restore_tiled(run.model, observed.to(run.device), tile, run.halo, run.upscale, grid_scale).clamp(0, 1)
    return _as_image(run, out, channels)


def _as_image(run: LoadedRun, t: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) from a batch made by :func:`_degrade_per_channel` (one image per channel for a grayscale model;
    a gray photo given to a colour model comes back as the mean of its channels)."""
    if run.channels == 1:
        return t.reshape(channels, *t.shape[2:])
    return t[0] if channels == run.channels else t[0].mean(0, keepdim=True)


def mean_scores(rows: list[dict]) -> dict:
    """Mean of every score column over the rows that have it."""
    keys = [k for k in ("psnr", "ssim", "input_psnr", "input_ssim") if any(k in r for r in rows)]
    return {k: float(np.mean([r[k] for r in rows if k in r and not math.isnan(r[k])] or [math.nan])) for k in keys}
