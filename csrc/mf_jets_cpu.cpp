// CPU kernels of msconv::mf_jets_fwd and msconv::mf_jets_adj: the mesh-free convolution jets
//   J[n, c*M + m, i, j] = sum_t sum_q filt[b, t] * filt[a, q] * xp[n, c, i*S + t, j*S + q]
// ((a, b) = mf_multi_indices(order)[m]) and their adjoint, the gradient w.r.t. xp.
//
// Separable and fused per output row: a vertical pass makes the p+1 row-filtered rows V_b (only
// for the output rows, so the y-stride costs nothing), then M horizontal passes read them while
// they are in L1/L2; V is never materialised for the whole image. The adjoint is a gather over
// the output rows that touched each input row: no atomics, deterministic. NCHW runs per plane;
// channels_last (NHWC) runs per image with the C channels of a pixel as one contiguous vector,
// so the input is not copied (measured, 2x96x96 K=19 p=2, one thread: NHWC-native forward is
// 0.7-0.8x the NCHW time for C = 3..64, where copying to NCHW and back costs 1.4-3x; the NHWC
// adjoint permutes grad once and runs 1.2-1.6x the NCHW time). Half types accumulate in float, double in double. Parallel over
// (plane or image) x rows with at::parallel_for. Kernel bodies: mf_jets_cpu_body.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace msconv {
namespace mf_generic {
#include "mf_jets_cpu_body.h"
}  // namespace mf_generic

#ifdef MSCONV_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mf_avx2 {
#include "mf_jets_cpu_body.h"
}  // namespace mf_avx2
#pragma GCC pop_options
#endif

namespace {

template <typename scalar_t, typename acc_t>
struct GenericImpl {
  using Geom = mf_generic::JetGeom;
  template <typename... A>
  static void forward(A&&... a) { mf_generic::jets_forward<scalar_t, acc_t>(std::forward<A>(a)...); }
  template <typename... A>
  static void adjoint(A&&... a) { mf_generic::jets_adjoint<scalar_t, acc_t>(std::forward<A>(a)...); }
};

#ifdef MSCONV_CPU_AVX2
template <typename scalar_t, typename acc_t>
struct Avx2Impl {
  using Geom = mf_avx2::JetGeom;
  template <typename... A>
  static void forward(A&&... a) { mf_avx2::jets_forward<scalar_t, acc_t>(std::forward<A>(a)...); }
  template <typename... A>
  static void adjoint(A&&... a) { mf_avx2::jets_adjoint<scalar_t, acc_t>(std::forward<A>(a)...); }
};
#endif

using cpu::filt_vector;
using cpu::kMaxOrder;
using cpu::kMaxTaps;
using cpu::use_avx2;

bool is_nhwc(const at::Tensor& t) {
  // Same rule as msconv/ops/_common.py:is_channels_last (the fake kernels must agree).
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

template <typename Geom>
Geom make_geom(int64_t N, int64_t C, int64_t order, int64_t K, int64_t S, int64_t Hp, int64_t Wp,
               bool nhwc) {
  Geom g;
  g.C = C;
  g.Cv = nhwc ? C : 1;
  g.units = nhwc ? N : N * C;
  g.P1 = order + 1;
  g.M = (order + 1) * (order + 2) / 2;
  g.K = K;
  g.S = S;
  g.Hp = Hp;
  g.Wp = Wp;
  g.Ho = (Hp - K) / S + 1;
  g.Wo = (Wp - K) / S + 1;
  for (int64_t d = 0; d <= order; ++d)
    for (int64_t b = 0; b <= d; ++b) {
      g.ja.push_back(d - b);
      g.jb.push_back(b);
    }
  return g;
}

void check_common(const char* op, const at::Tensor& t, const char* tname, const at::Tensor& filt,
                  int64_t order, int64_t stride) {
  TORCH_CHECK(t.dim() == 4, op, ": ", tname, " must be N x C x H x W, got ", tname, ".shape=",
              t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": ", tname, " must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK(t.device().is_cpu() && filt.device().is_cpu(), op, ": CPU kernel got ", tname,
              " on ", t.device(), " and filt on ", filt.device());
  TORCH_CHECK(order >= 0 && order <= kMaxOrder, op, ": order must be in [0, ", kMaxOrder,
              "], got order=", order);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got stride=", stride);
  TORCH_CHECK(filt.dim() == 2 && filt.size(0) == order + 1, op,
              ": filt must be [order + 1, K] = [", order + 1, ", K], got filt.shape=",
              filt.sizes());
  TORCH_CHECK(at::isFloatingType(filt.scalar_type()), op, ": filt must be floating, got ",
              filt.scalar_type());
  TORCH_CHECK(filt.size(1) >= 1 && filt.size(1) <= kMaxTaps, op, ": filt has K=", filt.size(1),
              " taps; the kernels support 1 <= K <= ", kMaxTaps,
              " (a wider footprint means sigma/scale is too large for a direct kernel)");
}

at::Tensor mf_jets_fwd_cpu(const at::Tensor& xp_in, const at::Tensor& filt, int64_t order,
                           int64_t stride) {
  check_common("mf_jets_fwd", xp_in, "xp", filt, order, stride);
  const int64_t N = xp_in.size(0), C = xp_in.size(1), Hp = xp_in.size(2), Wp = xp_in.size(3);
  const int64_t K = filt.size(1), S = stride;
  TORCH_CHECK(Hp >= K && Wp >= K, "mf_jets_fwd: the padded input must be at least K x K = ", K,
              " x ", K, ", got xp.shape=", xp_in.sizes(), "; pad by more or use a smaller sigma");
  const bool nhwc = is_nhwc(xp_in);
  at::Tensor xp = xp_in;
  if (!nhwc && xp.stride(3) != 1) xp = xp.contiguous();
  const int64_t M = (order + 1) * (order + 2) / 2;
  const int64_t Ho = (Hp - K) / S + 1, Wo = (Wp - K) / S + 1;
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({N, C * M, Ho, Wo}, xp.options().memory_format(fmt));
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xp.scalar_type(), "mf_jets_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto f = filt_vector<acc_t>(filt);
    const scalar_t* in = xp.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t sN = xp.stride(0), sC = xp.stride(1), sH = xp.stride(2);
    const int64_t oN = out.stride(0), oC = out.stride(1), oH = out.stride(2), oW = out.stride(3);
    auto run = [&](auto ns_tag) {
      using Impl = decltype(ns_tag);
      using G = typename Impl::Geom;
      G g = make_geom<G>(N, C, order, K, S, Hp, Wp, nhwc);
      if (nhwc) {
        // Unit = image n; flat element e = j*C + c sits at j*oW + c*M*oC = e*M (oC = 1).
        Impl::forward(g, in, [&](int64_t u) { return u * sN; }, sH, o,
                       [&](int64_t u, int64_t m) { return u * oN + m * oC; }, oH, M, f);
      } else {
        Impl::forward(g, in, [&](int64_t u) { return (u / C) * sN + (u % C) * sC; }, sH, o,
                       [&](int64_t u, int64_t m) { return (u / C) * oN + ((u % C) * M + m) * oC; },
                       oH, oW, f);
      }
    };
#ifdef MSCONV_CPU_AVX2
    if (use_avx2()) return run(Avx2Impl<scalar_t, acc_t>{});
#endif
    run(GenericImpl<scalar_t, acc_t>{});
  });
  return out;
}

at::Tensor mf_jets_adj_cpu(const at::Tensor& grad_in, const at::Tensor& filt, int64_t order,
                           int64_t stride, int64_t hp, int64_t wp) {
  check_common("mf_jets_adj", grad_in, "grad", filt, order, stride);
  const int64_t K = filt.size(1), S = stride;
  const int64_t M = (order + 1) * (order + 2) / 2;
  TORCH_CHECK(hp >= K && wp >= K, "mf_jets_adj: the padded input size (hp, wp) = (", hp, ", ", wp,
              ") must be at least K x K = ", K, " x ", K);
  const int64_t Ho = (hp - K) / S + 1, Wo = (wp - K) / S + 1;
  TORCH_CHECK(grad_in.size(1) % M == 0 && grad_in.size(2) == Ho && grad_in.size(3) == Wo,
              "mf_jets_adj: grad must be [N, C*M, Ho, Wo] with M=", M, ", Ho=", Ho, ", Wo=", Wo,
              " for (hp, wp)=(", hp, ", ", wp, "), K=", K, ", stride=", S, "; got grad.shape=",
              grad_in.sizes());
  const int64_t N = grad_in.size(0), C = grad_in.size(1) / M;
  const bool nhwc = is_nhwc(grad_in);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({N, C, hp, wp}, grad_in.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  if (grad_in.numel() == 0) return out.zero_();
  // The gather reads rows of one jet as contiguous runs: NCHW grad with unit stride along W,
  // or for NHWC, jet-major rows [N, Ho, M, Wo, C] (one permuting copy of grad).
  at::Tensor grad;
  if (nhwc) {
    grad = grad_in.view({N, C, M, Ho, Wo}).permute({0, 3, 2, 4, 1}).contiguous();
  } else {
    grad = grad_in.stride(3) == 1 ? grad_in : grad_in.contiguous();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mf_jets_adj_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto f = filt_vector<acc_t>(filt);
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t oN = out.stride(0), oC = out.stride(1), oH = out.stride(2);
    auto run = [&](auto ns_tag) {
      using Impl = decltype(ns_tag);
      using G = typename Impl::Geom;
      G g = make_geom<G>(N, C, order, K, S, hp, wp, nhwc);
      if (nhwc) {
        // grad [N, Ho, M, Wo, C] contiguous: jet m of image u, row i at ((u*Ho + i)*M + m)*Wo*C.
        const int64_t row = Wo * C;
        Impl::adjoint(g, gp, [&](int64_t u, int64_t m) { return (u * Ho * M + m) * row; },
                       M * row, o, [&](int64_t u) { return u * oN; }, oH, f);
      } else {
        const int64_t gN = grad.stride(0), gC = grad.stride(1), gH = grad.stride(2);
        Impl::adjoint(g, gp,
                       [&](int64_t u, int64_t m) { return (u / C) * gN + ((u % C) * M + m) * gC; },
                       gH, o, [&](int64_t u) { return (u / C) * oN + (u % C) * oC; }, oH, f);
      }
    };
#ifdef MSCONV_CPU_AVX2
    if (use_avx2()) return run(Avx2Impl<scalar_t, acc_t>{});
#endif
    run(GenericImpl<scalar_t, acc_t>{});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(msconv, CPU, m) {
  m.impl("mf_jets_fwd", &mf_jets_fwd_cpu);
  m.impl("mf_jets_adj", &mf_jets_adj_cpu);
}

}  // namespace msconv

#pragma GCC diagnostic pop
