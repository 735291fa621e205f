"""msconv::mf_jets (the mesh-free convolution jets) on every available backend against
msconv.reference.mf_jets_ref: forward, gradients w.r.t. xp and filt, dtypes, layouts, odd and
tiny sizes, gradcheck/gradgradcheck, opcheck, torch.compile and errors."""
import importlib

import pytest
import torch

from conftest import TOL
from msconv.ops import _backend
mj = importlib.import_module("msconv.ops.mf_jets")  # the module (msconv.ops.mf_jets is also the function)
from msconv.reference import mf_jets_ref, mf_multi_indices, mf_taps


def _triton_usable():
    # These tests use CPU tensors, which Triton runs only under its interpreter; on a GPU host the
    # compiled Triton kernels are tested on CUDA tensors in test_backend_devices.py.
    if not (_backend.has_triton() and _backend.triton_interpret()):
        return False
    try:
        return importlib.import_module("msconv.triton.mf_jets").HAS_TRITON
    except ImportError:
        return False


KERNELS = (["cpp"] if _backend.has_cpp() else []) + (["triton"] if _triton_usable() else [])
BACKENDS = KERNELS + ["reference"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny problems: with the cores shared, intra-op thread wake-ups dominate every call.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _make(n, c, hp, wp, dtype, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        big = torch.randn(n + 1, c + 2, 2 * hp + 1, wp + 3, generator=g, dtype=torch.float64)
        x = big[1:, 1 : c + 1, 1 : 2 * hp + 1 : 2, 2 : wp + 2]
    else:
        x = torch.randn(n, c, hp, wp, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _filt(order, k, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(order + 1, k, generator=g, dtype=torch.float64) / k).to(dtype)


def _close(a, b, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), atol=atol * scale, rtol=rtol)


def _check(backend, x, f, order, stride, grads=True):
    """Forward and both gradients of the op against the float64 reference."""
    dtype = x.dtype
    xa = x.detach().requires_grad_(grads)
    fa = f.detach().requires_grad_(grads)
    y = mj.mf_jets(xa, fa, order, stride, backend=backend)
    xr = x.detach().double().requires_grad_(grads)
    fr = f.detach().double().requires_grad_(grads)
    yr = mf_jets_ref(xr, fr, order, stride)
    assert y.shape == yr.shape and y.dtype == dtype
    if backend != "reference" and mj._is_cl(x):
        assert y.is_contiguous(memory_format=torch.channels_last)
    _close(y, yr, dtype)
    if not grads or y.numel() == 0:
        return
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    gx, gf = torch.autograd.grad(y, (xa, fa), gy)
    gxr, gfr = torch.autograd.grad(yr, (xr, fr), gy.double())
    assert gx.shape == x.shape and gx.dtype == dtype and gf.dtype == f.dtype
    _close(gx, gxr, dtype)
    # dfilt sums over every pixel: scale atol by the number of terms' magnitude
    _close(gf, gfr, dtype, scale=max(1.0, gfr.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_orders_strides(backend, order, stride):
    # K odd and even; sizes whose (Hp - K) is not a multiple of the stride
    for k, hp, wp in [(5, 13, 11), (4, 9, 12)] if backend != "triton" else [(5, 12, 11)]:
        _check(backend, _make(2, 2, hp, wp, torch.float64), _filt(order, k), order, stride)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_dtypes_layouts(backend, dtype, layout):
    _check(backend, _make(2, 3, 14, 13, dtype, layout), _filt(2, 6, dtype), 2, 2)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("n,c,hp,wp,k,stride", [
    (1, 1, 1, 1, 1, 1),  # 1x1 everything
    (1, 1, 7, 7, 7, 2),  # Hp == K: one output pixel
    (1, 2, 7, 30, 7, 3),  # one output row, wide
    (3, 1, 40, 8, 8, 1),  # tall, one-ish column set
    (0, 3, 9, 9, 3, 1),  # empty batch
    (2, 0, 9, 9, 3, 1),  # no channels
])
def test_tiny_and_empty(backend, n, c, hp, wp, k, stride):
    if backend == "triton":
        hp = min(hp, 20)  # the interpreter is slow; the tall case is covered by cpp
    x = _make(n, c, hp, wp, torch.float64)
    _check(backend, x, _filt(2, k), 2, stride)
    _check(backend, x.contiguous(memory_format=torch.channels_last), _filt(1, k), 1, stride)


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_threads_and_real_taps(layout):
    # Large enough that every thread gets rows; the real Gaussian-derivative taps at s = 1/4.
    torch.set_num_threads(2)
    taps, _ = mf_taps(3, 0.5, 0.25, stride=2)
    f = taps.flip(-1).float()
    x = _make(2, 5, 48, 45, torch.float32, layout)
    _check("cpp", x, f, 3, 2)


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_gradcheck_gradgradcheck():
    for order, stride, k in [(1, 1, 3), (2, 2, 4)]:
        x = _make(1, 2, 7, 8, torch.float64).requires_grad_()
        f = _filt(order, k).requires_grad_()
        fn = lambda a, b: mj.mf_jets(a, b, order, stride, backend="cpp")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, f))
        assert torch.autograd.gradgradcheck(fn, (x, f))


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    x = _make(2, 2, 9, 10, torch.float64)
    f = _filt(2, 4)
    torch.library.opcheck(torch.ops.msconv.mf_jets.default, (x, f, 2, 2, backend))
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.msconv.mf_jets.default, (xcl, f[:2], 1, 1, backend))
    g = torch.randn(2, 12, 3, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.msconv.mf_jets_adjoint.default, (g, f, 2, 2, 9, 10, backend))


@pytest.mark.parametrize("backend", KERNELS)
def test_compile_fullgraph(backend):
    x = _make(1, 2, 11, 10, torch.float32).requires_grad_()
    f = _filt(2, 5, torch.float32).requires_grad_()
    fn = lambda a, b: mj.mf_jets(a, b, 2, 2, backend=backend).square().sum()  # noqa: E731
    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    gx, gf = torch.autograd.grad(cfn(x, f), (x, f))
    ex, ef = torch.autograd.grad(fn(x, f), (x, f))
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gf, ef)


@pytest.mark.parametrize("backend", KERNELS)
def test_adjoint_identity(backend):
    # <J(x), g> == <x, J^T(g)> with an upstream gradient of any strides (sum() expands it)
    x = _make(1, 3, 12, 9, torch.float64)
    f = _filt(3, 5)
    y = mj.mf_jets(x, f, 3, 2, backend=backend)
    g = torch.randn_like(y)
    adj = mj.mf_jets_adjoint(g, f, 3, 2, 12, 9, backend=backend)
    torch.testing.assert_close((y * g).sum(), (x * adj).sum())
    ones = mj.mf_jets_adjoint(torch.ones((), dtype=y.dtype).expand_as(y), f, 3, 2, 12, 9, backend=backend)
    torch.testing.assert_close(ones, mj.mf_jets_adjoint(torch.ones_like(y), f, 3, 2, 12, 9, backend=backend))


def test_multi_index_order():
    assert mf_multi_indices(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    x = torch.randn(1, 2, 9, 9)
    f = torch.randn(3, 5)
    with pytest.raises(ValueError, match="4 dimensions"):
        mj.mf_jets(x[0], f, 2, backend=backend)
    with pytest.raises(TypeError, match="float16"):
        mj.mf_jets(x.int(), f, 2, backend=backend)
    with pytest.raises(ValueError, match=r"\[order \+ 1, K\]"):
        mj.mf_jets(x, f, 3, backend=backend)
    with pytest.raises(ValueError, match="at least K x K"):
        mj.mf_jets(x[..., :4], f, 2, backend=backend)
    with pytest.raises(ValueError, match=f"K <= {mj.MAX_TAPS}"):
        mj.mf_jets(torch.randn(1, 1, 300, 300), torch.randn(1, mj.MAX_TAPS + 1), 0, backend=backend)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        mj.mf_jets(x, f, 2, 0, backend=backend)
    with pytest.raises(ValueError, match="order must be <="):
        mj.mf_jets(x, torch.randn(mj.MAX_ORDER + 2, 3), mj.MAX_ORDER + 1, backend=backend)


@pytest.mark.skipif(not _backend.has_cpp(), reason="msconv._C not built")
def test_compiled_kernel_checks():
    # The C++ kernels check on their own too (they are callable directly).
    x = torch.randn(1, 2, 9, 9)
    with pytest.raises(RuntimeError, match="at least K x K"):
        torch.ops.msconv.mf_jets_fwd(x[..., :3], torch.randn(2, 5), 1, 1)
    with pytest.raises(RuntimeError, match=r"filt must be \[order \+ 1, K\]"):
        torch.ops.msconv.mf_jets_fwd(x, torch.randn(2, 5), 2, 1)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.msconv.mf_jets_adj(torch.randn(1, 5, 5, 5), torch.randn(2, 5), 1, 1, 9, 9)
    with pytest.raises(RuntimeError, match="K <= 256"):
        torch.ops.msconv.mf_jets_fwd(torch.randn(1, 1, 300, 300), torch.randn(1, 257), 0, 1)
