import os

import torch

# Triton kernels run on CPU tensors through the interpreter where there is no GPU; this must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: intra-op threads beyond that only add contention between pytest's own work.
torch.set_num_threads(min(torch.get_num_threads(), 2))

# Per-dtype (atol, rtol) for comparisons against the float64 reference.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


# ------------------------------------------------------------------------ backends and devices
# A test that takes the `backend` fixture runs once per kernel backend, on the device that
# backend needs: the C++ kernels and the Triton interpreter on CPU tensors; the CUDA kernels and
# compiled Triton on CUDA tensors (those two are marked `gpu`: `pytest -m gpu` runs them, and
# they are skipped with their reason where there is no CUDA device).
import dataclasses  # noqa: E402

import pytest  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Backend:
    """A kernel backend (``name``, as ops take it in ``backend=``) and the device its tensors live on."""

    name: str
    device: torch.device

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on this backend's device (strides and memory format kept)."""
        return t.to(self.device)

    def __str__(self) -> str:
        return f"{self.name}-{self.device.type}"


def _backend_params():
    from msconv.ops import _backend

    cuda = torch.cuda.is_available()
    interpret = _backend.triton_interpret()
    no_triton = "triton is not installed (pip install triton)"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    return [
        pytest.param(Backend("cpp", cpu), id="cpp-cpu", marks=pytest.mark.skipif(
            not _backend.has_cpp(), reason="msconv._C is not built (pip install --no-build-isolation -e .)")),
        pytest.param(Backend("triton", cpu), id="triton-cpu", marks=pytest.mark.skipif(
            not _backend.has_triton() or not interpret,
            reason=no_triton if not _backend.has_triton() else
            "the Triton interpreter runs only with TRITON_INTERPRET=1 (set by default where there is no GPU)")),
        pytest.param(Backend("cuda", gpu), id="cuda-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not cuda or not _backend.has_cuda_ext(),
            reason="no CUDA device" if not cuda else "msconv was built without its CUDA kernels (needs nvcc)")]),
        pytest.param(Backend("triton", gpu), id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
            not cuda or not _backend.has_triton() or interpret,
            reason="no CUDA device" if not cuda else no_triton if not _backend.has_triton() else
            "TRITON_INTERPRET=1 would run the interpreter, not the GPU kernels; unset it")]),
    ]


@pytest.fixture(params=_backend_params())
def backend(request) -> Backend:
    return request.param
