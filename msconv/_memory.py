"""Up-front size checks: refuse an allocation the device cannot hold before attempting it.

A request far beyond the device's memory otherwise ends in an allocator traceback (or, on
machines that overcommit, in swapping and the OOM killer) with no word about which argument
made it so large.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["AllocationTooLargeError", "device_memory_bytes", "check_fits"]


class AllocationTooLargeError(ValueError, MemoryError):
    """An argument asks for more memory than the device has; raised before allocating.

    A ValueError (the cause is an argument's value) and a MemoryError (what it would have become).
    """


@functools.lru_cache(maxsize=None)
def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX host: no check
        return None


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (host RAM for CPU), or None where unknown."""
    device = torch.device(device)
    if device.type == "cpu":
        return _host_memory_bytes()
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).total_memory
    return None


def check_fits(nbytes: int, device: torch.device, op: str, what: str, fix: str) -> None:
    """Raise :class:`AllocationTooLargeError` naming ``what`` and ``fix`` if ``nbytes`` exceeds the device's memory.

    A no-op while torch.compile traces (the eager calls make the check; tracing it would break the graph).
    """
    if torch.compiler.is_compiling():
        return
    total = device_memory_bytes(device)
    if total is not None and nbytes > total:
        raise AllocationTooLargeError(
            f"{op}: {what} would need {nbytes / 2**30:.3g} GiB, more than the {total / 2**30:.3g} GiB "
            f"of memory on {torch.device(device)}; {fix}"
        )
