// Pieces shared by the CPU resampling kernels (resample2d_cpu.cpp, resample3d_cpu.cpp): the 1-D
// tap tables every axis is given as, their checks, and the two loops a separable level is built
// from (a weighted sum of input rows into a row buffer, then a short gather along the last axis).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace msconv {
namespace resample_cpu {

// One axis of a level: out[i] = sum_k w[i,k] * in[idx[i,k]]; padded slots have weight 0.
struct Taps1d {
  const int32_t* idx;
  const float* w;
  int64_t n;  // output length
  int64_t k;  // taps per output (padded with weight 0)
};

inline Taps1d taps_of(const at::Tensor& idx, const at::Tensor& w) {
  return {idx.data_ptr<int32_t>(), w.data_ptr<float>(), idx.size(0), idx.size(1)};
}

// `op` names the op in the message; `in_len` is the length of the axis the table reads.
inline void check_taps(const char* op, const at::Tensor& idx, const at::Tensor& w, const char* name,
                       int64_t l, int64_t in_len, const at::Tensor& x) {
  TORCH_CHECK(idx.device() == x.device() && w.device() == x.device(), op, ": tap tables ", name,
              "[", l, "] are on ", idx.device(), " but x is on ", x.device(),
              "; move them to x.device");
  TORCH_CHECK(idx.dim() == 2 && w.sizes() == idx.sizes(), op, ": ", name, "[", l,
              "] must be 2-D index/weight tables of equal shape, got ", idx.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt && w.scalar_type() == at::kFloat, op, ": ", name, "[",
              l, "] tables must be int32 / float32");
  TORCH_CHECK(idx.is_contiguous() && w.is_contiguous(), op, ": ", name,
              " tables must be contiguous");
  if (idx.numel() > 0) {
    const auto mn = idx.min().item<int32_t>(), mx = idx.max().item<int32_t>();
    TORCH_CHECK(mn >= 0 && mx < in_len, op, ": ", name, "[", l, "] indexes [", mn, ", ", mx,
                "] outside an input of length ", in_len);
  }
}

// buf[j] += wa * row[j], j < n: unit strides, so the compiler vectorises it.
template <typename scalar_t, typename acc_t>
inline void accumulate_row(acc_t* buf, const scalar_t* row, acc_t wa, int64_t n) {
  for (int64_t j = 0; j < n; ++j) buf[j] += wa * static_cast<acc_t>(row[j]);
}

// Horizontal pass: out_row[J] = sum_b wx[J,b] * buf[ix[J,b]]; K = 0 means "read tx.k".
template <int K, typename scalar_t, typename acc_t>
inline void gather_row_k(const acc_t* buf, scalar_t* out_row, const Taps1d& tx) {
  const int64_t k = K > 0 ? K : tx.k;
  const int32_t* idx = tx.idx;
  const float* w = tx.w;
  for (int64_t J = 0; J < tx.n; ++J, idx += k, w += k) {
    acc_t s = acc_t(0);
    for (int64_t b = 0; b < k; ++b) s += static_cast<acc_t>(w[b]) * buf[idx[b]];
    out_row[J] = static_cast<scalar_t>(s);
  }
}

template <typename scalar_t, typename acc_t>
inline void gather_row(const acc_t* buf, scalar_t* out_row, const Taps1d& tx) {
  switch (tx.k) {  // a compile-time tap count lets the compiler unroll the gather
    case 1: return gather_row_k<1>(buf, out_row, tx);
    case 2: return gather_row_k<2>(buf, out_row, tx);
    case 3: return gather_row_k<3>(buf, out_row, tx);
    case 4: return gather_row_k<4>(buf, out_row, tx);
    default: return gather_row_k<0>(buf, out_row, tx);
  }
}

// Calls level_rows(l, v, r0, r1, buf) for every level l < L, plane or volume v < volumes and
// output row r < rows(l) of it, with `buf` a scratch row of `buf_len` accumulators per thread.
// Enough volumes: each goes through every level on one thread while its data is cache resident
// (so the input is read once). Few: each level is split by rows so every thread has work.
template <typename acc_t, typename Rows, typename LevelRows>
void run_levels(int64_t volumes, int64_t L, int64_t buf_len, const Rows& rows,
                const LevelRows& level_rows) {
  if (volumes >= at::get_num_threads()) {
    at::parallel_for(0, volumes, 1, [&](int64_t v0, int64_t v1) {
      std::vector<acc_t> buf(buf_len);
      for (int64_t v = v0; v < v1; ++v)
        for (int64_t l = 0; l < L; ++l) level_rows(l, v, 0, rows(l), buf.data());
    });
    return;
  }
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n = rows(l);
    at::parallel_for(0, volumes * n, 16, [&](int64_t b, int64_t e) {
      std::vector<acc_t> buf(buf_len);
      while (b < e) {
        const int64_t v = b / n, r0 = b % n;
        const int64_t r1 = std::min(n, r0 + (e - b));
        level_rows(l, v, r0, r1, buf.data());
        b += r1 - r0;
      }
    });
  }
}

}  // namespace resample_cpu
}  // namespace msconv
