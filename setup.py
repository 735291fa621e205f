"""Build msconv._C: C++ CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

MSCONV_NO_EXT=1 installs the pure-Python package (reference and Triton backends only).
MSCONV_FORCE_CUDA=0 skips the CUDA kernels even where a CUDA torch and nvcc are present.
The C++ standard is the one torch's BuildExtension picks for its own headers.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("MSCONV_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # Headers the sources include (kernel bodies, shared helpers): a change to one rebuilds.
    cpu_headers = sorted(glob.glob(os.path.join("csrc", "*.h")))
    cxx_flags = ["-O3", "-fopenmp"] if os.name != "nt" else ["/O2", "/openmp"]
    want_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if os.environ.get("MSCONV_FORCE_CUDA") == "0":
        want_cuda = False
    if want_cuda:
        sources = cpu_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(
            "msconv._C",
            sources,
            depends=cpu_headers + sorted(glob.glob(os.path.join("csrc", "cuda", "*.h"))),
            define_macros=[("MSCONV_WITH_CUDA", None), ("Py_LIMITED_API", "0x030a0000")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "msconv._C",
            cpu_sources,
            depends=cpu_headers,
            define_macros=[("Py_LIMITED_API", "0x030a0000")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
