"""The grid-scale context: the pixel spacing, in reference pixels, of the grid being computed on.

Convention: s = 1 at the resolution a model was built for, s = 2 one level coarser, s = 1/2 one
level finer. Mesh-free layers read it with :func:`current_grid_scale`; the multilevel engine
sets it per level with :func:`grid_scale`. Layers never infer it from tensor sizes.

The value lives in a ``threading.local``: two threads (e.g. data-parallel replicas or a
validation thread) may run at different scales at once. Under ``torch.compile`` the value
is a constant of the graph, guarded on: a new scale compiles once, a scale seen before reuses
its graph. (Left alone, dynamo would turn a float that changed between compiles into a
symbolic input — ``specialize_float=False`` — and code that sizes a stencil from it could not
be traced; :func:`current_grid_scale` rebuilds the float so dynamo specialises on it.)
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator

__all__ = ["grid_scale", "current_grid_scale"]

_state = threading.local()


def current_grid_scale() -> float:
    """The grid spacing s set by the innermost active :func:`grid_scale` (1.0 outside any)."""
    # float.fromhex(x.hex()) is the identity on values; to dynamo it is a constant-folded
    # call, which makes the result a specialised (guarded) constant rather than a SymFloat.
    return float.fromhex(getattr(_state, "scale", 1.0).hex())


@contextlib.contextmanager
def grid_scale(s: float) -> Iterator[float]:
    """Run the enclosed code on a grid of spacing ``s`` reference pixels.

    Nestable (the innermost wins and the outer value comes back on exit, also on an
    exception) and per-thread. ``s`` is absolute, not relative to an enclosing scale.

    Example::

        >>> with msconv.grid_scale(2.0):      # one level coarser than the reference grid
        ...     y = layer(restrict(x))
    """
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise TypeError(
            f"grid_scale: s must be a positive number (reference pixels per pixel), got "
            f"{type(s).__name__} {s!r}; e.g. grid_scale(2.0) for one level coarser"
        )
    if not math.isfinite(s) or s <= 0:
        raise ValueError(
            f"grid_scale: s must be finite and > 0, got s={s}; s = 2**level for a level "
            "coarser than the reference grid"
        )
    prev = current_grid_scale()
    _state.scale = float(s)
    try:
        yield float(s)
    finally:
        _state.scale = prev
