// Launcher interface of the CUDA resample kernel, shared by resample2d_kernel.cu (which
// defines it) and resample2d_cuda.cpp (the torch-facing op). Only the CUDA runtime header:
// no torch/ATen, so `nvcc -c resample2d_kernel.cu` works without a CUDA build of torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace msconv {
namespace cuda_kernels {

enum class ResampleDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Sizes and strides (in elements, NCHW order) of one level's input and output.
struct Resample2dGeometry {
  int64_t n, c, h, w;     // input sizes
  int64_t ho, wo;         // output sizes
  int64_t in_stride[4];   // input strides, any (sliced, expanded, channels_last, ...)
  int64_t out_stride[4];  // output strides
  bool channels_last;     // output memory order is n, ho, wo, c (else n, c, ho, wo)
};

// Taps per output sample and direction; the host side checks tables against it.
constexpr int kMaxTaps = 8;

// out[n,c,I,J] = sum_b wx[J,b] * sum_a wy[I,a] * in[n,c,iy[I,a],ix[J,b]] on `stream`.
// iy/wy are [ho, ky], ix/wx are [wo, kx] device arrays. Returns the launch status.
cudaError_t launch_resample2d(ResampleDtype dtype, const void* in, void* out,
                              const Resample2dGeometry& g, const int32_t* iy, const float* wy,
                              int ky, const int32_t* ix, const float* wx, int kx,
                              cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace msconv
