// Helpers shared by the CPU kernel files of the mesh-free ops (mf_jets_cpu.cpp, mf_conv_cpu.cpp):
// the bounds the kernels promise, the instruction-set choice and the filter table in the
// accumulation type.
//
// Instruction sets: each kernel file compiles its kernel bodies twice, once for the baseline ISA
// and, where MSCONV_CPU_AVX2 is defined (GCC on x86-64, which can target AVX2 per function
// with `#pragma GCC target`), once more for AVX2+FMA; use_avx2() picks at run time.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MSCONV_CPU_AVX2 1
#endif

namespace msconv {
namespace cpu {

// The Python ops check the same numbers (MAX_ORDER, MAX_TAPS in msconv/ops/mf_jets.py);
// the CUDA kernels have their own copy (csrc/cuda/mf_jets_kernel.h).
constexpr int64_t kMaxOrder = 8;
constexpr int64_t kMaxTaps = 256;

// Whether this CPU runs the AVX2+FMA build of the kernel bodies (checked once).
inline bool use_avx2() {
#ifdef MSCONV_CPU_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// filt [order + 1, K], any floating dtype and strides, as a row-major vector of T.
template <typename T>
std::vector<T> filt_vector(const at::Tensor& filt) {
  const at::Tensor f = filt.to(at::kDouble).contiguous();
  const double* p = f.data_ptr<double>();
  return std::vector<T>(p, p + f.numel());
}

}  // namespace cpu
}  // namespace msconv
