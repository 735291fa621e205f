"""MFConv2d's two convergence properties, and that a fixed-weight nn.Conv2d has neither: outputs
converge at second order as the grid is refined (consistency), and the noise in the gradient
difference between grids s and 2s shrinks by >= 8x in variance per halving of s.

Fields live on a periodic domain of L×L reference pixels, sampled as exact cell averages of a
few Fourier modes, so the only errors are the operators' own (circular padding: no boundary
layer). Everything is seeded and float64: the numbers are deterministic.
"""
import math

import pytest
import torch
import torch.nn as nn

import msconv

L = 16  # domain size in reference pixels
FIELD = [(1.0, 1, 0, 0.3), (0.7, 1, 2, 1.1), (0.5, 2, 1, 2.0)]  # (amplitude, kx, ky, phase)
TARGET = [(1.0, 0, 1, 0.5), (0.5, 2, 2, 0.1)]


def cell_averages(n: int, modes) -> torch.Tensor:
    """Σ A sin(2π(kx·x + ky·y)/L + φ) averaged over each cell of an n×n grid (spacing L/n)."""
    s = L / n
    edges = torch.arange(n + 1, dtype=torch.float64) * s

    def avg(w):  # average of e^{iwx} over each cell
        if w == 0:
            return torch.ones(n, dtype=torch.complex128)
        return (torch.exp(1j * w * edges[1:]) - torch.exp(1j * w * edges[:-1])) / (1j * w * s)

    out = torch.zeros(n, n, dtype=torch.float64)
    for a, kx, ky, ph in modes:
        z = avg(2 * math.pi * ky / L)[:, None] * avg(2 * math.pi * kx / L)[None, :] * complex(math.cos(ph), math.sin(ph))
        out += a * z.imag
    return out


def _field(n):
    return torch.stack([cell_averages(n, FIELD), cell_averages(n, FIELD[::-1])])[None]  # [1, 2, n, n]


def _outputs_on_reference_grid(layer, levels=4):
    """Layer output at s = 1, ½, ¼, ⅛, each averaged back onto the s = 1 grid."""
    outs = []
    for lev in range(levels):
        with torch.no_grad(), msconv.grid_scale(2.0**-lev):
            y = layer(_field(L << lev))
        outs.append(msconv.restrict(y, "average", lev) if lev else y)
    return outs


@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_consistency_second_order(padding_mode):
    torch.manual_seed(0)
    # σ = 1 reference pixel: the s = 1 grid already resolves the kernel, so every halving is
    # in the asymptotic regime (errors ∝ (s/σ)²).
    mf = msconv.MFConv2d(2, 3, padding_mode=padding_mode, sigma=1.0).double()
    ys = _outputs_on_reference_grid(mf)
    d = [(ys[i + 1] - ys[i]).norm().item() for i in range(3)]
    ratios = [d[i] / d[i + 1] for i in range(2)]
    assert all(r >= 3.0 for r in ratios), (d, ratios)  # second order: ≈ 4 per halving
    assert d[0] < 0.05 * ys[0].norm()  # and the s = 1 output already is close to the limit


def test_fixed_conv2d_is_not_consistent():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").double()
    mf = msconv.MFConv2d(2, 3, padding_mode="circular", sigma=1.0).double()
    yc, ym = _outputs_on_reference_grid(conv), _outputs_on_reference_grid(mf)
    d = [(yc[i + 1] - yc[i]).norm().item() for i in range(3)]
    # A fixed stencil shrinks with the pixels: y(s) → (Σ w)·u at first order (≈ 2× per halving),
    # a different operator from the one it computes at s = 1.
    assert all(d[i] / d[i + 1] < 3.0 for i in range(2)), d
    drift_conv = (yc[3] - yc[0]).norm() / yc[0].norm()
    drift_mf = (ym[3] - ym[0]).norm() / ym[0].norm()
    assert drift_conv > 0.2 and drift_conv > 10 * drift_mf, (drift_conv, drift_mf)


def _grad_difference_stats(layer, draws=32, noise=0.5):
    """Per fine level s = ½, ¼, ⅛: (Σ variance, ‖mean‖) over noise draws of ∇θ ℓ(s) − ∇θ ℓ(2s).

    The fine input is the smooth field plus white noise of fixed per-pixel variance; the coarse
    input (and target) is its `average` restriction, so both terms see the same noise. ℓ is the
    mean squared error over channels and pixels. All draws run in one call as ``groups=draws``
    with one copy of the layer's weight per group, so each copy's gradient is one draw's.
    """
    c_in, c_out = layer.in_channels, layer.out_channels
    if isinstance(layer, msconv.MFConv2d):
        def apply(u, w, s):
            return msconv.mf_conv2d(u, w, None, layer.sigma.item(), s, 1, "circular", groups=draws)
    else:
        def apply(u, w, s):  # a fixed stencil ignores the grid scale
            return nn.functional.conv2d(nn.functional.pad(u, (1, 1, 1, 1), mode="circular"), w, groups=draws)

    def grads(u, t, s):
        w = layer.weight.detach().repeat(draws, *([1] * (layer.weight.dim() - 1))).requires_grad_()
        per_draw = (apply(u, w, s) - t).square().mean(dim=(0, 2, 3)).view(draws, c_out).mean(1)
        (g,) = torch.autograd.grad(per_draw.sum(), w)
        return g.view(draws, -1)

    stats = []
    for lev in (1, 2, 3):
        n, s = L << lev, 2.0**-lev
        g = torch.Generator().manual_seed(100 + lev)
        u = _field(n).repeat(1, draws, 1, 1)
        u = u + noise * torch.randn(u.shape, generator=g, dtype=torch.float64)  # [1, draws·C_in, n, n]
        t_fine = cell_averages(n, TARGET).expand(1, draws * c_out, n, n)
        dd = grads(u, t_fine, s) - grads(msconv.restrict(u), msconv.restrict(t_fine), 2 * s)
        stats.append((dd.var(0).sum().item(), dd.mean(0).norm().item()))
    return stats


def test_gradient_convergence_under_noise():
    torch.manual_seed(0)
    mf = msconv.MFConv2d(2, 3, padding_mode="circular").double()  # σ = ½ (kernel_size 3)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular").double()
    var_mf, mean_mf = zip(*_grad_difference_stats(mf))
    var_cv, mean_cv = zip(*_grad_difference_stats(conv))
    r_mf = [var_mf[i] / var_mf[i + 1] for i in range(2)]
    r_cv = [var_cv[i] / var_cv[i + 1] for i in range(2)]
    # Measured (seeded): MFC ≈ 30×, 23×; Conv2d ≈ 8×, 5× and heading for 4× (the 1/#pixels of
    # the loss's mean), because its noise-squared term does not shrink with the grid.
    assert all(r >= 8 for r in r_mf), r_mf
    assert all(c < m / 2 for c, m in zip(r_cv, r_mf)) and r_cv[-1] < 8, (r_cv, r_mf)
    # The mean of the difference (the bias between levels) vanishes for MFC, not for Conv2d.
    assert mean_mf[0] / mean_mf[2] > 9 and mean_cv[0] / mean_cv[2] < 5, (mean_mf, mean_cv)
