"""Shared by every op: input validation (errors name the argument, the value and the fix), and the pyramid ops' backward."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_image(x, name: str = "x", op: str = "msconv") -> None:
    """``x`` must be a floating N×C×H×W tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{op}: {name} must have 4 dimensions (N, C, H, W), got {name}.shape={tuple(x.shape)}; "
            f"add batch/channel dimensions with {name}[None] or {name}.unsqueeze(1)"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {name}.dtype={x.dtype}; "
            f"convert with {name}.float()"
        )


def check_int(value, name: str, op: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {name}={value}")
    return value


def check_choice(value, name: str, op: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{op}: unknown {name}={value!r}; use one of {tuple(choices)}")
    return value


def is_channels_last(x: torch.Tensor) -> bool:
    """The memory-format rule every kernel follows: NHWC only when x is not also NCHW-contiguous."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def empty_like_format(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return x.new_empty((x.shape[0], x.shape[1], h, w)).contiguous(memory_format=fmt)


def save_pyramid_sizes(ctx, x, output, kind: str, backend: str) -> None:
    """What a pyramid op's backward needs: the spatial size of every level (input first), kind, backend."""
    ctx.sizes = [tuple(x.shape[2:])] + [tuple(o.shape[2:]) for o in output]
    ctx.kind, ctx.backend = kind, backend


def pyramid_adjoint(grads, sizes, adjoint):
    """The gradient of ``[R x, …, R^L x]`` w.r.t. ``x`` from the levels' gradients ``grads``:
    ``Σ_l (R^T)^l g_l`` in Horner form, one ``adjoint(acc, size)`` (R^T onto the finer grid of
    ``size``) per level, coarse to fine. Past the first level ``acc`` is a fresh kernel output owned
    here, so the level gradient is added in place: a new full-size tensor per level costs more in
    page faults than the add itself (measured on CPU, bench/bench_transfer.py)."""
    acc = None
    for l in range(len(grads), 0, -1):
        g = grads[l - 1]
        if g is not None:
            acc = g if acc is None else acc.add_(g)
        if acc is not None:
            acc = adjoint(acc, sizes[l - 1])
    return acc
