// Helpers shared by the CUDA kernel files (*_kernel.cu): the accumulation type of each storage
// type, loads and stores that convert to and from it, and the grid size of a grid-stride launch.
// No torch/ATen headers, so `nvcc -c` compile-checks the kernel files without a CUDA build of
// torch; only CUDA built-ins that host_shim.h emulates, so tests/test_cuda_emulated.py can compile
// the kernels as host C++ (no kernel launches or shared arrays here: that test rewrites those
// only in the .cu files).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace msconv {
namespace cuda_kernels {

// Half types accumulate in float, float in float, double in double.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// *p through the read-only data cache, in the accumulation type.
template <typename T>
__device__ __forceinline__ acc_type<T> load_acc(const T* p) {
  return to_acc(__ldg(p));
}

// *p = v, rounded to nearest even for the half types.
__device__ __forceinline__ void store_acc(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_acc(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16_rn(v);
}

// The taps of output row `r` of a (rows, k) tap table whose input axis has `len` cells `stride`
// elements apart, as weights and element offsets. Padded (weight-0) and out-of-range taps come
// out as weight 0 at offset 0 and are never read: the host does not range-check the tables (that
// would synchronise the device), so a bad table cannot fault. k <= kMax.
template <int kMax>
__device__ __forceinline__ void load_taps(const int32_t* __restrict__ idx, const float* __restrict__ w,
                                          int64_t r, int k, int64_t len, int64_t stride,
                                          float (&w_out)[kMax], int64_t (&off_out)[kMax]) {
#pragma unroll
  for (int a = 0; a < kMax; ++a) {
    w_out[a] = 0.f;
    off_out[a] = 0;
    if (a < k) {
      const int32_t t = __ldg(idx + r * k + a);
      const float v = __ldg(w + r * k + a);
      if (t >= 0 && t < len) {
        w_out[a] = v;
        off_out[a] = static_cast<int64_t>(t) * stride;
      }
    }
  }
}

// Blocks of `threads` for `total` elements of a grid-stride loop: enough for every element, at
// most 32 per SM (a few waves of resident blocks; the loop covers the rest). total > 0.
inline cudaError_t grid_blocks(int64_t total, int threads, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t max_blocks = static_cast<int64_t>(sms > 0 ? sms : 1) * 32;
  const int64_t want = (total + threads - 1) / threads;
  *blocks = static_cast<int>(want < max_blocks ? want : max_blocks);
  return cudaSuccess;
}

}  // namespace cuda_kernels
}  // namespace msconv
