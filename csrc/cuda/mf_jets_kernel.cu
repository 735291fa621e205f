// CUDA kernels of msconv::mf_jets_fwd / mf_jets_adj (see mf_jets_kernel.h for the contract).
//
// Direct kernels, one thread per output element: the forward thread owns pixel (n, c, i, j) and
// all M jets — per tap row t it filters its K inputs horizontally once per x-order a (p+1
// values in registers), then adds them to the jets with weight filt[b, t]; the adjoint thread
// owns one xp element and gathers over the (i, t), (j, q) pairs that read it (no atomics,
// deterministic). Filters live in shared memory. The order is a template parameter so the
// per-thread jet and row arrays are registers. Half types accumulate in float, double in double.
//
// No torch/ATen headers here, so that `nvcc -c` compile-checks this file on a machine without a
// CUDA build of torch; the torch-facing ops are in mf_jets_cuda.cpp.
#include "mf_jets_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernel_common.h"

namespace msconv {
namespace cuda_kernels {

namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ void load_filters(acc_t* sf, const acc_t* filt, int count) {
  for (int e = threadIdx.x; e < count; e += blockDim.x) sf[e] = filt[e];
  __syncthreads();
}

template <typename T, int P>
__global__ void __launch_bounds__(kThreads)
    mf_jets_fwd_kernel(const T* __restrict__ xp, T* __restrict__ jets,
                       const acc_type<T>* __restrict__ filt, const MfJetsGeometry g) {
  using acc_t = acc_type<T>;
  constexpr int M = (P + 1) * (P + 2) / 2;
  extern __shared__ unsigned char smem_raw[];
  acc_t* f = reinterpret_cast<acc_t*>(smem_raw);
  const int K = g.k, S = g.stride;
  load_filters(f, filt, (P + 1) * K);

  const int64_t total = g.n * g.c * g.ho * g.wo;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = e;
    const int64_t j = r % g.wo;
    r /= g.wo;
    const int64_t i = r % g.ho;
    r /= g.ho;
    const int64_t c = r % g.c;
    const int64_t n = r / g.c;
    const T* base = xp + n * g.x_stride[0] + c * g.x_stride[1] + i * S * g.x_stride[2] +
                    j * S * g.x_stride[3];
    acc_t jet[M];
#pragma unroll
    for (int m = 0; m < M; ++m) jet[m] = acc_t(0);
    for (int t = 0; t < K; ++t) {
      const T* row = base + t * g.x_stride[2];
      acc_t h[P + 1];
#pragma unroll
      for (int a = 0; a <= P; ++a) h[a] = acc_t(0);
      for (int q = 0; q < K; ++q) {
        const acc_t v = to_acc(row[q * g.x_stride[3]]);
#pragma unroll
        for (int a = 0; a <= P; ++a) h[a] += f[a * K + q] * v;
      }
      int m = 0;
#pragma unroll
      for (int d = 0; d <= P; ++d)
#pragma unroll
        for (int b = 0; b <= d; ++b, ++m) jet[m] += f[b * K + t] * h[d - b];
    }
    T* out = jets + n * g.j_stride[0] + c * M * g.j_stride[1] + i * g.j_stride[2] + j * g.j_stride[3];
#pragma unroll
    for (int m = 0; m < M; ++m) store_acc(out + m * g.j_stride[1], jet[m]);
  }
}

template <typename T, int P>
__global__ void __launch_bounds__(kThreads)
    mf_jets_adj_kernel(const T* __restrict__ jets_grad, T* __restrict__ xp_grad,
                       const acc_type<T>* __restrict__ filt, const MfJetsGeometry g) {
  using acc_t = acc_type<T>;
  constexpr int M = (P + 1) * (P + 2) / 2;
  extern __shared__ unsigned char smem_raw[];
  acc_t* f = reinterpret_cast<acc_t*>(smem_raw);
  const int K = g.k, S = g.stride;
  load_filters(f, filt, (P + 1) * K);

  const int64_t total = g.n * g.c * g.hp * g.wp;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t r = e;
    const int64_t x = r % g.wp;
    r /= g.wp;
    const int64_t y = r % g.hp;
    r /= g.hp;
    const int64_t c = r % g.c;
    const int64_t n = r / g.c;
    const T* gbase = jets_grad + n * g.j_stride[0] + c * M * g.j_stride[1];
    acc_t acc = acc_t(0);
    // Output rows i = (y - t)/S and columns j = (x - q)/S that read (y, x).
    for (int t = static_cast<int>(y % S); t < K && t <= y; t += S) {
      const int64_t i = (y - t) / S;
      if (i >= g.ho) continue;
      acc_t u[M];  // sum over q of filt[a_m, q] * G_m[i, j(q)]
#pragma unroll
      for (int m = 0; m < M; ++m) u[m] = acc_t(0);
      for (int q = static_cast<int>(x % S); q < K && q <= x; q += S) {
        const int64_t j = (x - q) / S;
        if (j >= g.wo) continue;
        const T* gp = gbase + i * g.j_stride[2] + j * g.j_stride[3];
        int m = 0;
#pragma unroll
        for (int d = 0; d <= P; ++d)
#pragma unroll
          for (int b = 0; b <= d; ++b, ++m) u[m] += f[(d - b) * K + q] * to_acc(gp[m * g.j_stride[1]]);
      }
      int m = 0;
#pragma unroll
      for (int d = 0; d <= P; ++d)
#pragma unroll
        for (int b = 0; b <= d; ++b, ++m) acc += f[b * K + t] * u[m];
    }
    store_acc(xp_grad + n * g.x_stride[0] + c * g.x_stride[1] + y * g.x_stride[2] + x * g.x_stride[3],
          acc);
  }
}

template <typename T, int P>
void launch_order(bool adjoint, const void* in, void* out, const void* filt,
                  const MfJetsGeometry& g, int blocks, cudaStream_t stream) {
  using acc_t = acc_type<T>;
  const size_t smem = static_cast<size_t>(P + 1) * g.k * sizeof(acc_t);
  if (adjoint)
    mf_jets_adj_kernel<T, P><<<blocks, kThreads, smem, stream>>>(
        static_cast<const T*>(in), static_cast<T*>(out), static_cast<const acc_t*>(filt), g);
  else
    mf_jets_fwd_kernel<T, P><<<blocks, kThreads, smem, stream>>>(
        static_cast<const T*>(in), static_cast<T*>(out), static_cast<const acc_t*>(filt), g);
}

template <typename T>
void launch_dtype(bool adjoint, const void* in, void* out, const void* filt,
                  const MfJetsGeometry& g, int blocks, cudaStream_t stream) {
  switch (g.order) {
    case 0: return launch_order<T, 0>(adjoint, in, out, filt, g, blocks, stream);
    case 1: return launch_order<T, 1>(adjoint, in, out, filt, g, blocks, stream);
    case 2: return launch_order<T, 2>(adjoint, in, out, filt, g, blocks, stream);
    case 3: return launch_order<T, 3>(adjoint, in, out, filt, g, blocks, stream);
    case 4: return launch_order<T, 4>(adjoint, in, out, filt, g, blocks, stream);
    case 5: return launch_order<T, 5>(adjoint, in, out, filt, g, blocks, stream);
    case 6: return launch_order<T, 6>(adjoint, in, out, filt, g, blocks, stream);
    case 7: return launch_order<T, 7>(adjoint, in, out, filt, g, blocks, stream);
    default: return launch_order<T, 8>(adjoint, in, out, filt, g, blocks, stream);
  }
}

cudaError_t launch(bool adjoint, MfDtype dtype, const void* in, void* out, const void* filt,
                   const MfJetsGeometry& g, cudaStream_t stream) {
  if (g.order < 0 || g.order > kMfMaxOrder || g.k < 1 || g.k > kMfMaxTaps || g.stride < 1)
    return cudaErrorInvalidValue;
  if (g.hp < g.k || g.wp < g.k || g.n < 0 || g.c < 0) return cudaErrorInvalidValue;
  const int64_t total = adjoint ? g.n * g.c * g.hp * g.wp : g.n * g.c * g.ho * g.wo;
  if (total == 0) return cudaSuccess;
  int blocks = 0;
  const cudaError_t err = grid_blocks(total, kThreads, &blocks);
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case MfDtype::kFloat32: launch_dtype<float>(adjoint, in, out, filt, g, blocks, stream); break;
    case MfDtype::kFloat64: launch_dtype<double>(adjoint, in, out, filt, g, blocks, stream); break;
    case MfDtype::kFloat16: launch_dtype<__half>(adjoint, in, out, filt, g, blocks, stream); break;
    case MfDtype::kBFloat16:
      launch_dtype<__nv_bfloat16>(adjoint, in, out, filt, g, blocks, stream);
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_mf_jets_fwd(MfDtype dtype, const void* xp, void* jets, const void* filt,
                               const MfJetsGeometry& g, cudaStream_t stream) {
  return launch(false, dtype, xp, jets, filt, g, stream);
}

cudaError_t launch_mf_jets_adj(MfDtype dtype, const void* jets_grad, void* xp_grad,
                               const void* filt, const MfJetsGeometry& g, cudaStream_t stream) {
  return launch(true, dtype, jets_grad, xp_grad, filt, g, stream);
}

}  // namespace cuda_kernels
}  // namespace msconv
