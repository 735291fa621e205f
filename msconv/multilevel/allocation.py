"""Batch sizes per level: ``fixed``, ``paper`` and ``mlmc`` (SPEC §3).

* ``fixed`` — as given.
* ``paper`` — ``N_l = N_0 · 4**l``: every coarser level has a quarter of the pixels, so each
  level costs the same (the paper's choice).
* ``mlmc`` — Giles' optimum for a multilevel Monte Carlo estimator: minimising the variance
  ``Σ V_l / N_l`` at a fixed cost ``Σ N_l C_l = budget`` gives
  ``N_l = budget · sqrt(V_l / C_l) / Σ_k sqrt(V_k C_k)``.

What ``V_l`` measures (``MGE(variance=...)``).

* ``"gradient"`` (default): the per-sample variance of the level-l gradient term itself,
  ``tr Cov[Δg_i]`` with ``Δg_i = ∇ℓ_i(level l) − ∇ℓ_i(level l+1)`` (``∇ℓ_i(level L)`` on the
  coarsest level) — exactly the V_l of Giles' optimum. Per-sample gradients would cost more than
  the step they tune; instead the level's batch is split into halves A and B of m samples and
  ``tr Cov = m/2 · E‖Δḡ_A − Δḡ_B‖²``, where ``Δḡ_A − Δḡ_B`` is the gradient of one scalar
  (the half-batch loss differences), so it costs one extra backward pass through the graph the
  step already built, per level. It runs every step during the warm-up and every
  ``variance_every`` steps after it; its cost is booked in the step's cost.
* ``"loss"``: the variance over samples of the per-sample *loss* difference
  ``ℓ_i(level l) − ℓ_i(level l+1)``, read off the predictions the step computes anyway (free).
  Both are driven by how far the coarse model output is from the restricted fine one, but the
  loss proxy measures it in output space and tends to under-weight the fine levels (see
  bench/bench_mge.py), so it is the cheap option, not the default.

Either estimate is an exponential moving average across steps (:class:`RunningVariance`), so
one noisy batch does not swing the allocation.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["ALLOCATIONS", "RunningVariance", "paper_batch_sizes", "mlmc_batch_sizes", "round_batch"]

ALLOCATIONS = ("fixed", "paper", "mlmc")


def round_batch(n: float, multiple_of: int = 1, minimum: int = 1) -> int:
    """Round a batch size to the nearest multiple of ``multiple_of`` (e.g. the world size), at least ``minimum``."""
    m = max(multiple_of, 1)
    return max(int(round(n / m)) * m, -(-minimum // m) * m)


def paper_batch_sizes(n0: int, levels: int, multiple_of: int = 1) -> list[int]:
    """``[n0, 4 n0, 16 n0, …]`` for levels 0..``levels``."""
    return [round_batch(n0 * 4**l, multiple_of) for l in range(levels + 1)]


def mlmc_batch_sizes(
    variances: Sequence[float], costs: Sequence[float], budget: float, *, multiple_of: int = 1, minimum: int = 1
) -> list[int]:
    """Giles' allocation ``N_l ∝ sqrt(V_l / C_l)`` with ``Σ N_l C_l ≈ budget``.

    ``variances[l]`` is the per-sample variance of level l's term, ``costs[l]`` the cost of one
    sample of it (any unit, as long as ``budget`` is in the same one). A level whose variance
    is zero gets ``minimum`` samples: it still has to be evaluated to keep the sum telescoping.
    """
    if len(variances) != len(costs):
        raise ValueError(f"mlmc_batch_sizes: {len(variances)} variances but {len(costs)} costs; give one of each per level")
    if any(c <= 0 for c in costs):
        raise ValueError(f"mlmc_batch_sizes: costs must be > 0, got {list(costs)}")
    v = [max(float(x), 0.0) for x in variances]
    denom = sum(math.sqrt(vl * cl) for vl, cl in zip(v, costs))
    if denom == 0.0:
        # No information yet: spread the budget evenly over the levels' costs.
        return [round_batch(budget / (len(costs) * cl), multiple_of, minimum) for cl in costs]
    return [round_batch(budget * math.sqrt(vl / cl) / denom, multiple_of, minimum) for vl, cl in zip(v, costs)]


class RunningVariance:
    """Exponential moving averages of the per-level sample mean and variance of a scalar.

    ``update(l, values)`` takes the per-sample values of level l in one step (1-D tensor).
    ``variance[l]`` is ``None`` until level l has been seen with at least two samples.
    """

    def __init__(self, levels: int, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"RunningVariance: decay must be in [0, 1), got decay={decay}")
        self.decay = decay
        self.variance: list[float | None] = [None] * (levels + 1)
        self.mean: list[float | None] = [None] * (levels + 1)
        self.updates = [0] * (levels + 1)

    def update(self, level: int, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        if values.numel() < 2:
            return
        var, mean = torch.var_mean(values)
        self.update_variance(level, float(var), float(mean))

    def update_variance(self, level: int, var: float, mean: float = 0.0) -> None:
        """Fold in a variance measured some other way (e.g. from gradients of half batches)."""
        if self.variance[level] is None:
            self.variance[level], self.mean[level] = var, mean
        else:
            d = self.decay
            self.variance[level] = d * self.variance[level] + (1 - d) * var
            self.mean[level] = d * self.mean[level] + (1 - d) * mean
        self.updates[level] += 1

    def ready(self) -> bool:
        return all(v is not None for v in self.variance)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "variance": list(self.variance), "mean": list(self.mean), "updates": list(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.variance, self.mean, self.updates = list(state["variance"]), list(state["mean"]), list(state["updates"])
