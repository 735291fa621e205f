"""Every op on every kernel backend, with its tensors on the device that backend needs (the
`backend` fixture of conftest.py: cpp and the Triton interpreter on CPU; cuda and Triton on a
GPU, marked `gpu`): output and gradient against the float64 reference for every dtype and memory
format, gradcheck/gradgradcheck in float64, torch.library.opcheck of the custom ops, and a
torch.compile(fullgraph=True) graph of them (inductor on a GPU). On a machine without a GPU the
`gpu` cases are skipped; `pytest -m gpu` (make gpu-check) runs them there."""
import importlib

import pytest
import torch

import msconv
from conftest import TOL, Backend
from msconv import reference

mj = importlib.import_module("msconv.ops.mf_jets")  # the module (msconv.ops.mf_jets is also the function)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SIGMA, SCALE = 0.8, 1.0
ORDER, STRIDE = 2, 2


def _filt(dtype=torch.float64):
    taps, _ = reference.mf_taps(ORDER, SIGMA, SCALE)
    return taps.flip(-1).to(dtype)


# op: (forward on a backend, the float64 reference, input shape); all linear in x
OPS = {
    "restrict_average": (lambda x, b: msconv.restrict(x, "average", backend=b),
                         lambda x: reference.restrict_ref(x, "average"), (2, 3, 17, 10)),
    "restrict_full_weighting": (lambda x, b: msconv.restrict(x, "full_weighting", backend=b),
                                lambda x: reference.restrict_ref(x, "full_weighting"), (2, 3, 9, 14)),
    "restrict_2_levels": (lambda x, b: msconv.restrict(x, "bilinear", levels=2, backend=b),
                          lambda x: reference.restrict_ref(x, "bilinear", 2), (1, 2, 19, 12)),
    "prolong_bilinear": (lambda x, b: msconv.prolong(x, "bilinear", size=(13, 10), backend=b),
                         lambda x: reference.prolong_ref(x, "bilinear", 1, (13, 10)), (2, 3, 7, 5)),
    "prolong_nearest": (lambda x, b: msconv.prolong(x, "nearest", levels=2, backend=b),
                        lambda x: reference.prolong_ref(x, "nearest", 2), (1, 2, 3, 4)),
    "pyramid": (lambda x, b: torch.cat([p.flatten() for p in msconv.pyramid(x, 3, backend=b)]),
                lambda x: torch.cat([p.flatten() for p in reference.pyramid_ref(x, 3)]), (2, 2, 21, 16)),
    "mf_jets": (lambda x, b: mj.mf_jets(x, _filt(x.dtype).to(x.device), ORDER, STRIDE, backend=b),
                lambda x: reference.mf_jets_ref(x, _filt().to(x.device), ORDER, STRIDE), (2, 3, 15, 12)),
}


INTERPRETER = Backend("triton", torch.device("cpu"))
SLOW_UNDER_INTERPRETER = pytest.mark.usefixtures("not_interpreter")
INTERPRETER_CASES = {(torch.float64, "sliced"), (torch.float32, "channels_last"), (torch.bfloat16, "contiguous")}


@pytest.fixture
def not_interpreter(backend):
    if backend == INTERPRETER:
        pytest.skip("minutes under the Triton interpreter (gradcheck calls the op hundreds of times); "
                    "test_mf_jets.py covers it there, and the same test runs on the compiled Triton (gpu)")


def _input(shape, layout, backend, dtype=torch.float64, seed=0):
    """A float64 field rounded to ``dtype`` on the backend's device; ``sliced`` is a strided view
    into a bigger buffer made there (moving a view between devices would make it contiguous)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        n, c, h, w = shape
        big = backend(torch.randn(n, c + 1, 2 * h, w + 2, generator=g, dtype=torch.float64).to(dtype))
        return big[:, 1:, ::2, 1 : w + 1]
    x = backend(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _tol(dtype, backend):
    atol, rtol = TOL[dtype]
    if backend.device.type == "cuda" and dtype == torch.float32:
        # TF32 is off for these ops, but fused multiply-adds and another summation order are not.
        atol, rtol = 1e-5, 1e-4
    return atol, rtol


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_op_matches_reference_on_the_backend_device(backend, op, dtype, layout):
    if backend == INTERPRETER and (dtype, layout) not in INTERPRETER_CASES:
        pytest.skip("the Triton interpreter is slow: a diagonal of dtype x layout here, all of them in "
                    "test_triton_interpret.py, test_transfer.py and test_mf_jets.py")
    fn, ref, shape = OPS[op]
    x = _input(shape, layout, backend, dtype, seed=len(op)).requires_grad_()
    if layout == "sliced":
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    y = fn(x, backend.name)
    assert y.device.type == backend.device.type and y.dtype == dtype, (y.device, y.dtype)
    if layout == "channels_last" and op.startswith(("restrict", "prolong")):
        assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    xr = x.detach().double().cpu().requires_grad_()
    yr = ref(xr)
    atol, rtol = _tol(dtype, backend)
    torch.testing.assert_close(y.detach().double().cpu(), yr.detach(), atol=atol, rtol=rtol)
    gy = torch.randn(yr.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, backend(gy.to(dtype)))
    (gr,) = torch.autograd.grad(yr, xr, gy)
    assert gx.device.type == backend.device.type
    torch.testing.assert_close(gx.double().cpu(), gr, atol=atol * 4, rtol=rtol * 4)


@SLOW_UNDER_INTERPRETER
@pytest.mark.parametrize("op", ["restrict_full_weighting", "prolong_bilinear", "pyramid", "mf_jets"])
def test_gradcheck_float64(backend, op):
    fn, _, shape = OPS[op]
    small = {"restrict_full_weighting": (1, 2, 5, 4), "prolong_bilinear": (1, 1, 7, 5),
             "pyramid": (1, 1, 6, 5), "mf_jets": (1, 1, 11, 10)}[op]
    x = _input(small, "contiguous", backend, seed=4).requires_grad_()
    f = lambda t: fn(t, backend.name)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@SLOW_UNDER_INTERPRETER
def test_mf_jets_filter_gradcheck(backend):
    """The gradient w.r.t. the filters (a learnable sigma) is plain PyTorch on every device."""
    x = _input((1, 2, 11, 10), "contiguous", backend, seed=5).requires_grad_()
    f = backend(_filt()).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mj.mf_jets(a, b, ORDER, STRIDE, backend=backend.name), (x, f))


@SLOW_UNDER_INTERPRETER
def test_opcheck(backend):
    from torch.library import opcheck

    x = _input((2, 3, 7, 6), "contiguous", backend, seed=6).requires_grad_()
    xcl = _input((1, 2, 8, 6), "channels_last", backend, seed=7).requires_grad_()
    f = backend(_filt())
    for t in (x, xcl):
        opcheck(torch.ops.msconv.transfer2d.default, (t, "restrict", "full_weighting", (t.shape[2] + 1) // 2,
                                                      (t.shape[3] + 1) // 2, False, backend.name))
        opcheck(torch.ops.msconv.transfer2d.default, (t, "prolong", "bilinear", 2 * t.shape[2], 2 * t.shape[3],
                                                      False, backend.name))
        opcheck(torch.ops.msconv.pyramid.default, (t, "average", 2, backend.name))
    k = f.shape[1]  # the jets need a padded input of at least K x K
    for layout in ("contiguous", "channels_last"):
        xp = _input((2, 3, k + 3, k + 2), layout, backend, seed=8).requires_grad_()
        opcheck(torch.ops.msconv.mf_jets.default, (xp, f, ORDER, STRIDE, backend.name))
    g = backend(torch.randn(2, 18, 2, 2, dtype=torch.float64))
    opcheck(torch.ops.msconv.mf_jets_adjoint.default, (g, f, ORDER, STRIDE, k + 3, k + 2, backend.name))


@SLOW_UNDER_INTERPRETER
def test_compile_fullgraph(backend):
    """restrict -> jets -> 1x1 mix -> prolong, traced whole: the custom ops' fake kernels and autograd."""
    w = backend(torch.randn(4, 3 * 6, 1, 1, generator=torch.Generator().manual_seed(8)))
    filt = backend(_filt(torch.float32))

    def step(x):
        c = msconv.restrict(x, "full_weighting", backend=backend.name)
        jets = mj.mf_jets(torch.nn.functional.pad(c, (4, 4, 4, 4)), filt, ORDER, 1, backend=backend.name)
        y = torch.nn.functional.conv2d(jets, w)
        return msconv.prolong(y, "bilinear", size=tuple(x.shape[2:]), backend=backend.name).square().mean()

    # inductor generates and compiles code: seconds on a GPU, far more on two CPU cores
    compiler = "inductor" if backend.device.type == "cuda" else "aot_eager"
    cstep = torch.compile(step, fullgraph=True, backend=compiler)
    for shape in ((2, 3, 16, 16), (2, 3, 16, 16)):  # the second call reuses the graph
        x = backend(torch.randn(shape, generator=torch.Generator().manual_seed(9))).requires_grad_()
        loss = cstep(x)
        (gx,) = torch.autograd.grad(loss, x)
        x2 = x.detach().requires_grad_()
        eager = step(x2)
        (ex,) = torch.autograd.grad(eager, x2)
        torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gx, ex, atol=1e-6, rtol=1e-4)
        assert loss.device.type == backend.device.type


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_auto_backend_on_cuda_tensors_stays_on_the_gpu():
    """backend=None on CUDA tensors picks a GPU backend (cuda, else triton), never a CPU copy."""
    from msconv.ops import _backend

    chosen = _backend.resolve("restrict", torch.device("cuda"))
    assert chosen in ("cuda", "triton"), chosen
    x = torch.randn(2, 3, 33, 20, device="cuda")
    y = msconv.restrict(x)
    assert y.is_cuda
    torch.testing.assert_close(y.cpu().double(), reference.restrict_ref(x.cpu().double()), atol=1e-5, rtol=1e-5)


def test_available_backends_lists_what_runs_on_each_device(monkeypatch):
    """available_backends(device): the compiled backends this install and device allow, then
    "reference"; each listed one runs there, each left out is refused, and auto picks from it."""
    from msconv.ops import _backend, available_backends, resolve_backend

    monkeypatch.delenv("MSCONV_BACKEND", raising=False)
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64)
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        cpu = available_backends("cpu")
        assert available_backends(torch.device("cpu")) == cpu
        expect = (["cpp"] if _backend.has_cpp() else []) + (
            ["triton"] if _backend.has_triton() and interpret == "1" else []) + ["reference"]
        assert cpu == expect, (interpret, cpu)
        assert resolve_backend("restrict", torch.device("cpu")) in cpu
        for b in ("cpp", "cuda", "triton", "reference"):
            if b in cpu and b != "triton":  # the interpreter runs restrict too, but slowly
                torch.testing.assert_close(msconv.restrict(x, backend=b), reference.restrict_ref(x))
            elif b not in cpu:
                with pytest.raises(RuntimeError, match="not available"):
                    msconv.restrict(x, backend=b)
    assert available_backends("meta") == ["reference"]
    if torch.cuda.is_available():
        gpu = available_backends("cuda")
        assert gpu[-1] == "reference" and "cpp" not in gpu
        assert resolve_backend("restrict", torch.device("cuda")) == gpu[0]
