"""Training checkpoints: atomic save, checked load, no orphaned temporary files."""
from __future__ import annotations

import os
import re
import secrets

import torch

__all__ = ["save_atomic", "load_checkpoint", "remove_orphaned_temporaries", "CheckpointError", "FORMAT"]

FORMAT = "msconv-train-1"  # the tag every training checkpoint carries

# Temporary files of save_atomic: ".tmp-<pid of the writer>-<random>.pt". The writer's pid tells
# whether a left-over file is orphaned (its writer was killed mid-save) or still being written.
_TMP = re.compile(r"^\.tmp-(\d+)-[0-9a-f]+\.pt$")
# Earlier versions named them ".tmp-<8 random chars>.pt" (tempfile.mkstemp), with no pid.
_TMP_LEGACY = re.compile(r"^\.tmp-[a-z0-9_]{8}\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that writers killed during :func:`save_atomic` left in ``folder``;
    returns their paths. Files of a writer that is still running are kept."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP.match(name)
        if (m and not pid_alive(int(m.group(1)))) or _TMP_LEGACY.match(name):
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass  # gone already, or not ours to delete: harmless
    return removed


def save_atomic(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a
    crash at any moment leaves either the old checkpoint or the new one, never a torn file.

    The file gets the permissions of any other output (0666 less the umask, e.g. 0644), and the
    temporaries of earlier writers killed mid-save are deleted first."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphaned_temporaries(folder)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{secrets.token_hex(4)}.pt")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
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

    Raises :class:`CheckpointError` naming the file when it is missing, empty, truncated or not a
    msconv checkpoint. Orphaned temporaries next to it are deleted.
    """
    remove_orphaned_temporaries(os.path.dirname(os.path.abspath(path)))
    if not os.path.exists(path):
        raise CheckpointError(f"--resume: no checkpoint at {path!r}; run without --resume to start fresh")
    if os.path.isdir(path) or os.path.getsize(path) == 0:
        raise CheckpointError(
            f"--resume: {path!r} is {'a folder' if os.path.isdir(path) else 'empty (0 bytes)'}, not a checkpoint; "
            "delete it (or move it away) and start fresh without --resume")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means the file is unusable
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read checkpoint {path!r} ({type(e).__name__}: {first_line}); it is "
            "corrupt or not a msconv checkpoint. Delete it (or move it away) and start fresh without --resume"
        ) from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a msconv training checkpoint (format tag missing); start fresh without --resume")
    return ck
