// Launcher interface of the CUDA 3-D resample kernel, shared by resample3d_kernel.cu (which defines
// it) and resample3d_cuda.cpp (the torch-facing op). Only the CUDA runtime header: no torch/ATen,
// so `nvcc -c resample3d_kernel.cu` works without a CUDA build of torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "resample2d_kernel.h"  // ResampleDtype, kMaxTaps: the same for both kernels

namespace msconv {
namespace cuda_kernels {

// Sizes and strides (in elements, NCDHW order) of one level's input and output.
struct Resample3dGeometry {
  int64_t n, c, d, h, w;  // input sizes
  int64_t od, oh, ow;     // output sizes
  int64_t in_stride[5];   // input strides, any (sliced, expanded, channels_last_3d, ...)
  int64_t out_stride[5];  // output strides
  bool channels_last;     // output memory order is n, od, oh, ow, c (else n, c, od, oh, ow)
};

// out[n,c,Z,I,J] = sum_b wx[J,b] * sum_a sum_e wz[Z,a] wy[I,e] * in[n,c,iz[Z,a],iy[I,e],ix[J,b]]
// on `stream`. iz/wz are [od, kz], iy/wy [oh, ky], ix/wx [ow, kx] device arrays. Returns the
// launch status.
cudaError_t launch_resample3d(ResampleDtype dtype, const void* in, void* out,
                              const Resample3dGeometry& g, const int32_t* iz, const float* wz,
                              int kz, const int32_t* iy, const float* wy, int ky,
                              const int32_t* ix, const float* wx, int kx, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace msconv
