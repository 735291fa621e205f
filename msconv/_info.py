"""What this installation can do: versions, compiled kernels, Triton, and each op's backend."""
from __future__ import annotations

import torch

from msconv.ops import _backend

OPS = ("restrict", "prolong", "pyramid", "mf_jets")


def info() -> dict:
    """Report as a dict (``python -m msconv info`` prints it).

    Keys: version, torch, cpp_ops, cuda_ops, triton, cuda_device, backends
    (``{device: {op: backend}}`` for the automatic choice; honours ``MSCONV_BACKEND``).
    """
    from msconv._version import __version__

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    backends = {}
    for dev in devices:
        row = {}
        for op in OPS:
            try:
                row[op] = _backend.resolve(op, dev)
            except (RuntimeError, ValueError) as e:
                row[op] = f"unavailable: {e}"
        backends[str(dev)] = row
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpp_ops": _backend.has_cpp(),
        "cuda_ops": _backend.has_cuda_ext(),
        "triton": _backend.has_triton(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": backends,
    }


def format_info(d: dict) -> str:
    yn = {True: "yes", False: "no"}
    lines = [
        f"msconv {d['version']}  (torch {d['torch']})",
        f"  compiled CPU ops : {yn[d['cpp_ops']]}",
        f"  CUDA ops         : {yn[d['cuda_ops']]}",
        f"  Triton           : {yn[d['triton']]}",
        f"  CUDA device      : {d['cuda_device'] or 'none'}",
        "  backend per op (auto choice):",
    ]
    for dev, row in d["backends"].items():
        for op, b in row.items():
            lines.append(f"    {dev:5s} {op:9s} -> {b}")
    return "\n".join(lines)
