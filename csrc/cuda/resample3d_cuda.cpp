// CUDA registration of msconv::resample3d_chain: checks, outputs, one kernel launch per level.
// The kernel is in resample3d_kernel.cu (no torch headers there, so nvcc can compile-check it
// without a CUDA build of torch). Built only with the CUDA extension (setup.py).
#ifdef MSCONV_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "resample3d_kernel.h"
#include "resample_cuda.h"

namespace msconv {

namespace {

std::vector<at::Tensor> resample3d_chain_cuda(const at::Tensor& x, at::TensorList iz,
                                              at::TensorList wz, at::TensorList iy,
                                              at::TensorList wy, at::TensorList ix,
                                              at::TensorList wx) {
  constexpr const char* op = "resample3d_chain";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got x.device=", x.device());
  TORCH_CHECK(x.dim() == 5, op, ": x must be N x C x D x H x W, got x.shape=", x.sizes());
  const auto code = resample_cuda::dtype_code(op, x.scalar_type());
  const size_t L = iz.size();
  TORCH_CHECK(wz.size() == L && iy.size() == L && wy.size() == L && ix.size() == L &&
                  wx.size() == L,
              op, ": iz, wz, iy, wy, ix, wx must have one table per level, got ", iz.size(), ", ",
              wz.size(), ", ", iy.size(), ", ", wy.size(), ", ", ix.size(), ", ", wx.size());
  for (size_t l = 0; l < L; ++l) {
    resample_cuda::check_taps(op, iz[l], wz[l], "iz/wz", l, x);
    resample_cuda::check_taps(op, iy[l], wy[l], "iy/wy", l, x);
    resample_cuda::check_taps(op, ix[l], wx[l], "ix/wx", l, x);
  }

  const c10::cuda::CUDAGuard device_guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Same rule as the CPU kernel and msconv/ops/transfer3d.py:_is_channels_last_3d. The kernel
  // takes any input strides, so x is never copied.
  const bool ndhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !x.is_contiguous();
  const auto fmt = ndhwc ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;

  std::vector<at::Tensor> outs;
  outs.reserve(L);
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& src = l == 0 ? x : outs[l - 1];
    at::Tensor out = at::empty({x.size(0), x.size(1), iz[l].size(0), iy[l].size(0), ix[l].size(0)},
                               x.options().memory_format(fmt));
    if (out.numel() > 0) {
      cuda_kernels::Resample3dGeometry g{};
      g.n = src.size(0);
      g.c = src.size(1);
      g.d = src.size(2);
      g.h = src.size(3);
      g.w = src.size(4);
      g.od = out.size(2);
      g.oh = out.size(3);
      g.ow = out.size(4);
      for (int d = 0; d < 5; ++d) {
        g.in_stride[d] = src.stride(d);
        g.out_stride[d] = out.stride(d);
      }
      g.channels_last = ndhwc;
      C10_CUDA_CHECK(cuda_kernels::launch_resample3d(
          code, src.const_data_ptr(), out.mutable_data_ptr(), g, iz[l].const_data_ptr<int32_t>(),
          wz[l].const_data_ptr<float>(), static_cast<int>(iz[l].size(1)),
          iy[l].const_data_ptr<int32_t>(), wy[l].const_data_ptr<float>(),
          static_cast<int>(iy[l].size(1)), ix[l].const_data_ptr<int32_t>(),
          wx[l].const_data_ptr<float>(), static_cast<int>(ix[l].size(1)), stream));
    }
    outs.push_back(std::move(out));
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(msconv, CUDA, m) { m.impl("resample3d_chain", &resample3d_chain_cuda); }

}  // namespace msconv

#endif  // MSCONV_WITH_CUDA
