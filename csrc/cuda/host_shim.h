// Host emulation of the CUDA built-ins the kernel files use, so that *_kernel.cu compile as plain
// C++ and run on the CPU (tests/test_cuda_emulated.py). Never part of a real build: setup.py and
// nvcc do not include it; the test puts it in front of every kernel file (g++ -include) and makes
// <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> resolve to it.
//
// Execution model: a launch runs its blocks one after another with ONE thread per block
// (blockDim.x == 1, whatever the launch asked for). Every kernel here strides its loops by
// blockDim.x * gridDim.x, so one thread per block still covers every element; __syncthreads is
// trivially correct with one thread; dynamic shared memory is one zeroed buffer per block. The
// launch configuration the code asked for is recorded (msconv_shim::last_launch) for the tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

// ---------------------------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ----------------------------------------------------------------------------------- built-ins
struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
  dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
};
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() {}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T atomicAdd(T* p, T v) {  // one thread at a time: a plain read-modify-write
  const T old = *p;
  *p = old + v;
  return old;
}

// ------------------------------------------------------------------------------ runtime subset
typedef int cudaError_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace msconv_shim {
struct Launch {
  long long grid = 0, block = 0;
  size_t smem = 0;
  long long count = 0;  // launches since the last reset
};
inline Launch last_launch;
inline int sm_count = 2;  // what cudaDeviceGetAttribute reports: few SMs -> small grids -> loops stride
inline cudaError_t pending = cudaSuccess;
// The block's dynamic shared memory (`extern __shared__ T name[];` is rewritten to read it).
inline void*& dynamic_smem() {
  static void* p = nullptr;
  return p;
}
}  // namespace msconv_shim

inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = attr == cudaDevAttrMultiProcessorCount ? msconv_shim::sm_count : 0;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = msconv_shim::pending;
  msconv_shim::pending = cudaSuccess;
  return e;
}

// ------------------------------------------------------------------------------- half types
// IEEE binary16 and bfloat16 with round-to-nearest-even conversions, bit-compatible with
// torch.float16 / torch.bfloat16 storage.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ff;
  uint32_t f;
  if (exp == 0x1f) {
    f = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    f = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    f = sign;
  } else {  // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do {
      ++e;
      m <<= 1;
    } while ((m & 0x400) == 0);
    f = sign | ((112 - e) << 23) | ((m & 0x3ff) << 13);
  }
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

inline __half __float2half_rn(float v) {
  uint32_t f;
  std::memcpy(&f, &v, 4);
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t a = f & 0x7fffffffu;
  if (a >= 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0))};
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (a < 0x33000000u) return {sign};  // < 2^-25 rounds to zero
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(a >> 23);  // 14 + (113 - exp)
    const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    const uint32_t r = q + (rem > half || (rem == half && (q & 1)));
    return {static_cast<uint16_t>(sign | r)};
  }
  const uint32_t q = ((a >> 13) - (112u << 10)), rem = a & 0x1fff;
  const uint32_t r = q + (rem > 0x1000 || (rem == 0x1000 && (q & 1)));
  return {static_cast<uint16_t>(sign | r)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t f = static_cast<uint32_t>(b.bits) << 16;
  float out;
  std::memcpy(&out, &f, 4);
  return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t f;
  std::memcpy(&f, &v, 4);
  if ((f & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((f >> 16) | 0x40)};  // quiet NaN
  const uint32_t r = f + 0x7fffu + ((f >> 16) & 1);
  return {static_cast<uint16_t>(r >> 16)};
}

// ------------------------------------------------------------------------------------ launches
namespace msconv_shim {

// What `kernel<<<grid, block, smem, stream>>>(args...)` becomes (tests/test_cuda_emulated.py
// rewrites the launch syntax to `msconv_shim::launch(grid, block, smem, stream, kernel)(args...)`).
template <typename Kernel>
auto launch(long long grid, long long block, size_t smem, cudaStream_t, Kernel kernel) {
  return [=](auto... args) {
    last_launch.grid = grid;
    last_launch.block = block;
    last_launch.smem = smem;
    ++last_launch.count;
    if (grid <= 0 || block <= 0 || block > 1024 || grid > 2147483647LL) {
      pending = cudaErrorInvalidConfiguration;
      return;
    }
    gridDim = dim3(static_cast<unsigned>(grid));
    blockDim = dim3(1);  // one thread per block: see the top of this file
    threadIdx = uint3{};
    std::vector<double> buffer((smem + sizeof(double) - 1) / sizeof(double) + 1);
    for (long long b = 0; b < grid; ++b) {
      blockIdx = uint3{static_cast<unsigned>(b), 0, 0};
      std::memset(buffer.data(), 0, buffer.size() * sizeof(double));
      dynamic_smem() = buffer.data();
      kernel(args...);
    }
    dynamic_smem() = nullptr;
  };
}

}  // namespace msconv_shim
