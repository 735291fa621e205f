"""Datasets: the embedded default (scikit-image's bundled photographs) and folders of images.

Nothing is downloaded. Images are held in memory as float32 (C, H, W) tensors in [0, 1];
training batches are random crops with flips and 90° rotations drawn from a
``torch.Generator`` by :class:`CropSampler`, whose full state (generator, epoch, position)
goes into checkpoints so a resumed run draws exactly the batches an uninterrupted one would.

>>> train, val = bundled_split(gray=True, seed=0)
>>> sampler = CropSampler(train, crop=64, seed=0)
>>> clean = sampler.next_batch(4)          # (4, 1, 64, 64)
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from msconv.data.stream import LazyImages, header_shape

__all__ = [
    "ImageSet", "ImageReadError", "BUNDLED_PHOTOS", "bundled_images", "bundled_split", "load_image",
    "load_folder", "load_dataset", "CropSampler", "IMAGE_EXTENSIONS", "MAX_MEGAPIXELS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Real photographs only (no synthetic test patterns, logos or binary silhouettes), at least
# 256 px on the short side so crops of 256² fit. `cat` is left out: it is the same picture
# as `chelsea`, and keeping both could put one photo on both sides of the split.
BUNDLED_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "retina", "rocket",
)


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass
class ImageSet:
    """Named images, each float32 (C, H, W) in [0, 1], all with the same C: a list in memory, or a
    :class:`~msconv.data.stream.LazyImages` that decodes them from disk on demand. Volumes are
    held the same way, each (C, D, H, W) (see :mod:`msconv.data.volumes`)."""

    images: list
    names: list

    def __len__(self) -> int:
        return len(self.images)

    @property
    def lazy(self) -> bool:
        return isinstance(self.images, LazyImages)

    def shapes(self) -> list[tuple[int, ...]]:
        """(C, H, W) (volumes: (C, D, H, W)) of every image, without decoding lazy ones."""
        return list(self.images.shapes) if self.lazy else [tuple(im.shape) for im in self.images]

    @property
    def channels(self) -> int:
        return self.shapes()[0][0]

    @property
    def dims(self) -> int:
        """Spatial dimensions: 2 for images, 3 for volumes."""
        return len(self.shapes()[0]) - 1

    def min_side(self) -> int:
        return min(min(s[1:]) for s in self.shapes())

    def subset(self, indices) -> "ImageSet":
        idx = list(indices)
        images = self.images.subset(idx) if self.lazy else [self.images[i] for i in idx]
        return ImageSet(images, [self.names[i] for i in idx])

    def fingerprint(self) -> str:
        """A short summary that differs when the images do: their count, names, shapes and pixel sums
        (what processes of one run compare to be sure they train on the same data)."""
        import hashlib

        h = hashlib.sha1()
        if self.lazy:  # decoding every file to compare would cost an epoch: sizes on disk stand in for pixels
            for path, name, shape in zip(self.images.paths, self.names, self.images.shapes):
                h.update(f"{name}|{shape}|{os.path.getsize(path)};".encode())
        for im, name in ([] if self.lazy else zip(self.images, self.names)):
            h.update(f"{name}|{tuple(im.shape)}|{float(im.double().sum()):.9g};".encode())
        return f"{len(self)} images, sha1 {h.hexdigest()[:12]}"


def _to_tensor(a: np.ndarray, gray: bool, what: str) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        top = float(np.iinfo(a.dtype).max)
        a = a.astype(np.float32)
        a /= top  # in place: one float32 copy of a large image, not two
    else:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ImageReadError(
                f"{what}: the image holds {int((~np.isfinite(a)).sum())} non-finite value(s) (NaN or inf), which "
                "would poison every crop and loss that touches them; fix or remove the file"
            )
        lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
        if lo >= 0 and hi > 1.0 + 1e-6 and hi <= 255.0 + 1e-3:
            a = a / 255.0  # a float image on the 0-255 scale
        elif lo < 0 or hi > 255.0 + 1e-3:
            # Not [0, 1] nor 0-255: clamping would saturate it. Scale its own range to [0, 1], and say so.
            warnings.warn(f"{what}: values span [{lo:g}, {hi:g}], neither [0, 1] nor 0-255; scaled by that range to "
                          "[0, 1]. Convert the file to 8 or 16 bits (or [0, 1] floats) to control the scale",
                          stacklevel=3)
            a = ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)).astype(np.float32)
    if a.ndim == 3 and a.shape[2] == 4:  # RGBA: drop alpha
        a = a[..., :3]
    if a.ndim == 3 and a.shape[2] == 2:  # gray + alpha
        a = a[..., :1]
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ImageReadError(f"{what}: unsupported image shape {a.shape}; need H×W, H×W×1, H×W×3 or H×W×4")
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()
    if gray and t.shape[0] == 3:
        # ITU-R BT.601 luma, the convention of the DnCNN benchmarks.
        t = (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]).unsqueeze(0)
    elif not gray and t.shape[0] == 1:
        t = t.expand(3, -1, -1).contiguous()
    return t.clamp_(0, 1)


# Images declaring more pixels than this are refused unless the caller raises the limit: a few-kB
# file can declare 100000x100000 pixels (tens of GB once decoded). PIL's own refusal threshold.
MAX_MEGAPIXELS = 2 * 89_478_485 / 1e6


def load_image(path: str, gray: bool = True, max_megapixels: float = MAX_MEGAPIXELS) -> torch.Tensor:
    """Read one PNG/JPEG/BMP/TIFF file as float32 (C, H, W) in [0, 1]; C = 1 if ``gray`` else 3.

    Raises :class:`ImageReadError` naming the file if it cannot be decoded, or if its header
    declares more than ``max_megapixels`` million pixels (raise it for genuine images that large).
    """
    from PIL import Image, UnidentifiedImageError

    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the limit is ours (max_megapixels), checked before decoding
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_megapixels * 1e6:
                gb = w * h * (1 if gray else 3) * 4 / 1e9
                raise ImageReadError(
                    f"image file {path!r} declares {w}x{h} = {w * h} pixels ({w * h / 1e6:.0f} megapixels), more than "
                    f"the limit of {max_megapixels:g} megapixels (a guard against damaged files that declare huge "
                    f"sizes). If the image is genuine, raise the limit: --max-megapixels {math.ceil(w * h / 1e6)} "
                    f"(library: max_megapixels=); it needs about {gb:.1f} GB of memory as float32. Else remove it, or "
                    "skip bad files (on_bad_file='skip', CLI: --skip-bad-files)")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L"):
                a = np.asarray(im, dtype=np.uint16)
            elif im.mode == "I":
                a = np.asarray(im, dtype=np.int64)
                # 32-bit integers: 16-bit data read as such; anything else is scaled by its range
                # below (clipping it to 16 bits would saturate it silently).
                a = a.astype(np.uint16) if a.min(initial=0) >= 0 and a.max(initial=0) <= 65535 else a.astype(np.float64)
            elif im.mode == "F":
                a = np.asarray(im, dtype=np.float32)
            else:
                a = np.asarray(im.convert("RGB" if im.mode not in ("L", "LA") else "L"))
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
        raise ImageReadError(
            f"cannot read image file {path!r}: {type(e).__name__}: {e}. Remove or replace the file, or pass "
            "on_bad_file='skip' (CLI: --skip-bad-files) to skip unreadable files with a warning"
        ) from e
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    return _to_tensor(a, gray, path)


def load_folder(path: str, gray: bool = True, on_bad_file: str = "error", recursive: bool = True,
                max_megapixels: float = MAX_MEGAPIXELS, memory_mb: float | None = None) -> ImageSet:
    """Every PNG/JPEG/BMP/TIFF under ``path`` (sorted by relative path), read into memory
    (``max_megapixels``: see :func:`load_image`). With ``memory_mb``, a folder whose decoded images
    (float32) would take more than that many MB is not read up front: its images are decoded on
    demand into a cache of ``memory_mb`` (:class:`~msconv.data.stream.LazyImages`).

    ``on_bad_file``: ``"error"`` (default) raises :class:`ImageReadError` naming the file;
    ``"skip"`` warns and leaves it out.
    """
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"load_folder: on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data: {path!r} is not a folder; pass a folder of PNG/JPEG/BMP/TIFF images or 'bundled'")
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not recursive:
            break
    files.sort(key=lambda f: os.path.relpath(f, path))
    files = _regular_files(files)
    if memory_mb is not None:
        lazy = _lazy_if_too_big(path, files, gray, on_bad_file, max_megapixels, memory_mb)
        if lazy is not None:
            return lazy
    return read_files(files, path, lambda f: load_image(f, gray, max_megapixels), ImageReadError, on_bad_file,
                      "image", IMAGE_EXTENSIONS)


def read_files(files: list[str], root: str, read, error: type, on_bad_file: str, what: str, extensions) -> ImageSet:
    """An ImageSet of ``read(f)`` for every file, named by its path relative to ``root``. A file whose read
    raises ``error`` stops the load (``on_bad_file="error"``) or is skipped with a warning naming it."""
    images, kept = [], []
    for f in files:
        try:
            images.append(read(f))
            kept.append(os.path.relpath(f, root))
        except error as e:
            if on_bad_file == "error":
                raise
            warnings.warn(f"skipping unreadable {what} file {f!r} ({e.__cause__ or e})", stacklevel=3)
    if not images:
        raise FileNotFoundError(f"data: no readable {what}s ({', '.join(extensions)}) in {root!r}")
    return ImageSet(images, kept)


def _regular_files(files: list[str]) -> list[str]:
    """``files`` without what is not a regular file, each named in a warning: a FIFO, socket or device
    named like an image would block or stream for ever when opened."""
    kept = []
    for f in files:
        if os.path.isfile(f):
            kept.append(f)
        else:
            warnings.warn(f"skipping {f!r}: not a regular file (a pipe, socket, device or broken link), so not an "
                          "image", stacklevel=3)
    return kept


def _lazy_if_too_big(root, files, gray, on_bad_file, max_megapixels, memory_mb) -> ImageSet | None:
    """A lazily decoded ImageSet of ``files`` when decoding them all would exceed ``memory_mb``, else None.
    Unreadable headers are refused or skipped as :func:`load_folder` does for unreadable files."""
    paths, shapes, names = [], [], []
    for f in files:
        try:
            shape = header_shape(f, gray)
        except Exception as e:  # noqa: BLE001 - any header error means the file is unusable
            if on_bad_file == "error":
                raise ImageReadError(f"cannot read image file {f!r}: {type(e).__name__}: {e}. Remove or replace the "
                                     "file, or pass on_bad_file='skip' (CLI: --skip-bad-files)") from e
            warnings.warn(f"skipping unreadable image file {f!r} ({e})", stacklevel=3)
            continue
        if shape[1] * shape[2] > max_megapixels * 1e6:
            load_image(f, gray, max_megapixels)  # raises the size error, naming the file and the remedy
        paths.append(f)
        shapes.append(shape)
        names.append(os.path.relpath(f, root))
    if not paths:
        raise FileNotFoundError(f"data: no readable images ({', '.join(IMAGE_EXTENSIONS)}) in {root!r}")
    total = sum(c * h * w * 4 for c, h, w in shapes)
    if total <= memory_mb * 1e6:
        return None
    return ImageSet(LazyImages(paths, gray, max_megapixels, int(memory_mb * 1e6), shapes), names)


def bundled_images(gray: bool = True, names=None) -> ImageSet:
    """scikit-image's bundled photographs that load offline (missing ones are skipped: some
    scikit-image builds keep a few images in the optional ``pooch`` download cache)."""
    try:
        import skimage.data as skd
    except ImportError as e:
        raise ImportError("data='bundled' needs scikit-image (pip install scikit-image), or pass a folder of images") from e
    images, kept = [], []
    for n in names or BUNDLED_PHOTOS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = getattr(skd, n)()
        except Exception:  # noqa: BLE001 - a missing optional image is not an error
            continue
        images.append(_to_tensor(a, gray, f"skimage.data.{n}"))
        kept.append(n)
    if len(images) < 2:
        raise RuntimeError("data='bundled': fewer than 2 of scikit-image's photographs load offline; pass a folder")
    return ImageSet(images, kept)


def split_by_image(ds: ImageSet, val_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Disjoint train/validation split by whole image, a deterministic function of ``seed``
    and the sorted names (independent of file-system order)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"split: val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(ds) < 2:
        raise ValueError(f"split: need at least 2 images to split, got {len(ds)}; pass --val-data")
    order = sorted(range(len(ds)), key=lambda i: ds.names[i])
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    order = [order[p] for p in perm]
    n_val = min(len(ds) - 1, max(1, round(val_fraction * len(ds))))
    by_name = lambda idx: sorted(idx, key=lambda i: ds.names[i])  # noqa: E731
    return ds.subset(by_name(order[n_val:])), ds.subset(by_name(order[:n_val]))


def bundled_split(gray: bool = True, val_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """The embedded default, split by image into (train, validation)."""
    return split_by_image(bundled_images(gray), val_fraction, seed)


def load_dataset(data: str = "bundled", val_data: str | None = None, gray: bool = True,
                 val_fraction: float = 0.2, split_seed: int = 0, on_bad_file: str = "error",
                 max_megapixels: float = MAX_MEGAPIXELS, memory_mb: float | None = None):
    """(train, val) ImageSets. ``data``: ``"bundled"`` or a folder. Without ``val_data`` the
    images of ``data`` are split by image (:func:`split_by_image`); with it, all of ``data``
    trains and ``val_data`` (a folder) validates. A folder of volumes, or one volume file, gives
    (1, D, H, W) volumes (:mod:`msconv.data.volumes`; one volume is split by region)."""
    from msconv.data.volumes import is_volume_data, load_volume_folder, split_by_region

    if is_volume_data(data):
        full = load_volume_folder(data, on_bad_file)
        if val_data is None:
            # One scan is split by region; several by scan, as images are.
            return split_by_region(full, val_fraction) if len(full) == 1 else split_by_image(full, val_fraction, split_seed)
        return full, load_volume_folder(val_data, on_bad_file)
    full = bundled_images(gray) if data == "bundled" else load_folder(data, gray, on_bad_file,
                                                                      max_megapixels=max_megapixels, memory_mb=memory_mb)
    if val_data is None:
        return split_by_image(full, val_fraction, split_seed)
    val = (bundled_images(gray) if val_data == "bundled"
           else load_folder(val_data, gray, on_bad_file, max_megapixels=max_megapixels, memory_mb=memory_mb))
    return full, val


# Images a lazily loaded set decodes ahead of the sampler (in background threads).
PREFETCH_IMAGES = 8


class CropSampler:
    """Random crops (crop × crop; of volumes crop³) with random flips and 90° rotations (of volumes:
    in the H-W plane only, as the slice axis may have another spacing), drawn from its own
    generator. Images are visited in a fresh random order every epoch, so every image is used
    once per epoch and successive draws (e.g. the levels of one MGE step) get different
    images as far as the data allows.

    ``state_dict()`` holds the generator state, epoch order and position: restoring it makes
    the sampler continue exactly where it stopped.
    """

    def __init__(self, ds: ImageSet, crop: int, seed: int = 0, augment: bool = True):
        if isinstance(crop, bool) or not hasattr(crop, "__index__") or crop < 1:
            raise ValueError(f"CropSampler: crop must be a positive int (pixels), got crop={crop!r}")
        if isinstance(seed, bool) or not hasattr(seed, "__index__"):
            raise TypeError(f"CropSampler: seed must be an int, got seed={seed!r}")
        if not isinstance(ds, ImageSet) or len(ds) == 0:
            raise ValueError(
                f"CropSampler: ds must be a non-empty ImageSet (from load_folder, bundled_images, ...), got "
                f"{type(ds).__name__}{' with no images' if isinstance(ds, ImageSet) else ''}"
            )
        bad = [] if ds.lazy else [n for im, n in zip(ds.images, ds.names)
                                  if not (isinstance(im, torch.Tensor) and im.dim() == ds.images[0].dim() in (3, 4))]
        if bad:
            raise ValueError(f"CropSampler: every image must be a (C, H, W) tensor (volumes: all (C, D, H, W)); "
                             f"{bad[0]!r} is not")
        shapes = ds.shapes()
        channels = {s[0] for s in shapes}
        if len(channels) > 1:
            raise ValueError(
                f"CropSampler: the images have different channel counts {sorted(channels)}, so their crops cannot "
                "form one batch; load them all gray or all RGB (gray=True/False)"
            )
        small = [(n, tuple(s[1:])) for s, n in zip(shapes, ds.names) if min(s[1:]) < crop]
        if small:
            n, s = small[0]
            raise ValueError(
                f"crop={crop} is larger than image {n!r} of size {s} ({len(small)} image(s) too small); "
                f"use --crop <= {ds.min_side()}"
            )
        self.ds, self.crop, self.augment = ds, int(crop), augment
        self.generator = torch.Generator().manual_seed(int(seed))
        self.order: list[int] = []
        self.pos = 0
        self.epoch = 0

    def _next_index(self) -> int:
        if self.pos >= len(self.order):
            self.order = torch.randperm(len(self.ds), generator=self.generator).tolist()
            self.pos = 0
            self.epoch += 1
        i = self.order[self.pos]
        self.pos += 1
        if self.ds.lazy:  # decode the images of the next steps while this one trains
            self.ds.images.prefetch(self.order[self.pos:self.pos + PREFETCH_IMAGES])
        return i

    def next_batch(self, n: int, crop: int | None = None) -> torch.Tensor:
        """(n, C, c, c) float32 clean crops ((n, C, c, c, c) from volumes), c = ``crop`` (at most the
        sampler's crop) or the sampler's."""
        if isinstance(n, bool) or not hasattr(n, "__index__") or n < 1:
            raise ValueError(f"CropSampler.next_batch: n must be a positive int (the batch size), got n={n!r}")
        if crop is not None and (isinstance(crop, bool) or not hasattr(crop, "__index__") or not 1 <= crop <= self.crop):
            raise ValueError(f"CropSampler.next_batch: crop must be an int in [1, {self.crop}] (the sampler's crop, "
                             f"checked against every image), got crop={crop!r}")
        n = int(n)
        g, c = self.generator, self.crop if crop is None else int(crop)
        out = []
        for _ in range(n):
            im = self.ds.images[self._next_index()]
            # Volumes: the depth offset is drawn last, so images draw exactly what they always did.
            h, w = im.shape[-2:]
            top = int(torch.randint(0, h - c + 1, (1,), generator=g))
            left = int(torch.randint(0, w - c + 1, (1,), generator=g))
            p = im[..., top:top + c, left:left + c]
            if im.dim() == 4:
                front = int(torch.randint(0, im.shape[1] - c + 1, (1,), generator=g))
                p = p[:, front:front + c]
            if self.augment:
                # Flips and in-plane rotations only: a volume's slice axis may have another spacing.
                flip, rot = torch.randint(0, 2, (1,), generator=g), torch.randint(0, 4, (1,), generator=g)
                if int(flip):
                    p = p.flip(-1)
                p = torch.rot90(p, int(rot), dims=(-2, -1))
            out.append(p)
        return torch.stack(out).contiguous()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, s: dict) -> None:
        self.generator.set_state(s["generator"])
        self.order, self.pos, self.epoch = list(s["order"]), int(s["pos"]), int(s["epoch"])
