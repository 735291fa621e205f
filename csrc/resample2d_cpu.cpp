// CPU kernel of msconv::resample2d_chain.
//
// Each level is out[I, J] = sum_a wy[I,a] * sum_b wx[J,b] * in[iy[I,a], ix[J,b]].
// NCHW: a vertical pass into a row buffer (contiguous, vectorisable) then a short horizontal
// gather; levels of one plane are computed back to back so the previous level is still in
// cache (the input is read once). NHWC (channels_last): the channel loop is innermost and
// contiguous. Half types accumulate in float.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "resample_cpu.h"

namespace msconv {
namespace {

using resample_cpu::Taps1d;
using resample_cpu::taps_of;

// One output row of an NCHW plane. `in` points at the plane, rows `in_sh` apart, unit
// stride along W. `buf` holds W accumulators.
template <typename scalar_t, typename acc_t>
inline void plane_row(const scalar_t* in, int64_t in_sh, int64_t W, scalar_t* out_row,
                      const Taps1d& ty, const Taps1d& tx, int64_t I, acc_t* buf) {
  for (int64_t j = 0; j < W; ++j) buf[j] = acc_t(0);
  for (int64_t a = 0; a < ty.k; ++a) {
    const acc_t wa = static_cast<acc_t>(ty.w[I * ty.k + a]);
    if (wa == acc_t(0)) continue;
    resample_cpu::accumulate_row(buf, in + static_cast<int64_t>(ty.idx[I * ty.k + a]) * in_sh, wa, W);
  }
  resample_cpu::gather_row(buf, out_row, tx);
}

template <typename scalar_t>
void chain_nchw(const at::Tensor& x, const std::vector<Taps1d>& ty, const std::vector<Taps1d>& tx,
                std::vector<at::Tensor>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t planes = N * C;
  const int64_t L = static_cast<int64_t>(ty.size());
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2);
  std::vector<scalar_t*> op(L);
  for (int64_t l = 0; l < L; ++l) op[l] = outs[l].data_ptr<scalar_t>();
  int64_t max_w = W;
  for (int64_t l = 0; l < L; ++l) max_w = std::max(max_w, tx[l].n);

  auto level_plane_rows = [&](int64_t l, int64_t p, int64_t r0, int64_t r1, acc_t* buf) {
    const scalar_t* in;
    int64_t in_sh, in_w;
    if (l == 0) {
      in = xp + (p / C) * sN + (p % C) * sC;
      in_sh = sH;
      in_w = W;
    } else {
      in = op[l - 1] + p * ty[l - 1].n * tx[l - 1].n;
      in_sh = tx[l - 1].n;
      in_w = tx[l - 1].n;
    }
    scalar_t* out = op[l] + p * ty[l].n * tx[l].n;
    for (int64_t I = r0; I < r1; ++I)
      plane_row<scalar_t, acc_t>(in, in_sh, in_w, out + I * tx[l].n, ty[l], tx[l], I, buf);
  };

  resample_cpu::run_levels<acc_t>(planes, L, max_w, [&](int64_t l) { return ty[l].n; }, level_plane_rows);
}

template <typename scalar_t>
void chain_nhwc(const at::Tensor& x, const std::vector<Taps1d>& ty, const std::vector<Taps1d>& tx,
                std::vector<at::Tensor>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t L = static_cast<int64_t>(ty.size());
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& src = l == 0 ? x : outs[l - 1];
    const int64_t Hi = src.size(2), Wi = src.size(3);
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = outs[l].data_ptr<scalar_t>();
    const Taps1d& y = ty[l];
    const Taps1d& t = tx[l];
    at::parallel_for(0, N * y.n, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(C);
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / y.n, I = r % y.n;
        for (int64_t J = 0; J < t.n; ++J) {
          for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
          for (int64_t a = 0; a < y.k; ++a) {
            const acc_t wa = static_cast<acc_t>(y.w[I * y.k + a]);
            if (wa == acc_t(0)) continue;
            const int64_t row = (n * Hi + y.idx[I * y.k + a]) * Wi;
            for (int64_t bb = 0; bb < t.k; ++bb) {
              const acc_t wab = wa * static_cast<acc_t>(t.w[J * t.k + bb]);
              if (wab == acc_t(0)) continue;
              const scalar_t* px = in + (row + t.idx[J * t.k + bb]) * C;
              for (int64_t c = 0; c < C; ++c) acc[c] += wab * static_cast<acc_t>(px[c]);
            }
          }
          scalar_t* po = out + ((n * y.n + I) * t.n + J) * C;
          for (int64_t c = 0; c < C; ++c) po[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  }
}

std::vector<at::Tensor> resample2d_chain_cpu(const at::Tensor& x_in, at::TensorList iy,
                                             at::TensorList wy, at::TensorList ix,
                                             at::TensorList wx) {
  TORCH_CHECK(x_in.dim() == 4, "resample2d_chain: x must be N x C x H x W, got x.shape=",
              x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()),
              "resample2d_chain: x must be a floating tensor, got ", x_in.scalar_type());
  const int64_t L = static_cast<int64_t>(iy.size());
  TORCH_CHECK(wy.size() == iy.size() && ix.size() == iy.size() && wx.size() == iy.size(),
              "resample2d_chain: iy, wy, ix, wx must have one table per level");
  // Same rule as msconv/ops/_common.py:is_channels_last (the fake kernels must agree).
  const bool nhwc = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  at::Tensor x = x_in;
  if (!nhwc && x.stride(3) != 1) x = x.contiguous();
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;

  std::vector<Taps1d> ty, tx;
  std::vector<at::Tensor> outs;
  int64_t h = x.size(2), w = x.size(3);
  for (int64_t l = 0; l < L; ++l) {
    resample_cpu::check_taps("resample2d_chain", iy[l], wy[l], "iy/wy", l, h, x);
    resample_cpu::check_taps("resample2d_chain", ix[l], wx[l], "ix/wx", l, w, x);
    ty.push_back(taps_of(iy[l], wy[l]));
    tx.push_back(taps_of(ix[l], wx[l]));
    h = iy[l].size(0);
    w = ix[l].size(0);
    outs.push_back(at::empty({x.size(0), x.size(1), h, w}, x.options().memory_format(fmt)));
  }
  if (x.numel() == 0 || L == 0) return outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resample2d_chain_cpu",
                                  [&] {
                                    if (nhwc)
                                      chain_nhwc<scalar_t>(x, ty, tx, outs);
                                    else
                                      chain_nchw<scalar_t>(x, ty, tx, outs);
                                  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(msconv, CPU, m) { m.impl("resample2d_chain", &resample2d_chain_cpu); }

}  // namespace msconv
