"""Grid convergence of MFConv3d against MFConv2d: outputs and gradients, side by side.

A smooth field (a few Fourier modes on a box of L reference units per axis, sampled as exact
cell averages) is fed to the layer on grids of spacing s = 1, ½, ¼, … (n = L/s cells per axis);
the loss is the mean squared difference to a smooth target. For each grid the output, the
gradient of the loss with respect to the input (scaled by the cell count, i.e. as a density, so
that grids compare) and with respect to the weight and bias are brought onto the s = 1 grid (the
fields by ``average`` restriction). The error of level l is the norm of level l+1 minus level l
(fine minus coarse; RMS for fields), and the observed order log2(e_l / e_{l+1}); 2 means second
order, errors ∝ s². Both layers use σ = 1 reference unit (resolved on every grid, so every
halving is in the asymptotic regime), order 2, zero padding, float64, the same seed.

    python bench/mfconv3d_convergence.py [--levels 4] [--out bench/results/mfconv3d_convergence.csv]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, env_columns, table, write_csv  # noqa: E402

import msconv  # noqa: E402
from msconv.ops import restrict3d  # noqa: E402

L = 8  # box size in reference units
FIELD = [(1.0, (1, 0, 1), 0.3), (0.7, (1, 2, 0), 1.1), (0.5, (2, 1, 1), 2.0)]  # (amplitude, wavenumbers W, H, D, phase)
TARGET = [(1.0, (0, 1, 1), 0.5), (0.5, (2, 2, 1), 0.1)]
QUANTITIES = ("output", "grad_input", "grad_weight", "grad_bias")


def cell_averages(n: int, modes, dim: int) -> torch.Tensor:
    """``[n]*dim`` (D, H, W order): Σ A sin(2π k·x/L + φ) averaged over each cell of spacing L/n; in 2-D the
    depth wavenumber is dropped."""
    s = L / n
    edges = torch.arange(n + 1, dtype=torch.float64) * s

    def avg(k):  # average of e^{iωx} over each cell
        if k == 0:
            return torch.ones(n, dtype=torch.complex128)
        w = 2 * math.pi * k / L
        return (torch.exp(1j * w * edges[1:]) - torch.exp(1j * w * edges[:-1])) / (1j * w * s)

    out = torch.zeros([n] * dim, dtype=torch.float64)
    for a, ks, ph in modes:
        z = torch.ones([1] * dim, dtype=torch.complex128) * complex(math.cos(ph), math.sin(ph))
        for axis, k in enumerate(ks[:dim]):  # axis 0 = W (last), 1 = H, 2 = D
            shape = [1] * dim
            shape[dim - 1 - axis] = n
            z = z * avg(k).view(shape)
        out += a * z.imag
    return out


def _layer(dim: int, seed: int = 0):
    torch.manual_seed(seed)
    if dim == 2:
        return msconv.MFConv2d(2, 3, 3, sigma=1.0).double()
    return msconv.MFConv3d(2, 3, 3, sigma=1.0).double()


def _to_reference_grid(y: torch.Tensor, levels: int) -> torch.Tensor:
    if levels == 0:
        return y
    return msconv.restrict(y, "average", levels) if y.dim() == 4 else restrict3d(y, "average", levels)


def level_quantities(layer, dim: int, level: int) -> dict:
    """Output, density of the input gradient (both on the s = 1 grid), weight and bias gradients, on the grid
    of spacing 2^-level."""
    n = L << level
    x = torch.stack([cell_averages(n, FIELD, dim), cell_averages(n, FIELD[::-1], dim)])[None].requires_grad_()
    target = torch.stack([cell_averages(n, TARGET, dim), cell_averages(n, TARGET[::-1], dim),
                          cell_averages(n, FIELD[1:], dim)])[None]
    layer.zero_grad()
    with msconv.grid_scale(2.0 ** -level):
        y = layer(x)
    (y - target).square().mean().backward()
    return {"output": _to_reference_grid(y.detach(), level),
            "grad_input": _to_reference_grid(x.grad * n ** dim, level),
            "grad_weight": layer.weight.grad.clone(), "grad_bias": layer.bias.grad.clone()}


def measure(dim: int, levels: int) -> dict:
    """``{quantity: (errors [levels − 1], orders [levels − 2])}`` for the 2-D or 3-D layer."""
    layer = _layer(dim)
    per_level = [level_quantities(layer, dim, lev) for lev in range(levels)]
    out = {}
    for q in QUANTITIES:
        errs = []
        for a, b in zip(per_level[1:], per_level[:-1]):
            d = a[q] - b[q]
            errs.append(float(d.square().mean().sqrt()) if d.dim() > 3 else float(d.norm()))
        out[q] = (errs, [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=int, default=4, help="grids s = 1 … 2^-(levels-1) (default 4)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(RESULTS, "mfconv3d_convergence.csv"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, env = [], env_columns(torch.device("cpu"))
    for dim in (2, 3):
        t0 = time.perf_counter()
        res = measure(dim, args.levels)
        seconds = time.perf_counter() - t0
        for q, (errs, orders) in res.items():
            for i, e in enumerate(errs):
                rows.append({"dim": dim, "quantity": q, "fine_scale": 2.0 ** -(i + 1), "coarse_scale": 2.0 ** -i,
                             "fine_minus_coarse": f"{e:.4e}", "order": f"{orders[i - 1]:.3f}" if i else "",
                             "sigma": 1.0, "L": L, "seconds": f"{seconds:.1f}", **env})
    write_csv(rows, args.out)
    print(table(rows, ["dim", "quantity", "fine_scale", "coarse_scale", "fine_minus_coarse", "order"]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
