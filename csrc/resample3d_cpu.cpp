// CPU kernel of msconv::resample3d_chain: successive separable resamplings of volumes.
//
// Each level is out[Z, I, J] = sum_a wz[Z,a] sum_b wy[I,b] sum_c wx[J,c] in[iz[Z,a], iy[I,b], ix[J,c]].
// NCDHW: for every output row (Z, I), the kz * ky input rows it reads are summed into a row
// buffer (contiguous, vectorisable), then a short gather along W; the levels of one volume are
// computed back to back so the previous level is still in cache (the input is read once).
// NDHWC (channels_last_3d): the channel loop is innermost and contiguous. Half types accumulate
// in float. A factor-1 axis is an identity table (one tap of weight 1).
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

struct Level3d {
  Taps1d z, y, x;
};

// Output rows r0..r1 (row r = Z * Ho + I) of one NCDHW volume. `in` points at the volume,
// slices `sd` and rows `sh` apart, unit stride along W; `buf` holds W accumulators.
template <typename scalar_t, typename acc_t>
void volume_rows(const scalar_t* in, int64_t sd, int64_t sh, int64_t W, scalar_t* out,
                 const Level3d& t, int64_t r0, int64_t r1, acc_t* buf) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t Z = r / t.y.n, I = r % t.y.n;
    for (int64_t j = 0; j < W; ++j) buf[j] = acc_t(0);
    for (int64_t a = 0; a < t.z.k; ++a) {
      const acc_t wa = static_cast<acc_t>(t.z.w[Z * t.z.k + a]);
      if (wa == acc_t(0)) continue;
      const scalar_t* slice = in + static_cast<int64_t>(t.z.idx[Z * t.z.k + a]) * sd;
      for (int64_t b = 0; b < t.y.k; ++b) {
        const acc_t wab = wa * static_cast<acc_t>(t.y.w[I * t.y.k + b]);
        if (wab == acc_t(0)) continue;
        resample_cpu::accumulate_row(buf, slice + static_cast<int64_t>(t.y.idx[I * t.y.k + b]) * sh,
                                     wab, W);
      }
    }
    resample_cpu::gather_row(buf, out + r * t.x.n, t.x);
  }
}

template <typename scalar_t>
void chain_ncdhw(const at::Tensor& x, const std::vector<Level3d>& lv, std::vector<at::Tensor>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = x.size(1), W = x.size(4);
  const int64_t volumes = x.size(0) * C;
  const int64_t L = static_cast<int64_t>(lv.size());
  const scalar_t* xp = x.data_ptr<scalar_t>();
  std::vector<scalar_t*> op(L);
  int64_t max_w = W;
  for (int64_t l = 0; l < L; ++l) {
    op[l] = outs[l].data_ptr<scalar_t>();
    max_w = std::max(max_w, lv[l].x.n);
  }

  auto level_rows = [&](int64_t l, int64_t v, int64_t r0, int64_t r1, acc_t* buf) {
    const Level3d& t = lv[l];
    scalar_t* out = op[l] + v * t.z.n * t.y.n * t.x.n;
    if (l == 0) {
      volume_rows<scalar_t, acc_t>(xp + (v / C) * x.stride(0) + (v % C) * x.stride(1), x.stride(2),
                                   x.stride(3), W, out, t, r0, r1, buf);
    } else {
      const Level3d& p = lv[l - 1];
      volume_rows<scalar_t, acc_t>(op[l - 1] + v * p.z.n * p.y.n * p.x.n, p.y.n * p.x.n, p.x.n,
                                   p.x.n, out, t, r0, r1, buf);
    }
  };

  resample_cpu::run_levels<acc_t>(volumes, L, max_w, [&](int64_t l) { return lv[l].z.n * lv[l].y.n; }, level_rows);
}

template <typename scalar_t>
void chain_ndhwc(const at::Tensor& x, const std::vector<Level3d>& lv, std::vector<at::Tensor>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1);
  for (size_t l = 0; l < lv.size(); ++l) {
    const at::Tensor& src = l == 0 ? x : outs[l - 1];
    const int64_t Di = src.size(2), Hi = src.size(3), Wi = src.size(4);
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = outs[l].data_ptr<scalar_t>();
    const Level3d& t = lv[l];
    const int64_t rows = t.z.n * t.y.n;
    at::parallel_for(0, N * rows, 1, [&](int64_t b, int64_t e) {
      std::vector<acc_t> acc(C);
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = r / rows, Z = (r % rows) / t.y.n, I = r % t.y.n;
        for (int64_t J = 0; J < t.x.n; ++J) {
          for (int64_t c = 0; c < C; ++c) acc[c] = acc_t(0);
          for (int64_t a = 0; a < t.z.k; ++a) {
            const acc_t wa = static_cast<acc_t>(t.z.w[Z * t.z.k + a]);
            if (wa == acc_t(0)) continue;
            const int64_t slice = n * Di + t.z.idx[Z * t.z.k + a];
            for (int64_t bb = 0; bb < t.y.k; ++bb) {
              const acc_t wab = wa * static_cast<acc_t>(t.y.w[I * t.y.k + bb]);
              if (wab == acc_t(0)) continue;
              const int64_t row = (slice * Hi + t.y.idx[I * t.y.k + bb]) * Wi;
              for (int64_t cc = 0; cc < t.x.k; ++cc) {
                const acc_t w3 = wab * static_cast<acc_t>(t.x.w[J * t.x.k + cc]);
                if (w3 == acc_t(0)) continue;
                const scalar_t* px = in + (row + t.x.idx[J * t.x.k + cc]) * C;
                for (int64_t c = 0; c < C; ++c) acc[c] += w3 * static_cast<acc_t>(px[c]);
              }
            }
          }
          scalar_t* po = out + ((r * t.x.n) + J) * C;
          for (int64_t c = 0; c < C; ++c) po[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  }
}

std::vector<at::Tensor> resample3d_chain_cpu(const at::Tensor& x_in, at::TensorList iz,
                                             at::TensorList wz, at::TensorList iy,
                                             at::TensorList wy, at::TensorList ix,
                                             at::TensorList wx) {
  constexpr const char* op = "resample3d_chain";
  TORCH_CHECK(x_in.dim() == 5, op, ": x must be N x C x D x H x W, got x.shape=", x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), op, ": x must be a floating tensor, got ",
              x_in.scalar_type());
  const size_t L = iz.size();
  TORCH_CHECK(wz.size() == L && iy.size() == L && wy.size() == L && ix.size() == L &&
                  wx.size() == L,
              op, ": iz, wz, iy, wy, ix, wx must have one table per level, got ", iz.size(), ", ",
              wz.size(), ", ", iy.size(), ", ", wy.size(), ", ", ix.size(), ", ", wx.size());
  // Same rule as msconv/ops/transfer3d.py:_is_channels_last_3d (the fake kernels must agree).
  const bool ndhwc =
      x_in.is_contiguous(at::MemoryFormat::ChannelsLast3d) && !x_in.is_contiguous();
  at::Tensor x = x_in;
  if (!ndhwc && x.stride(4) != 1) x = x.contiguous();
  const auto fmt = ndhwc ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;

  std::vector<Level3d> lv;
  std::vector<at::Tensor> outs;
  int64_t d = x.size(2), h = x.size(3), w = x.size(4);
  for (size_t l = 0; l < L; ++l) {
    resample_cpu::check_taps(op, iz[l], wz[l], "iz/wz", l, d, x);
    resample_cpu::check_taps(op, iy[l], wy[l], "iy/wy", l, h, x);
    resample_cpu::check_taps(op, ix[l], wx[l], "ix/wx", l, w, x);
    lv.push_back({taps_of(iz[l], wz[l]), taps_of(iy[l], wy[l]), taps_of(ix[l], wx[l])});
    d = iz[l].size(0);
    h = iy[l].size(0);
    w = ix[l].size(0);
    outs.push_back(at::empty({x.size(0), x.size(1), d, h, w}, x.options().memory_format(fmt)));
  }
  if (x.numel() == 0 || L == 0) return outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resample3d_chain_cpu",
                                  [&] {
                                    if (ndhwc)
                                      chain_ndhwc<scalar_t>(x, lv, outs);
                                    else
                                      chain_ncdhw<scalar_t>(x, lv, outs);
                                  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(msconv, CPU, m) { m.impl("resample3d_chain", &resample3d_chain_cpu); }

}  // namespace msconv
