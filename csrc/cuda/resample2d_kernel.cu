// CUDA kernel of msconv::resample2d_chain: one separable resampling level per launch,
//   out[n,c,I,J] = sum_b wx[J,b] * sum_a wy[I,a] * in[n,c,iy[I,a],ix[J,b]]
// (the CPU kernel's summation order). Half types accumulate in float, double in double.
//
// No torch/ATen headers here, so that `nvcc -c` compile-checks this file on a machine without a
// CUDA build of torch; the torch-facing op is in resample2d_cuda.cpp; both include resample2d_kernel.h.
#include "resample2d_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernel_common.h"

namespace msconv {
namespace cuda_kernels {

namespace {

constexpr int kThreads = 256;

// Grid-stride loop over output elements in the output's memory order, so consecutive threads
// write consecutive addresses (and, for NCHW, read neighbouring columns of the same rows).
// index_t is uint32_t whenever the element count allows: 32-bit division is much cheaper.
template <typename T, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    resample2d_kernel(const T* __restrict__ in, T* __restrict__ out, const Resample2dGeometry g,
                      const int32_t* __restrict__ iy, const float* __restrict__ wy, const int ky,
                      const int32_t* __restrict__ ix, const float* __restrict__ wx, const int kx,
                      const index_t total) {
  using acc_t = acc_type<T>;
  const index_t C = static_cast<index_t>(g.c);
  const index_t Ho = static_cast<index_t>(g.ho);
  const index_t Wo = static_cast<index_t>(g.wo);
  const index_t step = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
  for (index_t e = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
                   static_cast<index_t>(threadIdx.x);
       e < total; e += step) {
    index_t r = e, n, c, I, J;
    if (kChannelsLast) {
      c = r % C;
      r /= C;
      J = r % Wo;
      r /= Wo;
      I = r % Ho;
      n = r / Ho;
    } else {
      J = r % Wo;
      r /= Wo;
      I = r % Ho;
      r /= Ho;
      c = r % C;
      n = r / C;
    }

    // Row taps once per element (weight 0 for padded and out-of-range taps: never read).
    float w_a[kMaxTaps];
    int64_t off_a[kMaxTaps];
    load_taps<kMaxTaps>(iy, wy, static_cast<int64_t>(I), ky, g.h, g.in_stride[2], w_a, off_a);

    const T* plane = in + static_cast<int64_t>(n) * g.in_stride[0] +
                     static_cast<int64_t>(c) * g.in_stride[1];
    acc_t acc = acc_t(0);
    for (int b = 0; b < kx; ++b) {
      const int32_t t = __ldg(ix + static_cast<int64_t>(J) * kx + b);
      const float w_b = __ldg(wx + static_cast<int64_t>(J) * kx + b);
      if (w_b == 0.f || t < 0 || t >= g.w) continue;
      const T* column = plane + static_cast<int64_t>(t) * g.in_stride[3];
      acc_t col = acc_t(0);
#pragma unroll
      for (int a = 0; a < kMaxTaps; ++a) {
        if (a < ky && w_a[a] != 0.f) col += static_cast<acc_t>(w_a[a]) * load_acc(column + off_a[a]);
      }
      acc += static_cast<acc_t>(w_b) * col;
    }

    T* dst = out + static_cast<int64_t>(n) * g.out_stride[0] +
             static_cast<int64_t>(c) * g.out_stride[1] + static_cast<int64_t>(I) * g.out_stride[2] +
             static_cast<int64_t>(J) * g.out_stride[3];
    store_acc(dst, acc);
  }
}

template <typename T, typename index_t>
void launch_typed(const void* in, void* out, const Resample2dGeometry& g, const int32_t* iy,
                  const float* wy, int ky, const int32_t* ix, const float* wx, int kx,
                  int64_t total, int blocks, cudaStream_t stream) {
  const T* src = static_cast<const T*>(in);
  T* dst = static_cast<T*>(out);
  const index_t count = static_cast<index_t>(total);
  if (g.channels_last)
    resample2d_kernel<T, index_t, true>
        <<<blocks, kThreads, 0, stream>>>(src, dst, g, iy, wy, ky, ix, wx, kx, count);
  else
    resample2d_kernel<T, index_t, false>
        <<<blocks, kThreads, 0, stream>>>(src, dst, g, iy, wy, ky, ix, wx, kx, count);
}

template <typename T>
void launch_dtype(const void* in, void* out, const Resample2dGeometry& g, const int32_t* iy,
                  const float* wy, int ky, const int32_t* ix, const float* wx, int kx,
                  int64_t total, int blocks, cudaStream_t stream) {
  // The loop index may run past `total` by one grid's worth of threads before it stops.
  const int64_t reach = total + static_cast<int64_t>(blocks) * kThreads;
  if (reach <= static_cast<int64_t>(UINT32_MAX))
    launch_typed<T, uint32_t>(in, out, g, iy, wy, ky, ix, wx, kx, total, blocks, stream);
  else
    launch_typed<T, uint64_t>(in, out, g, iy, wy, ky, ix, wx, kx, total, blocks, stream);
}

}  // namespace

cudaError_t launch_resample2d(ResampleDtype dtype, const void* in, void* out,
                              const Resample2dGeometry& g, const int32_t* iy, const float* wy,
                              int ky, const int32_t* ix, const float* wx, int kx,
                              cudaStream_t stream) {
  if (ky < 0 || ky > kMaxTaps || kx < 0 || kx > kMaxTaps) return cudaErrorInvalidValue;
  if (g.n < 0 || g.c < 0 || g.ho < 0 || g.wo < 0) return cudaErrorInvalidValue;
  const int64_t total = g.n * g.c * g.ho * g.wo;
  if (total == 0) return cudaSuccess;

  int blocks = 0;
  const cudaError_t err = grid_blocks(total, kThreads, &blocks);
  if (err != cudaSuccess) return err;

  switch (dtype) {
    case ResampleDtype::kFloat32:
      launch_dtype<float>(in, out, g, iy, wy, ky, ix, wx, kx, total, blocks, stream);
      break;
    case ResampleDtype::kFloat64:
      launch_dtype<double>(in, out, g, iy, wy, ky, ix, wx, kx, total, blocks, stream);
      break;
    case ResampleDtype::kFloat16:
      launch_dtype<__half>(in, out, g, iy, wy, ky, ix, wx, kx, total, blocks, stream);
      break;
    case ResampleDtype::kBFloat16:
      launch_dtype<__nv_bfloat16>(in, out, g, iy, wy, ky, ix, wx, kx, total, blocks, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace msconv
