"""1-D transfer operators as padded sparse rows ("tap tables") that every kernel consumes.

A 2-D transfer operator is separable, ``A_y ⊗ A_x``; each 1-D factor is stored as two arrays
``idx`` (n_out, K) int32 and ``w`` (n_out, K) float32 with ``out[i] = Σ_k w[i,k] in[idx[i,k]]``
(unused slots have weight 0). The adjoint is the transposed matrix in the same form, so a
backward pass is a gather like the forward: no atomics. All weights are multiples of 1/8 and
exact in float32. The definitions follow msconv/reference.py (tests compare the two).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from msconv.reference import coarse_size


def _restrict_coo(kind: str, n_fine: int):
    m = coarse_size(n_fine)
    I = np.arange(m)
    if kind in ("average", "bilinear"):
        offs, ws = (0, 1), (0.5, 0.5)
    elif kind == "full_weighting":
        offs, ws = (-1, 0, 1, 2), (0.125, 0.375, 0.375, 0.125)
    elif kind == "nearest":
        offs, ws = (0,), (1.0,)
    else:
        raise ValueError(f"kind={kind!r} is not a restriction")
    rows = np.concatenate([I for _ in offs])
    # Edge replication past the border (and to even size) is a clamp of the tap index.
    cols = np.concatenate([np.clip(2 * I + o, 0, n_fine - 1) for o in offs])
    vals = np.concatenate([np.full(m, w) for w in ws])
    return rows, cols, vals, m, n_fine


def _prolong_coo(kind: str, n_fine: int, n_coarse: int):
    i = np.arange(n_fine)
    k = i // 2
    if kind == "nearest":
        return i, k, np.ones(n_fine), n_fine, n_coarse
    if kind == "bilinear":
        # Cell centres: fine 2k sits a quarter cell left of coarse k, fine 2k+1 a quarter right.
        other = np.clip(np.where(i % 2 == 0, k - 1, k + 1), 0, n_coarse - 1)
        rows = np.concatenate([i, i])
        cols = np.concatenate([k, other])
        vals = np.concatenate([np.full(n_fine, 0.75), np.full(n_fine, 0.25)])
        return rows, cols, vals, n_fine, n_coarse
    raise ValueError(f"kind={kind!r} is not a prolongation")


def _to_ell(rows, cols, vals, n_out, n_in):
    key = rows.astype(np.int64) * n_in + cols
    uniq, inv = np.unique(key, return_inverse=True)
    summed = np.bincount(inv, weights=vals, minlength=len(uniq))
    r, c = uniq // n_in, uniq % n_in
    counts = np.bincount(r, minlength=n_out)
    K = max(int(counts.max()) if n_out else 1, 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(uniq)) - starts[r]
    idx = np.zeros((n_out, K), np.int32)
    w = np.zeros((n_out, K), np.float32)
    # Padding slots repeat the row's first tap with weight 0: a valid address for every kernel.
    first = np.zeros(n_out, np.int32)
    has = counts > 0
    first[has] = c[starts[has]]
    idx[:, :] = first[:, None]
    idx[r, slot] = c
    w[r, slot] = summed
    return idx, w


@functools.lru_cache(maxsize=512)
def taps_numpy(direction: str, kind: str, n_fine: int, n_coarse: int, adjoint: bool):
    """(idx, w) of the 1-D operator, or of its transpose when ``adjoint``."""
    if direction == "restrict":
        rows, cols, vals, n_out, n_in = _restrict_coo(kind, n_fine)
    else:
        rows, cols, vals, n_out, n_in = _prolong_coo(kind, n_fine, n_coarse)
    if adjoint:
        rows, cols, n_out, n_in = cols, rows, n_in, n_out
    return _to_ell(rows, cols, vals, n_out, n_in)


@functools.lru_cache(maxsize=512)
def taps(direction: str, kind: str, n_fine: int, n_coarse: int, adjoint: bool, device: torch.device):
    idx, w = taps_numpy(direction, kind, n_fine, n_coarse, adjoint)
    return torch.from_numpy(idx).to(device), torch.from_numpy(w).to(device)


def dense(direction: str, kind: str, n_fine: int, n_coarse: int, adjoint: bool = False) -> np.ndarray:
    """The 1-D operator as a dense matrix (for tests and documentation)."""
    idx, w = taps_numpy(direction, kind, n_fine, n_coarse, adjoint)
    n_in = (n_fine if direction == "restrict" else n_coarse) if not adjoint else (
        n_coarse if direction == "restrict" else n_fine)
    A = np.zeros((idx.shape[0], n_in))
    np.add.at(A, (np.arange(idx.shape[0])[:, None].repeat(idx.shape[1], 1), idx), w)
    return A
