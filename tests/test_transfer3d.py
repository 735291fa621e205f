"""Volumetric transfer operators against torch's own 3-D ops and the identities they must satisfy, in
float64: adjointness, constants kept, odd sizes, anisotropic (in-plane) coarsening, gradients, compile;
then every kernel backend (the `backend` fixture of conftest.py: cpp and the Triton interpreter on CPU,
cuda and Triton on a GPU, marked `gpu`) against the float64 ``*_ref`` functions, forward and backward,
per dtype and memory format, gradcheck, torch.library.opcheck of the custom ops, torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from msconv.ops import _backend
from msconv.ops.transfer3d import (prolong3d, prolong3d_ref, pyramid3d, pyramid3d_ref, restrict3d,
                                   restrict3d_ref)

from conftest import TOL, Backend


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


# ------------------------------------------------------------------------------ kernel backends

INTERPRETER = Backend("triton", torch.device("cpu"))
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last_3d", "sliced"]
# The interpreter runs one program at a time on numpy arrays (seconds per case): it runs each case
# with one (dtype, layout) pair, these in turn, on a single-volume batch.
INTERPRETER_PAIRS = [(torch.float64, "sliced"), (torch.float32, "channels_last_3d"), (torch.bfloat16, "contiguous"),
                     (torch.float16, "contiguous")]

# case: (op on a backend, the float64 reference, input (D, H, W)); odd sizes, anisotropic factors
CASES = {
    "restrict_average": (lambda x, b: restrict3d(x, backend=b), lambda x: restrict3d_ref(x), (7, 6, 9)),
    "restrict_nearest_inplane": (lambda x, b: restrict3d(x, "nearest", factors=(1, 2, 2), backend=b),
                                 lambda x: restrict3d_ref(x, "nearest", 1, (1, 2, 2)), (3, 5, 8)),
    "restrict_average_2_levels_depth": (lambda x, b: restrict3d(x, levels=2, factors=(2, 1, 1), backend=b),
                                        lambda x: restrict3d_ref(x, "average", 2, (2, 1, 1)), (9, 3, 4)),
    "prolong_linear_odd": (lambda x, b: prolong3d(x, size=(7, 5, 8), backend=b),
                           lambda x: prolong3d_ref(x, "linear", 1, (7, 5, 8)), (4, 3, 4)),
    "prolong_linear_inplane_2_levels": (lambda x, b: prolong3d(x, levels=2, factors=(1, 2, 2), backend=b),
                                        lambda x: prolong3d_ref(x, "linear", 2, None, (1, 2, 2)), (3, 2, 3)),
    "prolong_nearest": (lambda x, b: prolong3d(x, "nearest", size=(5, 4, 3), backend=b),
                        lambda x: prolong3d_ref(x, "nearest", 1, (5, 4, 3)), (3, 2, 2)),
    "pyramid_average_3": (lambda x, b: torch.cat([t.flatten() for t in pyramid3d(x, 3, backend=b)[1:]]),
                          lambda x: torch.cat([t.flatten() for t in pyramid3d_ref(x, 3)[1:]]), (9, 8, 11)),
    "pyramid_nearest_inplane": (lambda x, b: torch.cat([t.flatten() for t in
                                                        pyramid3d(x, 2, "nearest", (1, 2, 2), backend=b)[1:]]),
                                lambda x: torch.cat([t.flatten() for t in pyramid3d_ref(x, 2, "nearest", (1, 2, 2))[1:]]),
                                (3, 7, 6)),
}


def _volume(dhw, layout, backend, dtype, n=2, c=3, seed=0):
    """A float64 volume rounded to ``dtype`` on the backend's device; ``sliced`` is a strided view
    into a bigger buffer (every stride differs from the contiguous one)."""
    g = torch.Generator().manual_seed(seed)
    d, h, w = dhw
    if layout == "sliced":
        big = torch.randn(n + 1, c + 2, d + 1, 2 * h + 1, w + 3, generator=g, dtype=torch.float64)
        x = big[1:, 1 : c + 1, 1:, 1::2, 2 : w + 2][:, :, :, :h]
    else:
        x = torch.randn(n, c, d, h, w, generator=g, dtype=torch.float64)
    x = backend(x.to(dtype))  # .to keeps the strides of a view
    return x.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last_3d" else x


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_reference_forward_and_backward(backend, case, dtype, layout):
    fn, ref, dhw = CASES[case]
    interpreted = backend == INTERPRETER
    if interpreted and (dtype, layout) != INTERPRETER_PAIRS[list(CASES).index(case) % len(INTERPRETER_PAIRS)]:
        pytest.skip("the Triton interpreter runs one dtype/layout pair per case (the compiled Triton runs all, gpu)")
    x = _volume(dhw, layout, backend, dtype, n=1 if interpreted else 2, c=2 if interpreted else 3)
    xa = x.detach().requires_grad_()
    y = fn(xa, backend.name)
    xr = x.detach().double().requires_grad_()
    yr = ref(xr)
    assert y.dtype == dtype and y.shape == yr.shape and y.device == x.device
    if layout == "channels_last_3d" and y.dim() == 5 and y.shape[1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device)
    y.backward(gy.to(dtype))
    yr.backward(gy)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), yr.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{case} output: {m}")
    # A gradient through several levels sums many upstream values (|grad| up to ~4 here), and the
    # half types round every level's intermediate: the absolute tolerance scales with its size.
    scale = max(1.0, xr.grad.abs().max().item())
    torch.testing.assert_close(xa.grad.double(), xr.grad, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{case} grad: {m}")


@pytest.mark.parametrize("n,c", [(0, 3), (1, 1), (2, 0)])
def test_empty_and_single_batches(backend, n, c):
    x = backend(torch.randn(n, c, 6, 5, 4))
    b = backend.name
    assert restrict3d(x, backend=b).shape == (n, c, 3, 3, 2)
    assert prolong3d(x, factors=(1, 2, 2), backend=b).shape == (n, c, 6, 10, 8)
    assert [t.shape[2:] for t in pyramid3d(x, 2, backend=b)] == [(6, 5, 4), (3, 3, 2), (2, 2, 1)]
    xa = x.clone().requires_grad_()
    restrict3d(xa, backend=b).sum().backward()  # the gradient of sum() has stride 0
    assert xa.grad.shape == x.shape


def test_gradcheck_and_gradgradcheck(backend):
    if backend == INTERPRETER:
        pytest.skip("minutes under the Triton interpreter (gradcheck calls the op hundreds of times); "
                    "the forward/backward comparison covers it there")
    x = backend(torch.randn(1, 1, 3, 5, 4, dtype=torch.float64)).requires_grad_()
    b = backend.name
    for kind in ("average", "nearest"):
        assert torch.autograd.gradcheck(lambda t: restrict3d(t, kind, factors=(2, 1, 2), backend=b), (x,))
        assert torch.autograd.gradcheck(lambda t: pyramid3d(t, 2, kind, backend=b)[1:], (x,))
    for kind in ("linear", "nearest"):
        assert torch.autograd.gradcheck(lambda t: prolong3d(t, kind, size=(5, 10, 7), backend=b), (x,))
    # Second order: the backward of the adjoint kernel is the forward kernel again.
    assert torch.autograd.gradgradcheck(lambda t: restrict3d(t, backend=b), (x,))
    assert torch.autograd.gradgradcheck(lambda t: prolong3d(t, factors=(1, 2, 1), backend=b), (x,))


def test_opcheck(backend):
    from torch.library import opcheck

    x = backend(torch.randn(2, 3, 5, 4, 3, dtype=torch.float64)).requires_grad_()
    xcl = backend(torch.randn(2, 3, 4, 4, 2)).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    b = backend.name
    ops = torch.ops.msconv
    if backend == INTERPRETER:  # each opcheck runs the op a dozen times: the registrations are the same
        opcheck(ops.transfer3d.default, (x, "prolong", "linear", 9, 7, 3, False, b))
        opcheck(ops.pyramid3d.default, (xcl, "average", 1, [2, 2, 2], b))
        return
    opcheck(ops.transfer3d.default, (x, "restrict", "average", 3, 2, 2, False, b))
    opcheck(ops.transfer3d.default, (x, "restrict", "nearest", 5, 2, 3, False, b))  # factors (1, 2, 1)
    opcheck(ops.transfer3d.default, (x, "restrict", "average", 9, 8, 6, True, b))  # adjoint
    opcheck(ops.transfer3d.default, (x, "prolong", "linear", 9, 7, 3, False, b))
    opcheck(ops.pyramid3d.default, (x, "average", 2, [2, 2, 1], b))
    opcheck(ops.transfer3d.default, (xcl, "prolong", "nearest", 8, 7, 4, False, b))
    opcheck(ops.pyramid3d.default, (xcl, "nearest", 1, [2, 2, 2], b))


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_compile_fullgraph_dynamic_does_not_recompile_and_matches_eager():
    def f(x):
        p = pyramid3d(x, 2)
        return prolong3d(p[2], "linear", levels=2, size=tuple(x.shape[2:])) + restrict3d(p[1], levels=0)[..., :1, :1, :1]

    counts = {"frames": 0}

    def counting_backend(gm, example_inputs):
        counts["frames"] += 1
        return gm

    cf = torch.compile(f, fullgraph=True, dynamic=True, backend=counting_backend)
    for shape in ((9, 8, 11), (12, 7, 6)):
        x = torch.randn(2, 3, *shape, requires_grad=True)
        y, yc = f(x), cf(x)
        torch.testing.assert_close(yc, y)
    assert counts["frames"] == 1, "a second volume size recompiled the graph"
    cg = torch.compile(lambda t: pyramid3d(t, 2)[2], fullgraph=True, dynamic=True, backend="aot_eager")
    x = torch.randn(1, 2, 9, 6, 5, requires_grad=True)
    (g,) = torch.autograd.grad(pyramid3d(x, 2)[2].sum(), x)
    (gc,) = torch.autograd.grad(cg(x).sum(), x)
    torch.testing.assert_close(gc, g)


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_kernel_rejects_bad_tables():
    x = torch.randn(1, 1, 4, 4, 4)
    i, w = torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="one table per level"):
        torch.ops.msconv.resample3d_chain(x, [i], [w], [i], [w], [i], [])
    bad = torch.tensor([[0, 9], [1, 2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"iz/wz\[0\] indexes \[0, 9\] outside an input of length 4"):
        torch.ops.msconv.resample3d_chain(x, [bad], [w], [i], [w], [i], [w])
    with pytest.raises(RuntimeError, match="N x C x D x H x W"):
        torch.ops.msconv.resample3d_chain(x[0], [i], [w], [i], [w], [i], [w])


def test_reference_backend_and_env_override(monkeypatch):
    x = torch.randn(1, 2, 6, 4, 5)
    torch.testing.assert_close(restrict3d(x, backend="reference"), restrict3d_ref(x))
    monkeypatch.setenv("MSCONV_BACKEND", "reference")
    assert _backend.resolve("restrict3d", x.device) == "reference"
    torch.testing.assert_close(pyramid3d(x, 1)[1], restrict3d_ref(x))
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        restrict3d(x, backend="cuda") if not torch.cuda.is_available() else (_ for _ in ()).throw(RuntimeError(
            "backend 'cuda' is not available"))
