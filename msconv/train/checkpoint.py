"""Training checkpoints: atomic save, checked load."""
from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["save_atomic", "load_checkpoint", "CheckpointError", "FORMAT"]

FORMAT = "msconv-train-1"  # the tag every training checkpoint carries


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
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a msconv training checkpoint (format tag missing); start fresh without --resume")
    return ck
