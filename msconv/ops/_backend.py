"""Which implementation runs an op: compiled C++ (CPU), compiled CUDA, Triton, or reference.

``MSCONV_BACKEND=auto|cpp|cuda|triton|reference`` or an op's ``backend=`` argument overrides the
automatic choice. ``auto`` picks, for CPU tensors, the compiled C++ kernels and, for CUDA
tensors, the compiled CUDA kernels, then Triton; the plain-PyTorch reference is the fallback
everywhere. The choice is logged on the ``msconv`` logger at DEBUG level.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import torch

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")
log = logging.getLogger("msconv")

try:
    from msconv import _C  # noqa: F401  (registers torch.ops.msconv.* kernels)

    _EXT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised by MSCONV_NO_EXT installs
    _C = None
    _EXT_ERROR = e


class ExtensionWarning(UserWarning):
    """The compiled kernels could not be loaded; msconv runs on its reference backend."""


if _C is None:
    warnings.warn(
        f"msconv: compiled kernels (msconv._C) are not available ({_EXT_ERROR}); CPU ops run on "
        "the slower plain-PyTorch reference backend. Fix: reinstall with a C++ compiler present, "
        "`pip install --no-build-isolation -e .` (without MSCONV_NO_EXT=1).",
        ExtensionWarning,
        stacklevel=2,
    )


def has_cpp() -> bool:
    return _C is not None


def has_cuda_ext() -> bool:
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _available(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if _C is None:
            return f"msconv._C failed to import ({_EXT_ERROR}); reinstall with `pip install --no-build-isolation -e .`"
        if device.type != "cpu":
            return f"the C++ kernels run on CPU tensors, x is on {device}; use backend='cuda' or 'triton'"
        return None
    if backend == "cuda":
        if not has_cuda_ext():
            return "msconv was built without CUDA kernels; install with a CUDA build of torch and nvcc present"
        if device.type != "cuda":
            return f"the CUDA kernels need a CUDA tensor, x is on {device}; move x with x.cuda() or use backend='cpp'"
        return None
    if backend == "triton":
        if not has_triton():
            return "triton is not installed; `pip install triton`"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpret()):
            return None
        return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), x is on {device}"
    raise AssertionError(backend)


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run msconv ops on tensors on ``device``, as ``backend=`` takes them:
    the compiled ones this install and device allow (``cpp`` on CPU; ``cuda`` then ``triton`` on a
    GPU; ``triton`` on CPU too under ``TRITON_INTERPRET=1``), then ``"reference"``, which runs
    everywhere. Example: ``available_backends("cpu") == ["cpp", "reference"]`` on a default CPU
    install. A backend not listed raises a RuntimeError that says why when requested."""
    device = torch.device(device)
    return [b for b in ("cpp", "cuda", "triton") if _available(b, device) is None] + ["reference"]


def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``: the request, or the automatic choice."""
    requested = backend if backend is not None else os.environ.get("MSCONV_BACKEND", "auto")
    if requested not in BACKENDS:
        src = "backend" if backend is not None else "MSCONV_BACKEND"
        raise ValueError(f"{op}: unknown {src}={requested!r}; use one of {BACKENDS}")
    if requested == "auto":
        order = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}.get(device.type, ())
        chosen = next((b for b in order if _available(b, device) is None), "reference")
    else:
        why = _available(requested, device)
        if why is not None:
            raise RuntimeError(f"{op}: backend {requested!r} is not available: {why}")
        chosen = requested
    if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
        log.debug("%s on %s: backend %s (requested %s)", op, device, chosen, requested)
    return chosen
