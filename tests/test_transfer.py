"""restrict / prolong / pyramid on every available backend against msconv.reference."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import msconv
from conftest import TOL
from msconv.ops import _backend
from msconv.reference import PROLONG_KINDS, RESTRICT_KINDS, prolong_ref, pyramid_ref, restrict_ref


def _triton_usable():
    # These tests use CPU tensors, which Triton runs only under its interpreter; on a GPU host the
    # compiled Triton kernels are tested on CUDA tensors in test_backend_devices.py.
    if not (_backend.has_triton() and _backend.triton_interpret()):
        return False
    try:
        return importlib.import_module("msconv.triton.resample").HAS_TRITON
    except ImportError:
        return False


BACKENDS = (["cpp"] if _backend.has_cpp() else []) + (["triton"] if _triton_usable() else [])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 2), (3, 5), (8, 8), (17, 9)]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def _skip_unsupported(backend, dtype):
    # Every backend handles every dtype (the Triton kernel loads bf16 and accumulates in
    # fp32, which the interpreter supports); kept as the one place to add a real exception.
    return None


def _make(shape, dtype, layout, n=2, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        # A view into a bigger buffer: every stride differs from the contiguous one.
        big = torch.randn(n + 1, c + 2, shape[0] * 2 + 1, shape[1] + 3, generator=g, dtype=torch.float64)
        x64 = big[1:, 1 : c + 1, 1 : 2 * shape[0] + 1 : 2, 2 : shape[1] + 2]
    else:
        x64 = torch.randn(n, c, *shape, generator=g, dtype=torch.float64)
    x = x64.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _grad_pair(fn, ref, x, seed=1):
    """(out, grad) of the op and of the float64 reference for the same upstream gradient."""
    xa = x.detach().requires_grad_()
    y = fn(xa)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y.backward(gy.to(y.dtype))
    xr = x.detach().double().requires_grad_()
    yr = ref(xr)
    yr.backward(gy)
    return y, xa.grad, yr, xr.grad


def _close(a, b, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", RESTRICT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_restrict_forward_backward(backend, kind, dtype, layout):
    _skip_unsupported(backend, dtype)
    shapes = SHAPES if backend == "cpp" else [(3, 5), (8, 8)]
    for shape in shapes:
        x = _make(shape, dtype, layout)
        y, g, yr, gr = _grad_pair(lambda t: msconv.restrict(t, kind, backend=backend), lambda t: restrict_ref(t, kind), x)
        assert y.dtype == dtype and y.shape == yr.shape
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last)
        _close(y, yr, dtype)
        _close(g, gr, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", PROLONG_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_prolong_forward_backward(backend, kind, dtype, layout):
    _skip_unsupported(backend, dtype)
    for shape, size in [((2, 3), None), ((3, 5), (5, 9)), ((1, 1), (1, 2)), ((4, 4), (7, 8))]:
        x = _make(shape, dtype, layout)
        y, g, yr, gr = _grad_pair(
            lambda t: msconv.prolong(t, kind, size=size, backend=backend), lambda t: prolong_ref(t, kind, size=size), x
        )
        assert y.shape == yr.shape
        _close(y, yr, dtype)
        _close(g, gr, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", RESTRICT_KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_pyramid_and_multilevel(backend, kind, dtype):
    shape = (19, 12) if backend == "cpp" else (9, 6)
    x = _make(shape, dtype, "contiguous", n=1, c=4)
    levels = 3
    pyr = msconv.pyramid(x, levels, kind, backend=backend)
    ref = pyramid_ref(x.double(), levels, kind)
    assert pyr[0] is x and len(pyr) == levels + 1
    for a, b in zip(pyr, ref):
        _close(a, b, dtype)
    # pyramid equals chained restrict on the same backend
    chained = x
    for lvl in pyr[1:]:
        chained = msconv.restrict(chained, kind, backend=backend)
        _close(lvl, chained, dtype)
    # gradient through every level at once
    xa = x.detach().requires_grad_()
    loss = sum((lvl.double() * (i + 1)).sum() for i, lvl in enumerate(msconv.pyramid(xa, levels, kind, backend=backend)[1:]))
    loss.backward()
    xr = x.detach().double().requires_grad_()
    sum((lvl * (i + 1)).sum() for i, lvl in enumerate(pyramid_ref(xr, levels, kind)[1:])).backward()
    _close(xa.grad, xr.grad, dtype)
    # restrict(levels=L) and prolong(levels=L)
    _close(msconv.restrict(x, kind, levels=2, backend=backend), restrict_ref(x.double(), kind, 2), dtype)
    c = pyr[-1]
    _close(msconv.prolong(c, "bilinear", levels=3, size=shape, backend=backend), prolong_ref(c.double(), "bilinear", 3, shape), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c", [(0, 3), (1, 1), (2, 0)])
def test_empty_and_single_batches(backend, n, c):
    x = torch.randn(n, c, 6, 5)
    assert msconv.restrict(x, backend=backend).shape == (n, c, 3, 3)
    assert msconv.prolong(x, backend=backend).shape == (n, c, 12, 10)
    assert [t.shape for t in msconv.pyramid(x, 2, backend=backend)] == [(n, c, 6, 5), (n, c, 3, 3), (n, c, 2, 2)]
    xa = x.clone().requires_grad_()
    msconv.restrict(xa, backend=backend).sum().backward()
    assert xa.grad.shape == x.shape


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_gradcheck_and_gradgradcheck():
    x = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    for kind in RESTRICT_KINDS:
        f = lambda t: msconv.restrict(t, kind, backend="cpp")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))
        assert torch.autograd.gradcheck(lambda t: msconv.pyramid(t, 2, kind, backend="cpp")[1:], (x,))
    for kind in PROLONG_KINDS:
        f = lambda t: msconv.prolong(t, kind, size=(9, 13), backend="cpp")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_opcheck():
    from torch.library import opcheck

    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    xcl = torch.randn(2, 3, 8, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    for t in (x, xcl):
        for kind in RESTRICT_KINDS:
            opcheck(torch.ops.msconv.transfer2d.default, (t, "restrict", kind, 4, 3, False, "cpp"))
            opcheck(torch.ops.msconv.transfer2d.default, (t, "restrict", kind, 13 if t.shape[2] == 7 else 15, 11, True, "cpp"))
            opcheck(torch.ops.msconv.pyramid.default, (t, kind, 2, "cpp"))
        opcheck(torch.ops.msconv.transfer2d.default, (t, "prolong", "bilinear", 2 * t.shape[2] - 1, 2 * t.shape[3], False, "cpp"))


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_torch_compile_fullgraph_matches_eager():
    def f(x):
        p = msconv.pyramid(x, 2, "full_weighting")
        return msconv.prolong(p[2], "bilinear", levels=2, size=tuple(x.shape[2:])) + msconv.restrict(p[1], levels=0)[..., :1, :1]

    x = torch.randn(2, 3, 11, 8, requires_grad=True)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, yc = f(x), cf(x)
    torch.testing.assert_close(yc, y)
    (g,) = torch.autograd.grad(y.sum(), x)
    (gc,) = torch.autograd.grad(cf(x).sum(), x)
    torch.testing.assert_close(gc, g)


def test_reference_backend_and_env_override(monkeypatch):
    x = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(msconv.restrict(x, backend="reference"), restrict_ref(x))
    monkeypatch.setenv("MSCONV_BACKEND", "reference")
    assert _backend.resolve("restrict", x.device) == "reference"
    monkeypatch.setenv("MSCONV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MSCONV_BACKEND='bogus'"):
        msconv.restrict(x)
    monkeypatch.delenv("MSCONV_BACKEND")
    assert _backend.resolve("restrict", x.device) == ("cpp" if _backend.has_cpp() else "reference")


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: msconv.restrict(torch.randn(3, 8, 8)), ValueError, r"x must have 4 dimensions.*x.shape=\(3, 8, 8\)"),
        (lambda: msconv.restrict(torch.ones(1, 1, 8, 8, dtype=torch.int64)), TypeError, r"x.dtype=torch.int64.*x.float\(\)"),
        (lambda: msconv.restrict(torch.randn(1, 1, 4, 4), levels=3), ValueError, r"at most 2 level.*levels=3"),
        (lambda: msconv.pyramid(torch.randn(1, 1, 1, 9), 1), ValueError, r"at most 0 level"),
        (lambda: msconv.restrict(torch.randn(1, 1, 4, 4), kind="cubic"), ValueError, r"unknown kind='cubic'"),
        (lambda: msconv.prolong(torch.randn(1, 1, 4, 4), kind="average"), ValueError, r"unknown kind='average'"),
        (lambda: msconv.restrict(torch.randn(1, 1, 4, 4), levels=-1), ValueError, r"levels must be >= 0"),
        (lambda: msconv.restrict(torch.randn(1, 1, 4, 4), levels=1.0), TypeError, r"levels must be an int"),
        (lambda: msconv.prolong(torch.randn(1, 1, 4, 4), size=(9, 8)), ValueError, r"size=\(9, 8\) does not fit"),
        (lambda: msconv.prolong(torch.randn(1, 1, 4, 4), size=(8,)), ValueError, r"pair of positive ints"),
        (lambda: msconv.restrict(torch.randn(1, 1, 4, 4), backend="fast"), ValueError, r"unknown backend='fast'"),
        (lambda: msconv.restrict(torch.randn(1, 1, 4, 4, device="meta"), backend="cpp"), RuntimeError, r"CPU tensors, x is on meta"),
        (lambda: msconv.restrict(torch.randn(1, 1, 4, 4), backend="cuda"), RuntimeError, r"backend 'cuda' is not available"),
        (lambda: msconv.restrict([[1.0]]), TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_kernel_rejects_bad_tables():
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="one table per level"):
        torch.ops.msconv.resample2d_chain(x, [torch.zeros(2, 2, dtype=torch.int32)], [], [], [])
    bad = torch.tensor([[0, 9], [1, 2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside an input of length 4"):
        torch.ops.msconv.resample2d_chain(x, [bad], [torch.ones(2, 2)], [bad], [torch.ones(2, 2)])


def test_info_and_cli():
    d = msconv.info()
    assert {"version", "torch", "cpp_ops", "cuda_ops", "triton", "backends"} <= set(d)
    assert d["backends"]["cpu"]["restrict"] in ("cpp", "reference")
    out = subprocess.run([sys.executable, "-m", "msconv", "info"], capture_output=True, text=True, check=True,
                         env={**os.environ, "MSCONV_BACKEND": "reference"}).stdout
    assert "compiled CPU ops" in out and "restrict  -> reference" in out


def test_missing_extension_falls_back_to_reference_and_says_so_once():
    code = (
        "import sys, warnings\n"
        "sys.modules['msconv._C'] = None  # makes `from msconv import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, msconv\n"
        "    import msconv.ops._backend as b\n"
        "    x = torch.rand(1, 2, 6, 6)\n"
        "    y = msconv.restrict(x); msconv.restrict(x)\n"
        "msgs = [str(m.message) for m in w if issubclass(m.category, b.ExtensionWarning)]\n"
        "assert len(msgs) == 1 and 'pip install --no-build-isolation' in msgs[0], msgs\n"
        "assert msconv.info()['cpp_ops'] is False and msconv.info()['backends']['cpu']['restrict'] == 'reference'\n"
        "assert torch.allclose(y, torch.nn.functional.avg_pool2d(x, 2))\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MSCONV_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
