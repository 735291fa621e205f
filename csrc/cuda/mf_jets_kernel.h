// Launcher interface of the CUDA mesh-free jets kernels, shared by mf_jets_kernel.cu (which
// defines it) and mf_jets_cuda.cpp (the torch-facing ops). Only the CUDA runtime header: no
// torch/ATen, so `nvcc -c mf_jets_kernel.cu` works without a CUDA build of torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace msconv {
namespace cuda_kernels {

enum class MfDtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Same bounds as the CPU kernels and msconv/ops/mf_jets.py.
constexpr int kMfMaxOrder = 8;
constexpr int kMfMaxTaps = 256;

// Sizes and element strides (NCHW order) of the padded field xp (N, C, Hp, Wp) and the jets
// (N, C*M, Ho, Wo); any strides (sliced, channels_last, expanded).
struct MfJetsGeometry {
  int64_t n, c, hp, wp, ho, wo;
  int order, k, stride;
  int64_t x_stride[4];  // xp (forward input / adjoint output)
  int64_t j_stride[4];  // jets (forward output / adjoint input)
};

// Forward: jets[n, c*M+m, i, j] = sum_t sum_q filt[b,t] filt[a,q] xp[n, c, i*S+t, j*S+q].
// filt is a device array [order+1, K] in the accumulation type (double for kFloat64, else float).
cudaError_t launch_mf_jets_fwd(MfDtype dtype, const void* xp, void* jets, const void* filt,
                               const MfJetsGeometry& g, cudaStream_t stream);

// Adjoint (gradient w.r.t. xp), a gather: every xp element sums the jets that read it.
cudaError_t launch_mf_jets_adj(MfDtype dtype, const void* jets_grad, void* xp_grad,
                               const void* filt, const MfJetsGeometry& g, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace msconv
