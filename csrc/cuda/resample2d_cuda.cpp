// CUDA registration of msconv::resample2d_chain: checks, outputs, one kernel launch per level.
// The kernels are in resample2d_kernel.cu (no torch headers there, so nvcc can compile-check it
// without a CUDA build of torch). Built only with the CUDA extension (setup.py).
#ifdef MSCONV_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // what at::cuda::getCurrentCUDAStream forwards to, minus cuBLAS
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "resample2d_kernel.h"
#include "resample_cuda.h"

namespace msconv {

namespace {

using cuda_kernels::ResampleDtype;

std::vector<at::Tensor> resample2d_chain_cuda(const at::Tensor& x, at::TensorList iy,
                                              at::TensorList wy, at::TensorList ix,
                                              at::TensorList wx) {
  TORCH_CHECK(x.is_cuda(), "resample2d_chain: x must be a CUDA tensor, got x.device=",
              x.device());
  TORCH_CHECK(x.dim() == 4, "resample2d_chain: x must be N x C x H x W, got x.shape=",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "resample2d_chain: x must be a floating tensor, got ", x.scalar_type());
  const ResampleDtype code = resample_cuda::dtype_code("resample2d_chain", x.scalar_type());
  const int64_t L = static_cast<int64_t>(iy.size());
  TORCH_CHECK(wy.size() == iy.size() && ix.size() == iy.size() && wx.size() == iy.size(),
              "resample2d_chain: iy, wy, ix, wx must have one table per level, got ", iy.size(),
              ", ", wy.size(), ", ", ix.size(), ", ", wx.size());
  for (int64_t l = 0; l < L; ++l) {
    resample_cuda::check_taps("resample2d_chain", iy[l], wy[l], "iy/wy", l, x);
    resample_cuda::check_taps("resample2d_chain", ix[l], wx[l], "ix/wx", l, x);
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Same rule as the CPU kernel and msconv/ops/_common.py:is_channels_last. The kernel takes
  // any input strides, so x is never copied.
  const bool nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;

  std::vector<at::Tensor> outs;
  outs.reserve(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& src = l == 0 ? x : outs[l - 1];
    at::Tensor out = at::empty({x.size(0), x.size(1), iy[l].size(0), ix[l].size(0)},
                               x.options().memory_format(fmt));
    if (out.numel() > 0) {
      cuda_kernels::Resample2dGeometry g{};
      g.n = src.size(0);
      g.c = src.size(1);
      g.h = src.size(2);
      g.w = src.size(3);
      g.ho = out.size(2);
      g.wo = out.size(3);
      for (int d = 0; d < 4; ++d) {
        g.in_stride[d] = src.stride(d);
        g.out_stride[d] = out.stride(d);
      }
      g.channels_last = nhwc;
      C10_CUDA_CHECK(cuda_kernels::launch_resample2d(
          code, src.const_data_ptr(), out.mutable_data_ptr(), g, iy[l].const_data_ptr<int32_t>(),
          wy[l].const_data_ptr<float>(), static_cast<int>(iy[l].size(1)),
          ix[l].const_data_ptr<int32_t>(), wx[l].const_data_ptr<float>(),
          static_cast<int>(ix[l].size(1)), stream));
    }
    outs.push_back(std::move(out));
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(msconv, CUDA, m) { m.impl("resample2d_chain", &resample2d_chain_cuda); }

}  // namespace msconv

#endif  // MSCONV_WITH_CUDA
