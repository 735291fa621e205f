// CUDA kernel of msconv::resample3d_chain: one separable 3-D resampling level per launch,
//   out[n,c,Z,I,J] = sum_b wx[J,b] * sum_a sum_e wz[Z,a] wy[I,e] * in[n,c,iz[Z,a],iy[I,e],ix[J,b]]
// (the CPU kernel's summation order up to the column gather). Half types accumulate in float,
// double in double. A kept axis (factor 1) is a table of one tap of weight 1.
//
// No torch/ATen headers here, so that `nvcc -c` compile-checks this file on a machine without a
// CUDA build of torch; the torch-facing op is in resample3d_cuda.cpp.
#include "resample3d_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernel_common.h"

namespace msconv {
namespace cuda_kernels {

namespace {

constexpr int kThreads = 256;

// Grid-stride loop over output elements in the output's memory order, so consecutive threads
// write consecutive addresses. index_t is uint32_t whenever the element count allows.
template <typename T, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    resample3d_kernel(const T* __restrict__ in, T* __restrict__ out, const Resample3dGeometry g,
                      const int32_t* __restrict__ iz, const float* __restrict__ wz, const int kz,
                      const int32_t* __restrict__ iy, const float* __restrict__ wy, const int ky,
                      const int32_t* __restrict__ ix, const float* __restrict__ wx, const int kx,
                      const index_t total) {
  using acc_t = acc_type<T>;
  const index_t C = static_cast<index_t>(g.c);
  const index_t Do = static_cast<index_t>(g.od);
  const index_t Ho = static_cast<index_t>(g.oh);
  const index_t Wo = static_cast<index_t>(g.ow);
  const index_t step = static_cast<index_t>(gridDim.x) * static_cast<index_t>(blockDim.x);
  for (index_t e = static_cast<index_t>(blockIdx.x) * static_cast<index_t>(blockDim.x) +
                   static_cast<index_t>(threadIdx.x);
       e < total; e += step) {
    index_t r = e, n, c, Z, I, J;
    if (kChannelsLast) {
      c = r % C;
      r /= C;
      J = r % Wo;
      r /= Wo;
      I = r % Ho;
      r /= Ho;
      Z = r % Do;
      n = r / Do;
    } else {
      J = r % Wo;
      r /= Wo;
      I = r % Ho;
      r /= Ho;
      Z = r % Do;
      r /= Do;
      c = r % C;
      n = r / C;
    }

    // Slice and row taps once per element (weight 0 for padded and out-of-range taps).
    float w_z[kMaxTaps], w_y[kMaxTaps];
    int64_t off_z[kMaxTaps], off_y[kMaxTaps];
    load_taps<kMaxTaps>(iz, wz, static_cast<int64_t>(Z), kz, g.d, g.in_stride[2], w_z, off_z);
    load_taps<kMaxTaps>(iy, wy, static_cast<int64_t>(I), ky, g.h, g.in_stride[3], w_y, off_y);

    const T* volume = in + static_cast<int64_t>(n) * g.in_stride[0] +
                      static_cast<int64_t>(c) * g.in_stride[1];
    acc_t acc = acc_t(0);
    for (int b = 0; b < kx; ++b) {
      const int32_t t = __ldg(ix + static_cast<int64_t>(J) * kx + b);
      const float w_b = __ldg(wx + static_cast<int64_t>(J) * kx + b);
      if (w_b == 0.f || t < 0 || t >= g.w) continue;
      const T* column = volume + static_cast<int64_t>(t) * g.in_stride[4];
      acc_t col = acc_t(0);
#pragma unroll
      for (int a = 0; a < kMaxTaps; ++a) {
        if (a >= kz || w_z[a] == 0.f) continue;
        const T* slice = column + off_z[a];
        const acc_t wa = static_cast<acc_t>(w_z[a]);
#pragma unroll
        for (int y = 0; y < kMaxTaps; ++y) {
          if (y < ky && w_y[y] != 0.f)
            col += wa * static_cast<acc_t>(w_y[y]) * load_acc(slice + off_y[y]);
        }
      }
      acc += static_cast<acc_t>(w_b) * col;
    }

    T* dst = out + static_cast<int64_t>(n) * g.out_stride[0] +
             static_cast<int64_t>(c) * g.out_stride[1] + static_cast<int64_t>(Z) * g.out_stride[2] +
             static_cast<int64_t>(I) * g.out_stride[3] + static_cast<int64_t>(J) * g.out_stride[4];
    store_acc(dst, acc);
  }
}

template <typename T>
void launch_dtype(const void* in, void* out, const Resample3dGeometry& g, const int32_t* iz,
                  const float* wz, int kz, const int32_t* iy, const float* wy, int ky,
                  const int32_t* ix, const float* wx, int kx, int64_t total, int blocks,
                  cudaStream_t stream) {
  const T* src = static_cast<const T*>(in);
  T* dst = static_cast<T*>(out);
  // The loop index may run past `total` by one grid's worth of threads before it stops.
  const bool narrow = total + static_cast<int64_t>(blocks) * kThreads <= static_cast<int64_t>(UINT32_MAX);
  if (narrow && g.channels_last)
    resample3d_kernel<T, uint32_t, true><<<blocks, kThreads, 0, stream>>>(
        src, dst, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, static_cast<uint32_t>(total));
  else if (narrow)
    resample3d_kernel<T, uint32_t, false><<<blocks, kThreads, 0, stream>>>(
        src, dst, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, static_cast<uint32_t>(total));
  else if (g.channels_last)
    resample3d_kernel<T, uint64_t, true><<<blocks, kThreads, 0, stream>>>(
        src, dst, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, static_cast<uint64_t>(total));
  else
    resample3d_kernel<T, uint64_t, false><<<blocks, kThreads, 0, stream>>>(
        src, dst, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, static_cast<uint64_t>(total));
}

}  // namespace

cudaError_t launch_resample3d(ResampleDtype dtype, const void* in, void* out,
                              const Resample3dGeometry& g, const int32_t* iz, const float* wz,
                              int kz, const int32_t* iy, const float* wy, int ky,
                              const int32_t* ix, const float* wx, int kx, cudaStream_t stream) {
  for (const int k : {kz, ky, kx})
    if (k < 0 || k > kMaxTaps) return cudaErrorInvalidValue;
  if (g.n < 0 || g.c < 0 || g.od < 0 || g.oh < 0 || g.ow < 0) return cudaErrorInvalidValue;
  const int64_t total = g.n * g.c * g.od * g.oh * g.ow;
  if (total == 0) return cudaSuccess;

  int blocks = 0;
  const cudaError_t err = grid_blocks(total, kThreads, &blocks);
  if (err != cudaSuccess) return err;

  switch (dtype) {
    case ResampleDtype::kFloat32:
      launch_dtype<float>(in, out, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, total, blocks, stream);
      break;
    case ResampleDtype::kFloat64:
      launch_dtype<double>(in, out, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, total, blocks, stream);
      break;
    case ResampleDtype::kFloat16:
      launch_dtype<__half>(in, out, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, total, blocks, stream);
      break;
    case ResampleDtype::kBFloat16:
      launch_dtype<__nv_bfloat16>(in, out, g, iz, wz, kz, iy, wy, ky, ix, wx, kx, total, blocks,
                                  stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda_kernels
}  // namespace msconv
