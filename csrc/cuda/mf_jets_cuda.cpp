// CUDA registration of msconv::mf_jets_fwd / mf_jets_adj: checks, outputs, one launch each.
// The kernels are in mf_jets_kernel.cu (no torch headers there, so nvcc can compile-check it
// without a CUDA build of torch). Built only with the CUDA extension (setup.py).
#ifdef MSCONV_WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "mf_jets_kernel.h"

namespace msconv {

namespace {

using cuda_kernels::MfDtype;

MfDtype mf_dtype_code(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat:
      return MfDtype::kFloat32;
    case at::kDouble:
      return MfDtype::kFloat64;
    case at::kHalf:
      return MfDtype::kFloat16;
    case at::kBFloat16:
      return MfDtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": expected float16, bfloat16, float32 or float64 on CUDA, got ", t);
  }
}

void check_args(const char* op, const at::Tensor& t, const char* name, const at::Tensor& filt,
                int64_t order, int64_t stride) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", name, ".device=",
              t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be N x C x H x W, got ", name, ".shape=",
              t.sizes());
  TORCH_CHECK(filt.device() == t.device(), op, ": filt is on ", filt.device(), " but ", name,
              " is on ", t.device(), "; move filt to ", name, ".device");
  TORCH_CHECK(order >= 0 && order <= cuda_kernels::kMfMaxOrder, op, ": order must be in [0, ",
              cuda_kernels::kMfMaxOrder, "], got order=", order);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got stride=", stride);
  TORCH_CHECK(filt.dim() == 2 && filt.size(0) == order + 1, op,
              ": filt must be [order + 1, K] = [", order + 1, ", K], got filt.shape=",
              filt.sizes());
  TORCH_CHECK(filt.size(1) >= 1 && filt.size(1) <= cuda_kernels::kMfMaxTaps, op, ": filt has K=",
              filt.size(1), " taps; the kernels support 1 <= K <= ", cuda_kernels::kMfMaxTaps);
}

cuda_kernels::MfJetsGeometry geometry(const at::Tensor& xp_like, const at::Tensor& jets,
                                      int64_t order, int64_t k, int64_t stride) {
  cuda_kernels::MfJetsGeometry g{};
  g.n = xp_like.size(0);
  g.c = xp_like.size(1);
  g.hp = xp_like.size(2);
  g.wp = xp_like.size(3);
  g.ho = jets.size(2);
  g.wo = jets.size(3);
  g.order = static_cast<int>(order);
  g.k = static_cast<int>(k);
  g.stride = static_cast<int>(stride);
  for (int d = 0; d < 4; ++d) {
    g.x_stride[d] = xp_like.stride(d);
    g.j_stride[d] = jets.stride(d);
  }
  return g;
}

bool is_nhwc(const at::Tensor& t) {
  // Same rule as the CPU kernels and msconv/ops/_common.py:is_channels_last.
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

at::Tensor mf_jets_fwd_cuda(const at::Tensor& xp, const at::Tensor& filt, int64_t order,
                            int64_t stride) {
  check_args("mf_jets_fwd", xp, "xp", filt, order, stride);
  const MfDtype code = mf_dtype_code(xp.scalar_type(), "mf_jets_fwd");
  const int64_t K = filt.size(1);
  TORCH_CHECK(xp.size(2) >= K && xp.size(3) >= K,
              "mf_jets_fwd: the padded input must be at least K x K = ", K, " x ", K,
              ", got xp.shape=", xp.sizes());
  const c10::cuda::CUDAGuard device_guard(xp.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t M = (order + 1) * (order + 2) / 2;
  const int64_t Ho = (xp.size(2) - K) / stride + 1, Wo = (xp.size(3) - K) / stride + 1;
  const auto fmt = is_nhwc(xp) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({xp.size(0), xp.size(1) * M, Ho, Wo}, xp.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const auto acc = xp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor f = filt.to(acc).contiguous();
  const auto g = geometry(xp, out, order, K, stride);
  C10_CUDA_CHECK(cuda_kernels::launch_mf_jets_fwd(code, xp.const_data_ptr(), out.mutable_data_ptr(),
                                                  f.const_data_ptr(), g, stream));
  return out;
}

at::Tensor mf_jets_adj_cuda(const at::Tensor& grad, const at::Tensor& filt, int64_t order,
                            int64_t stride, int64_t hp, int64_t wp) {
  check_args("mf_jets_adj", grad, "grad", filt, order, stride);
  const MfDtype code = mf_dtype_code(grad.scalar_type(), "mf_jets_adj");
  const int64_t K = filt.size(1);
  const int64_t M = (order + 1) * (order + 2) / 2;
  TORCH_CHECK(hp >= K && wp >= K, "mf_jets_adj: the padded input size (hp, wp) = (", hp, ", ", wp,
              ") must be at least K x K = ", K, " x ", K);
  const int64_t Ho = (hp - K) / stride + 1, Wo = (wp - K) / stride + 1;
  TORCH_CHECK(grad.size(1) % M == 0 && grad.size(2) == Ho && grad.size(3) == Wo,
              "mf_jets_adj: grad must be [N, C*M, Ho, Wo] with M=", M, ", Ho=", Ho, ", Wo=", Wo,
              "; got grad.shape=", grad.sizes());
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto fmt = is_nhwc(grad) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({grad.size(0), grad.size(1) / M, hp, wp}, grad.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor f = filt.to(acc).contiguous();
  // The kernel takes any strides (the gradient of sum() is expanded): grad is never copied.
  const auto g = geometry(out, grad, order, K, stride);
  C10_CUDA_CHECK(cuda_kernels::launch_mf_jets_adj(code, grad.const_data_ptr(), out.mutable_data_ptr(),
                                                  f.const_data_ptr(), g, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(msconv, CUDA, m) {
  m.impl("mf_jets_fwd", &mf_jets_fwd_cuda);
  m.impl("mf_jets_adj", &mf_jets_adj_cuda);
}

}  // namespace msconv

#endif  // MSCONV_WITH_CUDA
