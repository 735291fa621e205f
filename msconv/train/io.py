"""Run files: atomic checkpoints, the CSV log, TensorBoard scalars, validation metrics."""
from __future__ import annotations

import csv
import os
import struct
import tempfile
import time

import numpy as np
import torch

__all__ = ["save_atomic", "load_checkpoint", "CheckpointError", "CsvLog", "ScalarWriter", "psnr_ssim"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a
    crash at any moment leaves either the old checkpoint or the new one, never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by :func:`save_atomic` (``weights_only=True``: plain data only).

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or not a
    msconv checkpoint.
    """
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint at {path!r}; run without --resume to start fresh")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        raise CheckpointError(
            f"cannot read checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); it is "
            "corrupt or not a msconv checkpoint. Delete it (or move it away) and start fresh without --resume"
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != "msconv-train-1":
        raise CheckpointError(f"{path!r} is not a msconv training checkpoint (format tag missing); start fresh without --resume")
    return ck


class CsvLog:
    """Append-only CSV; on resume, rows past the checkpoint's step are dropped so the log
    matches an uninterrupted run."""

    FIELDS = ["step", "stage", "level", "loss", "lr", "work_units", "flops", "wall_clock_s", "batch_sizes",
              "skipped", "val_psnr", "val_ssim"]

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        if resume_step is None or not os.path.exists(path):
            with open(path, "w", newline="") as fh:
                csv.writer(fh).writerow(self.FIELDS)
        else:
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, self.FIELDS)
                w.writeheader()
                w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})


# --------------------------------------------------------------------------- TensorBoard
# torch.utils.tensorboard needs the `tensorboard` package; when it is absent, scalars are
# written by this small writer in the same TFRecord/Event format (readable by TensorBoard).

def _crc32c_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _event(wall_time: float, step: int, *, file_version: str | None = None, tag: str | None = None,
           value: float | None = None) -> bytes:
    ev = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        fv = file_version.encode()
        ev += b"\x1a" + _varint(len(fv)) + fv
    if tag is not None:
        t = tag.encode()
        val = b"\x0a" + _varint(len(t)) + t + b"\x15" + struct.pack("<f", value)
        summ = b"\x0a" + _varint(len(val)) + val
        ev += b"\x2a" + _varint(len(summ)) + summ
    return ev


def tfrecord(data: bytes) -> bytes:
    n = struct.pack("<Q", len(data))
    return n + struct.pack("<I", masked_crc(n)) + data + struct.pack("<I", masked_crc(data))


class ScalarWriter:
    """``add_scalar(tag, value, step)`` into ``folder``; torch's SummaryWriter when the
    tensorboard package is installed, else the built-in event writer."""

    def __init__(self, folder: str, enabled: bool = True):
        self._sw, self._fh = None, None
        if not enabled:
            return
        os.makedirs(folder, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._sw = SummaryWriter(folder)
        except ImportError:
            name = f"events.out.tfevents.{int(time.time())}.msconv.{os.getpid()}"
            self._fh = open(os.path.join(folder, name), "ab")
            self._fh.write(tfrecord(_event(time.time(), 0, file_version="brain.Event:2")))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._sw is not None:
            self._sw.add_scalar(tag, value, step)
        elif self._fh is not None:
            self._fh.write(tfrecord(_event(time.time(), step, tag=tag, value=float(value))))

    def close(self) -> None:
        if self._sw is not None:
            self._sw.close()
        if self._fh is not None:
            self._fh.close()
        self._sw = self._fh = None


# --------------------------------------------------------------------------- metrics

def psnr_ssim(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB, peak 1) and SSIM of one image (C, H, W) against its clean original, on the
    full image, with scikit-image (``skimage.metrics``); the prediction is clipped to [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p = pred.detach().clamp(0, 1).double().cpu().numpy()
    t = target.detach().double().cpu().numpy()
    psnr = peak_signal_noise_ratio(t, p, data_range=1.0)
    if p.shape[0] == 1:
        ssim = structural_similarity(t[0], p[0], data_range=1.0)
    else:
        ssim = structural_similarity(t, p, data_range=1.0, channel_axis=0)
    return float(min(psnr, 100.0) if np.isfinite(psnr) else 100.0), float(ssim)
