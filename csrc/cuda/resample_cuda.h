// Host-side pieces shared by the torch-facing CUDA resample ops (resample2d_cuda.cpp,
// resample3d_cuda.cpp): the dtype code the launchers take and the tap-table checks. Built only
// with the CUDA extension (setup.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "resample2d_kernel.h"

namespace msconv {
namespace resample_cuda {

inline cuda_kernels::ResampleDtype dtype_code(const char* op, at::ScalarType t) {
  using cuda_kernels::ResampleDtype;
  switch (t) {
    case at::kFloat:
      return ResampleDtype::kFloat32;
    case at::kDouble:
      return ResampleDtype::kFloat64;
    case at::kHalf:
      return ResampleDtype::kFloat16;
    case at::kBFloat16:
      return ResampleDtype::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": x must be float16, bfloat16, float32 or float64 on CUDA, got ", t);
  }
}

// The CPU kernels' checks except the index range: that needs the tables' min/max on the host,
// i.e. a device synchronisation per level. The kernels never read an out-of-range tap.
inline void check_taps(const char* op, const at::Tensor& idx, const at::Tensor& w,
                       const char* name, int64_t l, const at::Tensor& x) {
  TORCH_CHECK(idx.device() == x.device() && w.device() == x.device(), op, ": tap tables ", name,
              "[", l, "] are on ", idx.device(), " and ", w.device(), " but x is on ", x.device(),
              "; move them to x.device");
  TORCH_CHECK(idx.dim() == 2 && w.sizes() == idx.sizes(), op, ": ", name, "[", l,
              "] must be 2-D index/weight tables of equal shape, got ", idx.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt && w.scalar_type() == at::kFloat, op, ": ", name, "[",
              l, "] tables must be int32 / float32, got ", idx.scalar_type(), " / ",
              w.scalar_type());
  TORCH_CHECK(idx.is_contiguous() && w.is_contiguous(), op, ": ", name, "[", l,
              "] tables must be contiguous");
  TORCH_CHECK(idx.size(1) <= cuda_kernels::kMaxTaps, op, ": ", name, "[", l, "] has ",
              idx.size(1), " taps per row; the CUDA kernels support at most ",
              cuda_kernels::kMaxTaps);
}

}  // namespace resample_cuda
}  // namespace msconv
