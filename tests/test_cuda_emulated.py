"""The CUDA kernels run on the CPU: csrc/cuda/*_kernel.cu compiled as host C++ (g++, with
csrc/cuda/host_shim.h standing in for the CUDA built-ins: one thread per block, blocks in turn)
and called through their real launchers (launch_resample2d/3d, launch_mf_jets_fwd/adj) from ctypes,
with the outputs allocated and strided as the torch-facing glue (csrc/cuda/*_cuda.cpp) does.
Every kernel's output and adjoint is compared with msconv.reference in float64, float32 and the
half types, on odd sizes, channels_last, strided and expanded (stride-0) inputs, and with grids
small enough that the grid-stride loops go round. No GPU and no CUDA toolkit needed.

What this does not cover: warp/thread interleaving (one thread per block), the 64-bit index
variant of the resample kernel (> 2^32 elements), nvcc's own code generation (.ci/run compiles
the same files with nvcc) and the torch glue (the GPU tests, `pytest -m gpu`)."""
import ctypes
import os
import re
import shutil
import subprocess

import pytest
import torch

from conftest import TOL
from msconv import reference
from msconv.ops import transfer3d
from msconv.ops.transfer import _level_tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no host C++ compiler ({CXX}) to build the "
                                "emulated CUDA kernels; install g++ or set CXX")

# dtype codes of ResampleDtype / MfDtype (the same numbering in both headers)
CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
I64x4 = ctypes.c_int64 * 4
I64x5 = ctypes.c_int64 * 5


# ------------------------------------------------------------------------------ build the kernels


def to_host_cpp(src: str) -> str:
    """CUDA-only syntax -> C++ the shim understands. Fails loudly on syntax it does not know, so a
    kernel file that grows new CUDA syntax breaks this test rather than being silently skipped."""
    launch = re.compile(r"([A-Za-z_]\w*(?:\s*<[^<>;{}()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
    n_launch = src.count("<<<")
    src, n = launch.subn(lambda m: f"::msconv_shim::launch({m.group(2)}, {m.group(1)})(", src)
    assert n == n_launch, f"rewrote {n} of {n_launch} kernel launches: update to_host_cpp"
    shared = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")
    n_shared = len(re.findall(r"extern\s+__shared__", src))
    src, n = shared.subn(lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>("
                         "::msconv_shim::dynamic_smem());", src)
    assert n == n_shared, f"rewrote {n} of {n_shared} dynamic shared arrays: update to_host_cpp"
    return src


COMMON_DRIVER = r"""
extern "C" {
void emu_set_sms(int n) { msconv_shim::sm_count = n; }
void emu_reset() { msconv_shim::last_launch = msconv_shim::Launch{}; }
long long emu_last(int what) {
  const auto& l = msconv_shim::last_launch;
  return what == 0 ? l.grid : what == 1 ? l.block : what == 2 ? (long long)l.smem : l.count;
}
uint16_t emu_f2h(float v) { return __float2half_rn(v).bits; }
float emu_h2f(uint16_t b) { return __half2float(__half{b}); }
uint16_t emu_f2bf(float v) { return __float2bfloat16_rn(v).bits; }
}
"""

DRIVERS = {
    "resample2d_kernel.cu": r"""
extern "C" int emu_resample2d(int dtype, const void* in, void* out, const int64_t* size6, const int64_t* in_stride,
                              const int64_t* out_stride, int channels_last, const int32_t* iy, const float* wy,
                              int ky, const int32_t* ix, const float* wx, int kx) {
  using namespace msconv::cuda_kernels;
  Resample2dGeometry g{};
  g.n = size6[0]; g.c = size6[1]; g.h = size6[2]; g.w = size6[3]; g.ho = size6[4]; g.wo = size6[5];
  for (int d = 0; d < 4; ++d) { g.in_stride[d] = in_stride[d]; g.out_stride[d] = out_stride[d]; }
  g.channels_last = channels_last != 0;
  return launch_resample2d(static_cast<ResampleDtype>(dtype), in, out, g, iy, wy, ky, ix, wx, kx, nullptr);
}
""",
    "resample3d_kernel.cu": r"""
extern "C" int emu_resample3d(int dtype, const void* in, void* out, const int64_t* size8, const int64_t* in_stride,
                              const int64_t* out_stride, int channels_last, const int32_t* const* idx,
                              const float* const* w, const int* k) {
  using namespace msconv::cuda_kernels;
  Resample3dGeometry g{};
  g.n = size8[0]; g.c = size8[1]; g.d = size8[2]; g.h = size8[3]; g.w = size8[4];
  g.od = size8[5]; g.oh = size8[6]; g.ow = size8[7];
  for (int d = 0; d < 5; ++d) { g.in_stride[d] = in_stride[d]; g.out_stride[d] = out_stride[d]; }
  g.channels_last = channels_last != 0;
  return launch_resample3d(static_cast<ResampleDtype>(dtype), in, out, g, idx[0], w[0], k[0], idx[1], w[1], k[1],
                           idx[2], w[2], k[2], nullptr);
}
""",
    "mf_jets_kernel.cu": r"""
extern "C" int emu_mf_jets(int adjoint, int dtype, const void* in, void* out, const void* filt,
                           const int64_t* size6, int order, int k, int stride, const int64_t* x_stride,
                           const int64_t* j_stride) {
  using namespace msconv::cuda_kernels;
  MfJetsGeometry g{};
  g.n = size6[0]; g.c = size6[1]; g.hp = size6[2]; g.wp = size6[3]; g.ho = size6[4]; g.wo = size6[5];
  g.order = order; g.k = k; g.stride = stride;
  for (int d = 0; d < 4; ++d) { g.x_stride[d] = x_stride[d]; g.j_stride[d] = j_stride[d]; }
  return adjoint ? launch_mf_jets_adj(static_cast<MfDtype>(dtype), in, out, filt, g, nullptr)
                 : launch_mf_jets_fwd(static_cast<MfDtype>(dtype), in, out, filt, g, nullptr);
}
""",
}


def build(src_dir: str, out_dir: str) -> dict:
    """{kernel file: ctypes.CDLL}, each kernel file with its driver compiled in parallel."""
    stub = os.path.join(out_dir, "stub")
    os.makedirs(stub, exist_ok=True)
    for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):
        with open(os.path.join(stub, h), "w") as f:
            f.write('#pragma once\n#include "host_shim.h"\n')
    procs = {}
    for name, driver in DRIVERS.items():
        with open(os.path.join(src_dir, name)) as f:
            text = to_host_cpp(f.read())
        cpp = os.path.join(out_dir, name.replace(".cu", "_host.cpp"))
        with open(cpp, "w") as f:
            f.write(f'#line 1 "{os.path.join(src_dir, name)}"\n' + text + COMMON_DRIVER + driver)
        so = cpp.replace(".cpp", ".so")
        cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-I", stub, "-I", src_dir, "-include", "host_shim.h",
               cpp, "-o", so]
        procs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), so)
    libs = {}
    for name, (p, so) in procs.items():
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, f"{name} does not compile as host C++ with host_shim.h:\n{log[-4000:]}"
        libs[name] = ctypes.CDLL(so)
    for lib in libs.values():
        lib.emu_f2h.restype = lib.emu_f2bf.restype = ctypes.c_uint16
        lib.emu_f2h.argtypes = lib.emu_f2bf.argtypes = [ctypes.c_float]
        lib.emu_h2f.restype, lib.emu_h2f.argtypes = ctypes.c_float, [ctypes.c_uint16]
        lib.emu_last.restype = ctypes.c_longlong
    return libs


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return build(CUDA_SRC, str(tmp_path_factory.mktemp("cuda_emulated")))


@pytest.fixture
def sms(libs):
    """Set the emulated SM count (grid = min(blocks needed, 32 * SMs)); restored after the test."""
    def set_(n):
        for lib in libs.values():
            lib.emu_set_sms(n)
    yield set_
    set_(2)


# ------------------------------------------------------------------ the glue, as csrc/cuda/*.cpp


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def guarded_empty(shape, dtype, fmt):
    """(out, check): ``out`` lies inside a NaN-filled buffer four times its size on each side, so an
    element the kernel does not write stays NaN (caught by the comparison) and ``check(what)``
    says whether it wrote outside ``out`` (on a GPU: corrupt memory or an illegal address)."""
    numel = 1
    for d in shape:
        numel *= d
    pad = 4 * numel + 256
    buf = torch.full((numel + 2 * pad,), float("nan"), dtype=dtype)
    stride = torch.empty(shape, device="meta").contiguous(memory_format=fmt).stride()
    out = buf.as_strided(shape, stride, pad)

    def check(what):
        outside = torch.cat([buf[:pad], buf[pad + numel :]])
        bad = int((~outside.isnan()).sum())
        assert bad == 0, f"{what}: the kernel wrote {bad} element(s) outside its output tensor"

    return out, check


def is_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def resample2d_chain(lib, x, tables):
    """resample2d_chain_cuda's loop: one launch per level, output memory format from x."""
    nhwc = is_cl(x)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    outs, src = [], x
    for iy, wy, ix, wx in tables:
        iy, ix = (torch.as_tensor(t, dtype=torch.int32).contiguous() for t in (iy, ix))
        wy, wx = (torch.as_tensor(t, dtype=torch.float32).contiguous() for t in (wy, wx))
        out, check = guarded_empty((x.shape[0], x.shape[1], iy.shape[0], ix.shape[0]), x.dtype, fmt)
        if out.numel():
            size = (ctypes.c_int64 * 6)(*src.shape, out.shape[2], out.shape[3])
            rc = lib.emu_resample2d(CODE[x.dtype], _ptr(src), _ptr(out), size, I64x4(*src.stride()),
                                    I64x4(*out.stride()), int(nhwc), _ptr(iy), _ptr(wy), iy.shape[1], _ptr(ix),
                                    _ptr(wx), ix.shape[1])
            assert rc == 0, f"launch_resample2d returned cudaError {rc}"
            check(f"resample2d level {len(outs)}")
        outs.append(out)
        src = out
    return outs


def mf_jets(lib, t, filt, order, stride, adjoint=False, hp=None, wp=None):
    """mf_jets_fwd_cuda (t = xp) or mf_jets_adj_cuda (t = grad of the jets, output hp x wp)."""
    k = filt.shape[1]
    m = (order + 1) * (order + 2) // 2
    fmt = torch.channels_last if is_cl(t) else torch.contiguous_format
    if adjoint:
        ho, wo = t.shape[2:]
        out, check = guarded_empty((t.shape[0], t.shape[1] // m, hp, wp), t.dtype, fmt)
        xs, js = out, t
    else:
        hp, wp = t.shape[2:]
        ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
        out, check = guarded_empty((t.shape[0], t.shape[1] * m, ho, wo), t.dtype, fmt)
        xs, js = t, out
    f = filt.to(torch.float64 if t.dtype == torch.float64 else torch.float32).contiguous()
    size = (ctypes.c_int64 * 6)(xs.shape[0], xs.shape[1], hp, wp, ho, wo)
    rc = lib.emu_mf_jets(int(adjoint), CODE[t.dtype], _ptr(t), _ptr(out), _ptr(f), size, order, k, stride,
                         I64x4(*xs.stride()), I64x4(*js.stride()))
    assert rc == 0, f"launch_mf_jets_{'adj' if adjoint else 'fwd'} returned cudaError {rc}"
    check(f"mf_jets_{'adj' if adjoint else 'fwd'}")
    return out


# ------------------------------------------------------------------------------------- inputs


def make(shape, dtype, layout, seed=0):
    """A float64 field rounded to `dtype`, laid out as contiguous / channels_last / sliced (a strided
    view into a bigger buffer) / expanded (stride 0 along H, as the gradient of a sum)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    if layout == "sliced":
        big = torch.randn(n + 1, c + 2, 2 * h + 1, w + 3, generator=g, dtype=torch.float64)
        return big[1:, 1 : c + 1, 1::2, 2 : w + 2][:, :, :h].to(dtype)  # .to keeps the strides
    if layout == "expanded":
        return torch.randn(n, c, 1, w, generator=g, dtype=torch.float64).to(dtype).expand(n, c, h, w)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def close(out, ref, dtype, what):
    atol, rtol = TOL[dtype]
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def vjp(fn, x, g):
    """The adjoint of the linear map fn at float64: g -> (d fn / dx)^T g."""
    xr = x.detach().double().requires_grad_()
    (gx,) = torch.autograd.grad(fn(xr), xr, g.double())
    return gx


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced", "expanded"]


# ------------------------------------------------------------------------------- the shim itself


def test_shim_half_conversions_match_torch(libs):
    lib = libs["resample2d_kernel.cu"]
    v = torch.cat([torch.randn(2000, dtype=torch.float64) * s for s in (1e-7, 1e-5, 1e-3, 1, 1e3, 7e4)])
    v = torch.cat([v, torch.tensor([0.0, -0.0, 65504.0, 65519.9, 65520.0, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25,
                                    float("inf"), -float("inf")], dtype=torch.float64)]).float()
    half = torch.tensor([lib.emu_f2h(x) for x in v.tolist()], dtype=torch.int32).to(torch.int16)
    assert torch.equal(half.view(torch.float16), v.half()), "float -> half (round to nearest even)"
    back = torch.tensor([lib.emu_h2f(b & 0xFFFF) for b in half.tolist()])
    assert torch.equal(back, v.half().float()), "half -> float"
    bf = torch.tensor([lib.emu_f2bf(x) for x in v.tolist()], dtype=torch.int32).to(torch.int16)
    assert torch.equal(bf.view(torch.bfloat16), v.bfloat16()), "float -> bfloat16 (round to nearest even)"


# ---------------------------------------------------------------------------- resample2d kernel


def level_tables(direction, kind, h_in, w_in, h_out, w_out, adjoint):
    """The (iy, wy, ix, wx) tap tables the op layer hands the kernel, on the CPU."""
    return _level_tables(direction, kind, h_in, w_in, h_out, w_out, adjoint, torch.device("cpu"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", reference.RESTRICT_KINDS)
def test_restrict_and_adjoint(libs, kind, dtype, layout):
    lib = libs["resample2d_kernel.cu"]
    x = make((2, 3, 17, 9), dtype, layout, seed=1)
    hc, wc = reference.coarse_size(17), reference.coarse_size(9)
    (y,) = resample2d_chain(lib, x, [level_tables("restrict", kind, 17, 9, hc, wc, False)])
    close(y, reference.restrict_ref(x.double(), kind), dtype, f"restrict {kind}")
    assert y.is_contiguous(memory_format=torch.channels_last if is_cl(x) else torch.contiguous_format)
    g = make((2, 3, hc, wc), dtype, layout, seed=2)
    (gx,) = resample2d_chain(lib, g, [level_tables("restrict", kind, hc, wc, 17, 9, True)])
    close(gx, vjp(lambda t: reference.restrict_ref(t, kind), x, g), dtype, f"restrict {kind} adjoint")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", reference.PROLONG_KINDS)
def test_prolong_and_adjoint(libs, kind, dtype, layout):
    lib = libs["resample2d_kernel.cu"]
    x = make((2, 3, 5, 3), dtype, layout, seed=3)
    size = (9, 5)  # odd fine grid: ceil(9/2) = 5, ceil(5/2) = 3
    (y,) = resample2d_chain(lib, x, [level_tables("prolong", kind, 5, 3, *size, False)])
    close(y, reference.prolong_ref(x.double(), kind, 1, size), dtype, f"prolong {kind}")
    g = make((2, 3, *size), dtype, layout, seed=4)
    (gx,) = resample2d_chain(lib, g, [level_tables("prolong", kind, *size, 5, 3, True)])
    close(gx, vjp(lambda t: reference.prolong_ref(t, kind, 1, size), x, g), dtype, f"prolong {kind} adjoint")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (33, 7), (64, 48)])
def test_pyramid_chain(libs, hw, layout):
    h, w = hw
    levels = reference.max_levels(h, w)
    x = make((2, 5, h, w), torch.float32, layout, seed=h)
    tables, hh, ww = [], h, w
    for _ in range(max(levels, 1)):
        hc, wc = reference.coarse_size(hh), reference.coarse_size(ww)
        tables.append(level_tables("restrict", "full_weighting", hh, ww, hc, wc, False))
        hh, ww = hc, wc
    outs = resample2d_chain(libs["resample2d_kernel.cu"], x, tables)
    refs = reference.pyramid_ref(x.double(), len(tables), "full_weighting")[1:]
    for level, (o, r) in enumerate(zip(outs, refs)):
        close(o, r, torch.float32, f"pyramid level {level + 1}")


@pytest.mark.parametrize("n_sms", [1, 2, 1000])
def test_any_grid_covers_every_element(libs, sms, n_sms):
    """32 blocks (1 SM) to one block per 256 elements: the grid-stride loop covers the rest."""
    lib = libs["resample2d_kernel.cu"]
    sms(n_sms)
    x = make((3, 4, 40, 30), torch.float64, "channels_last", seed=5)
    lib.emu_reset()
    (y,) = resample2d_chain(lib, x, [level_tables("restrict", "average", 40, 30, 20, 15, False)])
    total = 3 * 4 * 20 * 15
    assert (lib.emu_last(0), lib.emu_last(1)) == (min(-(-total // 256), 32 * n_sms), 256)
    close(y, reference.restrict_ref(x, "average"), torch.float64, "restrict")


def test_random_tables_padded_and_out_of_range_taps(libs):
    """Up to 8 taps, weight-0 taps pointing at inf and out-of-range taps are never read."""
    lib = libs["resample2d_kernel.cu"]
    g = torch.Generator().manual_seed(6)
    x = make((1, 2, 11, 13), torch.float64, "sliced", seed=7)
    x[0, 0, 3, 4] = float("inf")
    iy = torch.randint(-2, 13, (6, 8), generator=g, dtype=torch.int32)
    ix = torch.randint(-2, 15, (5, 3), generator=g, dtype=torch.int32)
    wy, wx = torch.rand(6, 8, generator=g), torch.rand(5, 3, generator=g)
    wy[iy == 3] = 0.0
    wx[ix == 4] = 0.0
    (y,) = resample2d_chain(lib, x, [(iy, wy, ix, wx)])
    xr = x.double()
    ref = torch.zeros(1, 2, 6, 5, dtype=torch.float64)
    for i in range(6):
        for j in range(5):
            for a in range(8):
                for b in range(3):
                    ty, tx = int(iy[i, a]), int(ix[j, b])
                    if 0 <= ty < 11 and 0 <= tx < 13 and wy[i, a] != 0 and wx[j, b] != 0:
                        ref[:, :, i, j] += float(wy[i, a]) * float(wx[j, b]) * xr[:, :, ty, tx]
    close(y, ref, torch.float64, "random tables")


def test_launcher_rejects_bad_tables_and_skips_empty(libs):
    lib = libs["resample2d_kernel.cu"]
    x = torch.randn(1, 1, 4, 4)
    iy = torch.zeros(2, 9, dtype=torch.int32)
    wy = torch.zeros(2, 9)
    ix, wx = torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1)
    out = torch.empty(1, 1, 2, 2)
    rc = lib.emu_resample2d(0, _ptr(x), _ptr(out), (ctypes.c_int64 * 6)(1, 1, 4, 4, 2, 2), I64x4(*x.stride()),
                            I64x4(*out.stride()), 0, _ptr(iy), _ptr(wy), 9, _ptr(ix), _ptr(wx), 1)
    assert rc == 1, "more than kMaxTaps = 8 taps must be cudaErrorInvalidValue"
    lib.emu_reset()
    outs = resample2d_chain(lib, torch.randn(0, 3, 8, 6), [level_tables("restrict", "average", 8, 6, 4, 3, False)])
    assert outs[0].shape == (0, 3, 4, 3) and lib.emu_last(3) == 0, "an empty output launches nothing"


# ------------------------------------------------------------------------------- mf_jets kernels


def jets_case(order, sigma, scale, stride, dtype, layout, shape=(2, 3, 0, 0), seed=0):
    taps, _ = reference.mf_taps(order, sigma, scale)
    filt = taps.flip(-1).to(torch.float64)
    k = filt.shape[1]
    n, c = shape[:2]
    hp, wp = k + 2 * stride + 3, k + stride + 2  # odd output sizes, partial last strides
    xp = make((n, c, hp, wp), dtype, layout, seed=seed)
    return xp, filt.to(dtype).to(torch.float64), k


@pytest.mark.parametrize("order", range(9))
def test_jets_every_order_float64(libs, order):
    lib = libs["mf_jets_kernel.cu"]
    for stride, layout in ((1, "contiguous"), (2, "channels_last"), (3, "sliced")):
        xp, filt, k = jets_case(order, 0.8, 1.0, stride, torch.float64, layout, seed=order)
        out = mf_jets(lib, xp, filt, order, stride)
        ref = reference.mf_jets_ref(xp, filt, order, stride)
        close(out, ref, torch.float64, f"jets p={order} S={stride} {layout}")
        assert out.is_contiguous(memory_format=torch.channels_last if is_cl(xp) else torch.contiguous_format)
        g = make(tuple(ref.shape), torch.float64, layout, seed=order + 10)
        gx = mf_jets(lib, g, filt, order, stride, adjoint=True, hp=xp.shape[2], wp=xp.shape[3])
        close(gx, vjp(lambda t: reference.mf_jets_ref(t, filt, order, stride), xp, g), torch.float64,
              f"jets adjoint p={order} S={stride} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order,sigma,scale,stride", [(2, 1.0, 1.0, 1), (1, 0.6, 0.5, 2), (3, 1.2, 2.0, 1)])
def test_jets_dtypes_and_layouts(libs, order, sigma, scale, stride, dtype, layout):
    lib = libs["mf_jets_kernel.cu"]
    xp, filt, k = jets_case(order, sigma, scale, stride, dtype, layout, seed=stride)
    # The kernel accumulates in float32 (float64 for float64) with filters rounded to that type.
    facc = filt.to(torch.float64 if dtype == torch.float64 else torch.float32).double()
    out = mf_jets(lib, xp, filt, order, stride)
    ref = reference.mf_jets_ref(xp.double(), facc, order, stride)
    close(out, ref, dtype, f"jets {dtype} {layout}")
    g = make(tuple(ref.shape), dtype, layout, seed=9)
    gx = mf_jets(lib, g, filt, order, stride, adjoint=True, hp=xp.shape[2], wp=xp.shape[3])
    close(gx, vjp(lambda t: reference.mf_jets_ref(t, facc, order, stride), xp, g), dtype, f"jets adjoint {dtype} {layout}")


def test_jets_large_footprint_and_launch_config(libs, sms):
    """K close to the shared-memory filter table's size, a grid that strides, smem = (p+1) K acc."""
    lib = libs["mf_jets_kernel.cu"]
    sms(1)
    order, stride = 2, 1
    taps, _ = reference.mf_taps(order, 6.0, 1.0)
    filt = taps.flip(-1).to(torch.float64)
    k = filt.shape[1]
    xp = make((2, 2, k + 63, k + 63), torch.float32, "contiguous", seed=11)  # 16384 outputs: 64 blocks wanted
    lib.emu_reset()
    out = mf_jets(lib, xp, filt, order, stride)
    assert lib.emu_last(0) == 32 and lib.emu_last(1) == 256 and lib.emu_last(2) == 3 * k * 4
    close(out, reference.mf_jets_ref(xp.double(), filt.float().double(), order, stride), torch.float32, "wide jets")


# ---------------------------------------------------------------------------- resample3d kernel


def resample3d_chain(lib, x, tables):
    """resample3d_chain_cuda's loop: one launch per level, output memory format from x."""
    ndhwc = x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    fmt = torch.channels_last_3d if ndhwc else torch.contiguous_format
    outs, src = [], x
    for t in tables:
        idx = [torch.as_tensor(i, dtype=torch.int32).contiguous() for i in t[0::2]]
        w = [torch.as_tensor(v, dtype=torch.float32).contiguous() for v in t[1::2]]
        out, check = guarded_empty((x.shape[0], x.shape[1], *(i.shape[0] for i in idx)), x.dtype, fmt)
        if out.numel():
            rc = lib.emu_resample3d(CODE[x.dtype], _ptr(src), _ptr(out), (ctypes.c_int64 * 8)(*src.shape, *out.shape[2:]),
                                    I64x5(*src.stride()), I64x5(*out.stride()), int(ndhwc),
                                    (ctypes.c_void_p * 3)(*(i.data_ptr() for i in idx)),
                                    (ctypes.c_void_p * 3)(*(v.data_ptr() for v in w)),
                                    (ctypes.c_int * 3)(*(i.shape[1] for i in idx)))
            assert rc == 0, f"launch_resample3d returned cudaError {rc}"
            check(f"resample3d level {len(outs)}")
        outs.append(out)
        src = out
    return outs


def make3d(shape, dtype, layout, seed=0):
    """As make(), for (N, C, D, H, W) volumes; channels_last is channels_last_3d, expanded has stride 0 along D."""
    g = torch.Generator().manual_seed(seed)
    n, c, d, h, w = shape
    if layout == "sliced":
        big = torch.randn(n + 1, c + 2, d + 2, 2 * h + 1, w + 3, generator=g, dtype=torch.float64)
        return big[1:, 1 : c + 1, 2:, 1::2, 2 : w + 2][:, :, :, :h].to(dtype)
    if layout == "expanded":
        return torch.randn(n, c, 1, h, w, generator=g, dtype=torch.float64).to(dtype).expand(n, c, d, h, w)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" else x


def tables3d(direction, kind, size_in, size_out, adjoint):
    """The six tap tables (iz, wz, iy, wy, ix, wx) the 3-D op layer hands the kernel, on the CPU."""
    return transfer3d._level_tables(direction, kind, size_in, size_out, adjoint, torch.device("cpu"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,factors", [("average", (2, 2, 2)), ("nearest", (1, 2, 2)), ("average", (2, 1, 2))])
def test_restrict3d_and_adjoint(libs, kind, factors, dtype, layout):
    lib = libs["resample3d_kernel.cu"]
    fine = (7, 6, 9)
    x = make3d((2, 3, *fine), dtype, layout, seed=1)
    coarse = tuple(-(-n // f) for n, f in zip(fine, factors))
    (y,) = resample3d_chain(lib, x, [tables3d("restrict", kind, fine, coarse, False)])
    ref = lambda t: transfer3d.restrict3d_ref(t, kind, 1, factors)  # noqa: E731
    close(y, ref(x.double()), dtype, f"restrict3d {kind} {factors}")
    g = make3d((2, 3, *coarse), dtype, layout, seed=2)
    (gx,) = resample3d_chain(lib, g, [tables3d("restrict", kind, coarse, fine, True)])
    close(gx, vjp(ref, x, g), dtype, f"restrict3d {kind} {factors} adjoint")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,factors", [("linear", (2, 2, 2)), ("nearest", (2, 2, 2)), ("linear", (1, 2, 2))])
def test_prolong3d_and_adjoint(libs, kind, factors, dtype, layout):
    lib = libs["resample3d_kernel.cu"]
    fine = (7, 5, 8) if factors[0] == 2 else (3, 5, 8)
    coarse = tuple(-(-n // f) for n, f in zip(fine, factors))
    x = make3d((2, 3, *coarse), dtype, layout, seed=3)
    (y,) = resample3d_chain(lib, x, [tables3d("prolong", kind, coarse, fine, False)])
    ref = lambda t: transfer3d.prolong3d_ref(t, kind, 1, fine, factors)  # noqa: E731
    close(y, ref(x.double()), dtype, f"prolong3d {kind} {factors}")
    g = make3d((2, 3, *fine), dtype, layout, seed=4)
    (gx,) = resample3d_chain(lib, g, [tables3d("prolong", kind, fine, coarse, True)])
    close(gx, vjp(ref, x, g), dtype, f"prolong3d {kind} {factors} adjoint")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("n_sms", [1, 1000])
def test_pyramid3d_chain_and_any_grid(libs, sms, layout, n_sms):
    """Three levels, odd sizes; 32 blocks (1 SM) or one block per 256 outputs: the loop covers the rest."""
    lib = libs["resample3d_kernel.cu"]
    sms(n_sms)
    x = make3d((2, 5, 13, 16, 11), torch.float32, layout, seed=5)
    sizes = [(13, 16, 11), (7, 8, 6), (4, 4, 3), (2, 2, 2)]
    lib.emu_reset()
    outs = resample3d_chain(lib, x, [tables3d("restrict", "average", a, b, False) for a, b in zip(sizes, sizes[1:])])
    total = 2 * 5 * 2 * 2 * 2
    assert (lib.emu_last(0), lib.emu_last(1)) == (min(-(-total // 256), 32 * n_sms), 256) and lib.emu_last(3) == 3
    for level, (o, r) in enumerate(zip(outs, transfer3d.pyramid3d_ref(x.double(), 3)[1:])):
        close(o, r, torch.float32, f"pyramid3d level {level + 1}")


def test_launcher3d_rejects_bad_tables_and_skips_empty(libs):
    lib = libs["resample3d_kernel.cu"]
    x, out = torch.randn(1, 1, 4, 4, 4), torch.empty(1, 1, 2, 2, 2)
    i9, w9 = torch.zeros(2, 9, dtype=torch.int32), torch.zeros(2, 9)
    rc = lib.emu_resample3d(0, _ptr(x), _ptr(out), (ctypes.c_int64 * 8)(1, 1, 4, 4, 4, 2, 2, 2), I64x5(*x.stride()),
                            I64x5(*out.stride()), 0, (ctypes.c_void_p * 3)(*[i9.data_ptr()] * 3),
                            (ctypes.c_void_p * 3)(*[w9.data_ptr()] * 3), (ctypes.c_int * 3)(1, 9, 1))
    assert rc == 1, "more than kMaxTaps = 8 taps must be cudaErrorInvalidValue"
    lib.emu_reset()
    outs = resample3d_chain(lib, torch.randn(0, 3, 4, 8, 6), [tables3d("restrict", "average", (4, 8, 6), (2, 4, 3), False)])
    assert outs[0].shape == (0, 3, 2, 4, 3) and lib.emu_last(3) == 0, "an empty output launches nothing"
