"""Volumetric transfer operators against torch's own 3-D ops and the identities they must satisfy, in
float64: adjointness, constants kept, odd sizes, anisotropic (in-plane) coarsening, gradients, compile."""
import pytest
import torch
import torch.nn.functional as F

from msconv.ops.transfer3d import prolong3d, pyramid3d, restrict3d

from conftest import TOL


def test_average_restriction_is_avg_pool3d_and_linear_prolongation_is_trilinear():
    x = torch.rand(2, 3, 8, 12, 4, dtype=torch.float64)
    torch.testing.assert_close(restrict3d(x), F.avg_pool3d(x, 2))
    torch.testing.assert_close(restrict3d(x, levels=2), F.avg_pool3d(F.avg_pool3d(x, 2), 2))
    c = torch.rand(2, 3, 4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(prolong3d(c), F.interpolate(c, scale_factor=2, mode="trilinear", align_corners=False))
    torch.testing.assert_close(prolong3d(c, "nearest"), F.interpolate(c, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 1)])
@pytest.mark.parametrize("shape", [(8, 6, 10), (7, 5, 9), (3, 4, 2)])
def test_restriction_adjoint_is_nearest_prolongation_scaled_and_constants_are_kept(factors, shape):
    x = torch.rand(1, 2, *shape, dtype=torch.float64)
    rx = restrict3d(x, factors=factors)
    assert rx.shape[2:] == tuple(-(-n // f) for n, f in zip(shape, factors))
    torch.testing.assert_close(restrict3d(torch.full_like(x, 0.7), factors=factors), torch.full_like(rx, 0.7))
    torch.testing.assert_close(prolong3d(torch.full_like(rx, 0.3), size=shape, factors=factors),
                               torch.full_like(x, 0.3))
    if all(n % 2 == 0 or f == 1 for n, f in zip(shape, factors)):
        # <R x, y> = <x, R^T y>, R^T y = nearest prolongation / (voxels per coarse voxel)
        y = torch.rand_like(rx)
        rty = prolong3d(y, "nearest", factors=factors) / (factors[0] * factors[1] * factors[2])
        torch.testing.assert_close((rx * y).sum(), (x * rty).sum())


def test_odd_sizes_round_trip_and_pyramid_chains():
    x = torch.rand(1, 1, 7, 5, 9, dtype=torch.float64)
    levels = pyramid3d(x, 2)
    assert [t.shape[2:] for t in levels] == [(7, 5, 9), (4, 3, 5), (2, 2, 3)]
    assert torch.equal(levels[2], restrict3d(x, levels=2))
    assert prolong3d(levels[2], levels=2, size=(7, 5, 9)).shape[2:] == (7, 5, 9)
    with pytest.raises(ValueError, match="does not fit"):
        prolong3d(levels[2], levels=2, size=(9, 5, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_follows_float64(dtype):
    x = torch.rand(1, 2, 6, 8, 4, dtype=torch.float64)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(restrict3d(x.to(dtype)).double(), restrict3d(x), atol=atol, rtol=rtol)
    torch.testing.assert_close(prolong3d(x.to(dtype)).double(), prolong3d(x), atol=atol, rtol=rtol)


def test_gradients_and_compile_with_dynamic_shapes():
    x = torch.rand(1, 1, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: restrict3d(t, factors=(1, 2, 2)), (x,))
    assert torch.autograd.gradcheck(lambda t: prolong3d(t, size=(8, 9, 6)), (x,))
    f = torch.compile(lambda t: prolong3d(restrict3d(t), "linear"), dynamic=True, fullgraph=True, backend="aot_eager")
    for shape in ((8, 6, 10), (4, 8, 6)):
        t = torch.rand(1, 2, *shape)
        torch.testing.assert_close(f(t), prolong3d(restrict3d(t)))


@pytest.mark.parametrize("call,match", [
    (lambda: restrict3d(torch.rand(1, 1, 4, 4)), "5 dimensions"),
    (lambda: restrict3d(torch.rand(1, 1, 4, 4, 4), kind="median"), "kind"),
    (lambda: restrict3d(torch.rand(1, 1, 4, 4, 4), factors=(2, 3, 2)), "factors"),
    (lambda: restrict3d(torch.rand(1, 1, 1, 4, 4)), "cannot be coarsened"),
    (lambda: restrict3d(torch.rand(1, 1, 4, 4, 4).long()), "floating"),
    (lambda: prolong3d(torch.rand(1, 1, 2, 2, 2), levels=-1), "levels"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
