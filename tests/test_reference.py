"""The reference transfer operators against torch's own ops and the grid identities documented in
msconv/reference.py (constants preserved, odd sizes, adjoint pairs)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msconv.ops._taps import dense
from msconv.reference import PROLONG_KINDS, RESTRICT_KINDS, coarse_size, prolong_ref, pyramid_ref, restrict_ref

D = torch.float64
ADJOINT_PAIRS = [("average", "nearest"), ("full_weighting", "bilinear")]


def test_even_sizes_match_torch_ops():
    x = torch.randn(2, 3, 8, 12, dtype=D)
    torch.testing.assert_close(restrict_ref(x, "average"), F.avg_pool2d(x, 2))
    torch.testing.assert_close(restrict_ref(x, "bilinear"), F.interpolate(x, scale_factor=0.5, mode="bilinear"))
    torch.testing.assert_close(restrict_ref(x, "nearest"), F.interpolate(x, scale_factor=0.5, mode="nearest"))
    # full weighting = the antialiased bilinear downsample by 2 in the interior
    aa = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
    torch.testing.assert_close(restrict_ref(x, "full_weighting")[..., 1:-1, 1:-1], aa[..., 1:-1, 1:-1])
    torch.testing.assert_close(prolong_ref(x, "bilinear"), F.interpolate(x, scale_factor=2, mode="bilinear"))
    torch.testing.assert_close(prolong_ref(x, "nearest"), F.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("shape", [(2, 2), (3, 5), (7, 4), (9, 9), (16, 11)])
@pytest.mark.parametrize("kind", RESTRICT_KINDS)
def test_restriction_preserves_constants(kind, shape):
    x = torch.full((1, 2, *shape), 3.25, dtype=D)
    y = restrict_ref(x, kind)
    assert y.shape[-2:] == (coarse_size(shape[0]), coarse_size(shape[1]))
    torch.testing.assert_close(y, torch.full_like(y, 3.25))


@pytest.mark.parametrize("kind", PROLONG_KINDS)
def test_prolongation_preserves_constants(kind):
    y = prolong_ref(torch.full((1, 1, 3, 4), -2.0, dtype=D), kind, size=(5, 7))
    assert y.shape[-2:] == (5, 7)
    torch.testing.assert_close(y, torch.full_like(y, -2.0))


def _inner(a, b):
    return (a * b).sum().item()


@pytest.mark.parametrize("rk,pk", ADJOINT_PAIRS)
@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (2, 4)])
def test_adjoint_identity_even(rk, pk, shape):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, *shape, generator=g, dtype=D)
    v = torch.randn(2, 3, shape[0] // 2, shape[1] // 2, generator=g, dtype=D)
    lhs = _inner(restrict_ref(u, rk), v)
    rhs = 0.25 * _inner(u, prolong_ref(v, pk))
    assert abs(lhs - rhs) < 1e-12 * max(1.0, abs(lhs))


@pytest.mark.parametrize("rk,pk", ADJOINT_PAIRS)
def test_adjoint_identity_odd_sizes(rk, pk):
    """Odd sizes: exact when v vanishes on the last coarse row/column, as documented."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 2, 9, 7, generator=g, dtype=D)
    v = torch.randn(1, 2, 5, 4, generator=g, dtype=D)
    v[..., -1, :] = 0
    v[..., :, -1] = 0
    lhs = _inner(restrict_ref(u, rk), v)
    rhs = 0.25 * _inner(u, prolong_ref(v, pk, size=(9, 7)))
    assert abs(lhs - rhs) < 1e-12 * max(1.0, abs(lhs))
    # ...and, because constants are kept, it cannot hold for every v (the documented limit).
    v1 = torch.ones_like(v)
    assert abs(_inner(restrict_ref(u, rk), v1) - 0.25 * _inner(u, prolong_ref(v1, pk, size=(9, 7)))) > 1e-6


def test_average_divides_white_noise_variance_by_four():
    x = torch.randn(4, 1, 256, 256, generator=torch.Generator().manual_seed(2), dtype=D)
    ratio = x.var() / restrict_ref(x, "average").var()
    assert 3.8 < ratio < 4.2
    assert 0.9 < x.var() / restrict_ref(x, "nearest").var() < 1.1  # injection keeps it


@pytest.mark.parametrize("kind", RESTRICT_KINDS)
@pytest.mark.parametrize("shape", [(2, 3), (5, 8), (11, 6)])
def test_tap_tables_equal_reference_restriction(kind, shape):
    H, W = shape
    x = torch.randn(1, 1, H, W, dtype=D)
    Ay = torch.from_numpy(dense("restrict", kind, H, coarse_size(H)))
    Ax = torch.from_numpy(dense("restrict", kind, W, coarse_size(W)))
    torch.testing.assert_close(Ay @ x[0, 0] @ Ax.T, restrict_ref(x, kind)[0, 0])
    # the adjoint table is the transpose
    np.testing.assert_allclose(dense("restrict", kind, H, coarse_size(H), adjoint=True), Ay.numpy().T)


@pytest.mark.parametrize("kind", PROLONG_KINDS)
@pytest.mark.parametrize("fine", [(4, 6), (5, 7), (1, 3)])
def test_tap_tables_equal_reference_prolongation(kind, fine):
    H, W = fine
    h, w = coarse_size(H), coarse_size(W)
    v = torch.randn(1, 1, h, w, dtype=D)
    Ay = torch.from_numpy(dense("prolong", kind, H, h))
    Ax = torch.from_numpy(dense("prolong", kind, W, w))
    torch.testing.assert_close(Ay @ v[0, 0] @ Ax.T, prolong_ref(v, kind, size=fine)[0, 0])


def test_pyramid_ref_shapes():
    p = pyramid_ref(torch.zeros(1, 1, 13, 6), 3)
    assert [t.shape[-2:] for t in p] == [(13, 6), (7, 3), (4, 2), (2, 1)]
