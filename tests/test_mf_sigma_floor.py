"""MFConv2d(sigma_floor=f): grids too coarse for σ apply the finest resolved grid's stencil in their own pixels."""
import warnings

import pytest
import torch

import msconv
from msconv.models import build_model
from msconv.nn import MFConv2d, UnresolvedSigmaWarning


def _pair(sigma, **kw):
    torch.manual_seed(0)
    plain = MFConv2d(3, 4, 3, sigma=sigma, sigma_floor=None, **kw).double()
    floored = MFConv2d(3, 4, 3, sigma=sigma, sigma_floor=0.5, **kw).double()
    floored.load_state_dict(plain.state_dict())
    return plain, floored


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_resolved_grids_unchanged(scale):
    plain, floored = _pair(0.5)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with msconv.grid_scale(scale):
        torch.testing.assert_close(floored(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("sigma,fine", [(0.5, 1.0), (1.0, 2.0)])
def test_coarse_grid_applies_the_finest_resolved_stencil(sigma, fine):
    # σ = 0.5 is resolved up to s = 1, σ = 1 up to s = 2: coarser grids see that grid's stencil.
    plain, floored = _pair(sigma)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with msconv.grid_scale(fine):
        want = plain(x)
    for s in (2 * fine, 4 * fine):
        with msconv.grid_scale(s), warnings.catch_warnings():
            warnings.simplefilter("error", UnresolvedSigmaWarning)  # no blur warning: σ is floored
            torch.testing.assert_close(floored(x), want, rtol=1e-10, atol=1e-10)


def test_coarse_grid_trains_the_derivative_weights():
    plain, floored = _pair(0.5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    grads = []
    for layer in (plain, floored):
        with msconv.grid_scale(8.0), warnings.catch_warnings():
            warnings.simplefilter("ignore", UnresolvedSigmaWarning)
            layer(x).square().sum().backward()
        grads.append(layer.weight.grad[..., 3:].abs().mean() / layer.weight.grad[..., 0].abs().mean())
    # Second-derivative weights: a vanishing share of the gradient without the floor, a real one with it.
    assert grads[0] < 1e-3 < grads[1]


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_learnable_sigma_is_floored_and_differentiable():
    torch.manual_seed(0)
    layer = MFConv2d(2, 2, 3, sigma=0.5, learn_sigma=True, sigma_floor=0.5).double()
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    with msconv.grid_scale(4.0):
        y = layer(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_bad_sigma_floor(bad):
    with pytest.raises(ValueError, match="sigma_floor"):
        MFConv2d(2, 2, 3, sigma_floor=bad)


def test_build_model_passes_sigma_floor():
    def floors(**kw):
        return {m.sigma_floor for m in build_model("dncnn", 1, 1, "mf", depth=3, width=4, **kw).modules()
                if isinstance(m, MFConv2d)}

    assert floors(mf_sigma_floor=1.0) == {1.0}
    assert "sigma_floor=1" in repr(next(m for m in build_model("dncnn", 1, 1, "mf", depth=3, width=4,
                                                              mf_sigma_floor=1.0).modules() if isinstance(m, MFConv2d)))
    # The default is MFConv2d's (the CLI's 0.5), also when another mesh-free option is given; 0 is off.
    assert floors() == floors(mf_order=3) == {0.5}
    assert floors(mf_sigma_floor=0) == {None}
