"""Volumes: 3-D scans (MRI, CT, microscopy stacks) as float32 (1, D, H, W) tensors in [0, 1].

Read from NIfTI (``.nii``, ``.nii.gz``, with ``nibabel``), TIFF stacks (``.tif``/``.tiff`` holding
several pages, with ``tifffile``) and NumPy ``.npy`` arrays. Intensities are scaled to [0, 1] per
volume: 8-bit data by 255 (as 8-bit images are), anything else (16-bit, signed CT numbers, floats)
by its own minimum and maximum, the usual intensity normalisation for scans whose units differ from
one scanner to the next. D is the slice axis: a NIfTI's axis with the largest voxel size comes
first (:func:`load_volume`), and :func:`save_volume` writes results back in the file's own axes and
intensity units.

A training set of volumes is an :class:`~msconv.data.ImageSet` whose items are (1, D, H, W); the
same :class:`~msconv.data.CropSampler` draws cubic crops from it. One volume is split into training
and validation by region (:func:`split_by_region`), several by volume.

>>> vol = load_volume("brain.nii.gz")        # (1, D, H, W)
>>> train, val = split_by_region(ImageSet([vol], ["brain"]), 0.2)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["VOLUME_EXTENSIONS", "VolumeReadError", "VolumeInfo", "is_volume_file", "is_volume_data", "load_volume",
           "load_volume_folder", "split_by_region", "save_volume", "REGION_GAP"]

VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".npy", ".tif", ".tiff")
# Voxels left out between the training and the validation region of one volume: no training crop
# then touches a validation voxel's immediate neighbourhood.
REGION_GAP = 16


class VolumeReadError(ValueError):
    """A volume file that cannot be read as a 3-D scan; the message names the file."""


def _ext(path: str) -> str:
    p = path.lower()
    return ".nii.gz" if p.endswith(".nii.gz") else os.path.splitext(p)[1]


def _tiff_is_stack(path: str) -> bool:
    """A TIFF holding a 3-D stack (several pages of one gray image), not a 2-D photograph."""
    try:
        import tifffile
    except ImportError:
        return False
    try:
        with tifffile.TiffFile(path) as tf:
            shape = tf.series[0].shape
    except Exception:  # noqa: BLE001 - an unreadable TIFF is left to the image reader's clear error
        return False
    return len(shape) == 3 and shape[-1] not in (3, 4) and shape[0] > 1


def is_volume_file(path: str) -> bool:
    """Whether ``path`` is a file msconv reads as a volume: NIfTI, ``.npy``, or a multi-page TIFF stack."""
    if not os.path.isfile(path):
        return False
    ext = _ext(path)
    if ext in (".nii", ".nii.gz", ".npy"):
        return True
    return ext in (".tif", ".tiff") and _tiff_is_stack(path)


def _volume_files(folder: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(root, n) for n in names if _ext(n) in VOLUME_EXTENSIONS]
    return sorted(f for f in files if is_volume_file(f))


def is_volume_data(data) -> bool:
    """Whether ``data`` (a --data value) names volumes: a volume file, or a folder whose readable files
    include a volume (NIfTI, ``.npy``, a TIFF stack)."""
    if not isinstance(data, str) or data == "bundled":
        return False
    if os.path.isfile(data):
        return is_volume_file(data)
    if not os.path.isdir(data):
        return False
    for root, dirs, names in os.walk(data):
        dirs.sort()
        for n in sorted(names):
            ext = _ext(n)
            if ext in (".nii", ".nii.gz", ".npy") and os.path.isfile(os.path.join(root, n)):
                return True
            if ext in (".tif", ".tiff"):  # the first TIFF decides: a folder of TIFF photos is not opened file by file
                return _tiff_is_stack(os.path.join(root, n))
    return False


def _read_array(path: str) -> tuple[np.ndarray, bool, tuple | None]:
    """(array, stored as 8-bit, voxel sizes along its axes or None) of a volume file."""
    ext = _ext(path)
    if ext in (".nii", ".nii.gz"):
        try:
            import nibabel as nib
        except ImportError as e:
            raise VolumeReadError(f"{path!r} is NIfTI, which needs nibabel: pip install 'msconv[volumes]'") from e
        img = nib.load(path)
        slope, inter = img.dataobj.slope, img.dataobj.inter
        eight_bit = img.get_data_dtype() == np.uint8 and slope in (1, None) and inter in (0, None)
        return np.asarray(img.dataobj), eight_bit, tuple(float(z) for z in img.header.get_zooms()[:3])
    if ext == ".npy":
        a = np.load(path, allow_pickle=False)
        return a, a.dtype == np.uint8, None
    import tifffile

    a = tifffile.imread(path)
    return a, a.dtype == np.uint8, None


@dataclass(frozen=True)
class VolumeInfo:
    """How a file's array became the (1, D, H, W) tensor in [0, 1]: ``axes``, the file's axes in the
    order D, H, W (a NIfTI's slice axis, the one with the largest voxel size, comes first), and the
    intensities ``lo`` and ``hi`` that became 0 and 1. :func:`save_volume` undoes both."""

    axes: tuple = (0, 1, 2)
    lo: float = 0.0
    hi: float = 1.0


def load_volume(path: str, with_info: bool = False):
    """One volume file as float32 (1, D, H, W) in [0, 1] (the module docstring gives the scaling);
    with ``with_info``, ``(volume, VolumeInfo)``.

    D is the slice axis: for NIfTI the axis with the largest voxel size (a thick-slice scan's slice
    axis, whatever its place in the file; on isotropic voxels the file's order is kept), for .npy and
    TIFF stacks the first. A 4-D array with a singleton axis (e.g. NIfTI's time axis of length 1) is
    squeezed; anything else that is not 3-D raises :class:`VolumeReadError` naming the file and its shape.
    """
    try:
        a, eight_bit, zooms = _read_array(path)
    except VolumeReadError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:
        raise VolumeReadError(f"cannot read volume file {path!r}: {type(e).__name__}: {e}. Remove or replace it") from e
    if a.ndim == 4 and 1 in a.shape:
        a = a.squeeze(axis=a.shape.index(1))
    if a.ndim != 3 or min(a.shape) < 1:
        raise VolumeReadError(f"volume file {path!r} has shape {a.shape}; msconv reads gray 3-D volumes (D, H, W) "
                              "(a 4-D array only with one singleton axis)")
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise VolumeReadError(f"volume file {path!r} holds {a.dtype} values; give integer or floating intensities")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise VolumeReadError(f"volume file {path!r} holds {int((~np.isfinite(a)).sum())} non-finite value(s) (NaN or "
                              "inf), which would poison every crop that touches them; fix or remove the file")
    axes = (0, 1, 2)
    if zooms is not None and max(zooms) > min(zooms):
        first = max(range(3), key=lambda i: (zooms[i], -i))
        axes = (first, *[i for i in range(3) if i != first])
        a = a.transpose(axes)
    if eight_bit:
        lo, hi = 0.0, 255.0
        a /= 255.0
    else:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    vol = torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(0)
    return (vol, VolumeInfo(axes, lo, hi)) if with_info else vol


def load_volume_folder(path: str, on_bad_file: str = "error"):
    """Every volume in ``path`` (a folder, searched recursively, or one volume file) as an
    :class:`~msconv.data.ImageSet` of (1, D, H, W) tensors named by relative path. A folder that also
    holds images is refused (which kind to train on would be a guess)."""
    from msconv.data import IMAGE_EXTENSIONS, ImageSet, read_files

    if os.path.isfile(path):
        return ImageSet([load_volume(path)], [os.path.basename(path)])
    volumes = set(_volume_files(path))
    for root, _, names in os.walk(path):
        for n in sorted(names):
            f = os.path.join(root, n)
            if n.lower().endswith(IMAGE_EXTENSIONS) and f not in volumes and os.path.isfile(f):
                raise VolumeReadError(f"data: {path!r} holds volumes (e.g. {sorted(volumes)[0]!r}) and images (e.g. "
                                      f"{f!r}); put them in separate folders and train on one kind")
    return read_files(_volume_files(path), path, load_volume, VolumeReadError, on_bad_file, "volume", VOLUME_EXTENSIONS)


def split_by_region(ds, val_fraction: float = 0.2, gap: int = REGION_GAP):
    """(train, validation) from the volumes of ``ds`` split along their first axis: the last
    ``val_fraction`` of every volume validates, the part before it minus ``gap`` voxels trains, so the
    two never overlap. Names get ``[a:b]`` suffixes saying which slices each holds."""
    from msconv.data import ImageSet

    if not 0 < val_fraction < 1:
        raise ValueError(f"split: val_fraction must be in (0, 1), got {val_fraction!r}")
    train, val = [], []
    for v, name in zip(ds.images, ds.names):
        d = v.shape[1]
        n_val = max(1, round(val_fraction * d))
        end = d - n_val - gap
        if end < 1:
            raise ValueError(f"split: volume {name!r} has only {d} slices along its first axis, too few to hold out "
                             f"{n_val} for validation with a gap of {gap}; give --val-data, or a larger volume")
        train.append((v[:, :end].contiguous(), f"{name}[0:{end}]"))
        val.append((v[:, d - n_val:].contiguous(), f"{name}[{d - n_val}:{d}]"))
    return (ImageSet([t for t, _ in train], [n for _, n in train]), ImageSet([t for t, _ in val], [n for _, n in val]))


def save_volume(vol: torch.Tensor, path: str, like: str | None = None, info: VolumeInfo | None = None) -> str:
    """Write (1, D, H, W) in [0, 1] to ``path``: NIfTI (float32) or ``.npy``. Returns the path.

    ``info`` (from :func:`load_volume`) maps the result back to the file's axes and intensities. With
    ``like``, a NIfTI file, its affine and header are kept, so viewers overlay the result on it; an
    axis whose length changed by a factor f (slice super-resolution) gets voxels f times smaller,
    centred on the same field of view."""
    info = info or VolumeInfo()
    a = vol.detach().float().cpu().squeeze(0).numpy()
    a = (info.lo + a * (info.hi - info.lo)).astype(np.float32).transpose(np.argsort(info.axes))
    ext = _ext(path)
    if ext == ".npy":
        np.save(path, a)
        return path
    if ext not in (".nii", ".nii.gz"):
        raise ValueError(f"save_volume: {path!r} must end in .nii, .nii.gz or .npy")
    import nibabel as nib

    affine, header = np.eye(4), None
    if like is not None and _ext(like) in (".nii", ".nii.gz"):
        src = nib.load(like)
        affine, header = src.affine.copy(), src.header.copy()
        header.set_data_dtype(np.float32)
        header.set_slope_inter(1.0, 0.0)
        for axis, (n_out, n_in) in enumerate(zip(a.shape, src.shape[:3])):
            if n_out != n_in:  # voxels n_in / n_out times the size along this axis, same extent
                f = n_in / n_out
                col = affine[:3, axis].copy()
                affine[:3, axis] = col * f
                affine[:3, 3] += col * (f - 1) / 2
    nib.save(nib.Nifti1Image(a, affine, header), path)
    return path
