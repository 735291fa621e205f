"""One owner per run folder: a lock that names its holder, and no fresh run over a resumable one.

The lock is a file, ``OUT/.msconv-lock``, created atomically (``O_EXCL``) with the holder's pid,
host and start time. A second run on the same folder refuses and names the holder. A lock whose
holder has died (same host, pid gone) is stale and taken over, so a crashed run never leaves a
folder stuck. Under torchrun only rank 0 takes it (the ranks share the folder by design).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from msconv.train.checkpoint import pid_alive
from msconv.train.config import ConfigError

__all__ = ["run_folder_lock", "check_not_resumable", "LOCK_NAME"]

LOCK_NAME = ".msconv-lock"


def _holder(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def run_folder_lock(out: str, enabled: bool = True):
    """Hold ``out``'s lock for the enclosed run; ConfigError naming the holder if another live
    process holds it. Re-entrant within one process (``compare`` locks its folder and each mode's)."""
    if not enabled:
        yield
        return
    path = os.path.join(out, LOCK_NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    mine = False
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            h = _holder(path)
            if h is not None and h.get("pid") == me["pid"] and h.get("host") == me["host"]:
                break  # this process holds it already (an enclosing run)
            if h is not None and h.get("host") == me["host"] and isinstance(h.get("pid"), int) and not pid_alive(h["pid"]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its run died without releasing it
                continue
            if h is None:  # being written this instant, or unreadable: look again
                time.sleep(0.05)
                h = _holder(path)
                if h is None:
                    continue
            raise ConfigError(
                f"--out {out!r} is in use by another msconv run (pid {h.get('pid')} on {h.get('host')}, started "
                f"{h.get('started')}); wait for it to finish, give another --out, or, if that run is gone, delete "
                f"{path}") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        mine = True
        break
    else:
        raise ConfigError(f"--out {out!r}: could not take the run folder's lock {path}; try again")
    try:
        yield
    finally:
        if mine:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def check_not_resumable(out: str, load) -> None:
    """ConfigError when ``out`` holds an unfinished run (a checkpoint not marked finished) that a
    fresh run would overwrite; ``load(path)`` reads a checkpoint."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        return
    try:
        ck = load(path)
        finished, step = bool(ck.get("finished")), ck.get("step")
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is no run to protect
        return
    if not finished:
        raise ConfigError(
            f"--out {out!r} holds an unfinished run (checkpoint at step {step}); a fresh run would overwrite it. "
            f"Continue it with --resume, give another --out, or pass --overwrite to replace it")
