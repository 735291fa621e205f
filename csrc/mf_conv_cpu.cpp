// CPU kernels of msconv::mf_conv_fwd / mf_conv_bwd: the whole stride-1 mesh-free convolution
// (jets and channel mix) fused per tile of output rows, so neither the jets nor the separable
// intermediates are written to memory (msconv/ops/mf_conv_fused.py has the op, its autograd and
// its plain-PyTorch twin; kernel bodies in mf_conv_cpu_body.h). The GEMMs go through at::mm_out
// on views of the tile buffers (MKL/oneDNN sgemm, ~1 us per call); everything else is the jets
// kernels' register-blocked `wsum`. Measured (1 thread, N=4, 64x64, p=2, K=7, fp32) against the
// unfused jets + grouped 1x1 conv: see bench/results/mfconv_cpu.csv.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace msconv {
namespace {

// Row-major C[M, N] (row stride ldc) = op(A) @ op(B) (+ C when accumulate); op(A) is M x K,
// stored K x M when ta; op(B) is K x N, stored N x K when tb.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
             const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  if (K == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  at::Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opt).t()
                    : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
  at::Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opt).t()
                    : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  if (accumulate) {
    at::addmm_out(c, c, a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

struct GemmFn {
  template <typename T>
  void operator()(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
                  const T* B, int64_t ldb, T* C, int64_t ldc, bool acc) const {
    gemm_rm<T>(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, acc);
  }
};

}  // namespace

namespace mfc_generic {
#include "mf_jets_cpu_body.h"
#include "mf_conv_cpu_body.h"
}  // namespace mfc_generic

#ifdef MSCONV_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace mfc_avx2 {
#include "mf_jets_cpu_body.h"
#include "mf_conv_cpu_body.h"
}  // namespace mfc_avx2
#pragma GCC pop_options
#endif

namespace {

using cpu::filt_vector;
using cpu::kMaxOrder;
using cpu::kMaxTaps;
using cpu::use_avx2;

// Bytes of tile buffers (V, Z) a task aims for: about half the L2 of the CPUs measured.
constexpr int64_t kTileBytes = 512 * 1024;

// Jet m of (a, b) in mf_multi_indices order: total degree d = a + b, then b.
int64_t jet_index(int64_t a, int64_t b) { return (a + b) * (a + b + 1) / 2 + b; }

// theta [Co, Cg, M] <-> per a, [G][Cog][(P1 - a)][Cg] (column b * Cg + cg), concatenated at
// off[a]. Plain loops: theta is small and a dozen ATen calls cost more than the copy.
template <typename F>
void for_packed(int64_t Co, int64_t Cg, int64_t P1, F f /* (packed index, theta index) */) {
  const int64_t M = P1 * (P1 + 1) / 2;
  int64_t p = 0;
  for (int64_t a = 0; a < P1; ++a)
    for (int64_t o = 0; o < Co; ++o)  // o = k * Cog + og: groups are consecutive blocks of o
      for (int64_t b = 0; b < P1 - a; ++b)
        for (int64_t cg = 0; cg < Cg; ++cg) f(p++, (o * Cg + cg) * M + jet_index(a, b));
}

at::Tensor pack_theta(const at::Tensor& theta_in, int64_t P1, std::vector<int64_t>& off) {
  const at::Tensor theta = theta_in.contiguous();
  const int64_t Co = theta.size(0), Cg = theta.size(1);
  off.clear();
  for (int64_t a = 0, o = 0; a < P1; o += Co * Cg * (P1 - a), ++a) off.push_back(o);
  at::Tensor out = at::empty({theta.numel()}, theta.options());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "pack_theta", [&] {
    const scalar_t* src = theta.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_packed(Co, Cg, P1, [&](int64_t p, int64_t t) { dst[p] = src[t]; });
  });
  return out;
}

// The inverse of pack_theta, summing the per-chunk rows of a gradient [chunks, numel].
at::Tensor unpack_theta(const at::Tensor& packed, int64_t Co, int64_t Cg, int64_t P1) {
  at::Tensor out = at::empty({Co, Cg, P1 * (P1 + 1) / 2}, packed.options());
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "unpack_theta", [&] {
    const scalar_t* src = packed.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t chunks = packed.size(0), n = packed.size(1);
    for_packed(Co, Cg, P1, [&](int64_t p, int64_t t) {
      scalar_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += src[c * n + p];
      dst[t] = sum;
    });
  });
  return out;
}

template <typename Geom>
Geom make_geom(const at::Tensor& x, int64_t Co, int64_t G, int64_t order, int64_t K, int64_t pad,
               int64_t mode) {
  Geom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Co = Co;
  g.G = G;
  g.Cg = g.C / G;
  g.Cog = Co / G;
  g.P1 = order + 1;
  g.K = K;
  g.pad = pad;
  g.mode = mode;
  // Where the register GEMMs beat at::mm_out (1 thread, 64x64, K=7, paired with a 3x3 conv):
  // the forward product up to 64 output channels per group (16 ch: -20%, 64: -5%), the
  // theta-gradient dot products only up to 16 (-10%; +30% at 64); theta^T dZ never.
  g.own_nn = g.Cog <= 64;
  g.own_nt = g.Cog <= 16;
  const int64_t row_bytes = std::max<int64_t>(1, g.P1 * (g.C + Co) * g.W * x.element_size());
  g.T = std::clamp<int64_t>(kTileBytes / row_bytes, 1, std::max<int64_t>(g.H, 1));
  // Enough tasks for every thread.
  const int64_t want = 2 * at::get_num_threads();
  while (g.T > 1 && g.N * ((g.H + g.T - 1) / g.T) < want) g.T = (g.T + 1) / 2;
  return g;
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& filt,
                int64_t order, int64_t pad, int64_t mode, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be N x C x H x W, got x.shape=", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type(), "; convert with x.float()");
  TORCH_CHECK(x.device().is_cpu() && theta.device().is_cpu() && filt.device().is_cpu(), op,
              ": CPU kernel got x on ", x.device(), ", theta on ", theta.device(), ", filt on ",
              filt.device());
  TORCH_CHECK(theta.scalar_type() == x.scalar_type(), op, ": theta.dtype=", theta.scalar_type(),
              " must match x.dtype=", x.scalar_type());
  TORCH_CHECK(order >= 0 && order <= kMaxOrder, op, ": order must be in [0, ", kMaxOrder,
              "], got order=", order);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && theta.dim() == 3 &&
                  theta.size(0) % groups == 0 && theta.size(1) * groups == x.size(1) &&
                  theta.size(2) == (order + 1) * (order + 2) / 2,
              op, ": theta must be [C_out, C_in/groups, M] with C_in=", x.size(1), ", groups=",
              groups, ", M=", (order + 1) * (order + 2) / 2, "; got theta.shape=", theta.sizes());
  TORCH_CHECK(filt.dim() == 2 && filt.size(0) == order + 1 && filt.size(1) >= 1 &&
                  filt.size(1) <= kMaxTaps,
              op, ": filt must be [order + 1, K] = [", order + 1, ", K] with 1 <= K <= ", kMaxTaps,
              ", got filt.shape=", filt.sizes());
  TORCH_CHECK(pad >= 0 && pad < filt.size(1), op, ": pad must be in [0, K) = [0, ", filt.size(1),
              "), got pad=", pad);
  TORCH_CHECK(mode >= 0 && mode <= 3, op,
              ": mode must be 0 zeros, 1 reflect, 2 replicate or 3 circular, got mode=", mode);
}

template <typename F>
void dispatch_isa(F&& f) {
#ifdef MSCONV_CPU_AVX2
  if (use_avx2()) return f(std::integral_constant<int, 1>{});
#endif
  f(std::integral_constant<int, 0>{});
}

// The kernel entry points of one instruction-set namespace, as a type.
#define MSCONV_MFC_ENTRY(Name, ns)                                                        \
  struct Name {                                                                           \
    using Geom = ns::ConvGeom;                                                            \
    template <typename T, typename... A>                                                  \
    static void forward(A&&... a) { ns::conv_forward<T>(std::forward<A>(a)...); }        \
    template <typename T, typename... A>                                                  \
    static void tiles(A&&... a) { ns::conv_backward_tiles<T>(std::forward<A>(a)...); }   \
    template <typename T, typename... A>                                                  \
    static void rows(A&&... a) { ns::conv_backward_rows<T>(std::forward<A>(a)...); }     \
  };
MSCONV_MFC_ENTRY(GenericNs, mfc_generic)
#ifdef MSCONV_CPU_AVX2
MSCONV_MFC_ENTRY(Avx2Ns, mfc_avx2)
template <int isa>
using NsOf = std::conditional_t<isa == 1, Avx2Ns, GenericNs>;
#else
template <int isa>
using NsOf = GenericNs;
#endif

// body(Ns{}, scalar_t{}, geometry, filters, packed theta) for x's dtype and the CPU's ISA.
template <typename Body>
void with_kernels(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& filt, int64_t order,
                  int64_t pad, int64_t mode, int64_t groups, Body&& body) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mf_conv_cpu", [&] {
    const auto f = filt_vector<scalar_t>(filt);
    dispatch_isa([&](auto isa) {
      using Ns = NsOf<decltype(isa)::value>;
      auto g = make_geom<typename Ns::Geom>(x, theta.size(0), groups, order, filt.size(1), pad, mode);
      const at::Tensor thr = pack_theta(theta, g.P1, g.thr_off);
      body(Ns{}, scalar_t(0), g, f, thr);
    });
  });
}

at::Tensor mf_conv_fwd_cpu(const at::Tensor& x_in, const at::Tensor& theta_in,
                           const std::optional<at::Tensor>& bias_in, const at::Tensor& filt,
                           int64_t order, int64_t pad, int64_t mode, int64_t groups) {
  check_args("mf_conv_fwd", x_in, theta_in, filt, order, pad, mode, groups);
  const at::Tensor x = x_in.contiguous();
  const int64_t Co = theta_in.size(0);
  at::Tensor out = at::empty({x.size(0), Co, x.size(2), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == Co, "mf_conv_fwd: bias must be [C_out]=[",
                Co, "], got bias.shape=", bias_in->sizes());
    bias = bias_in->to(x.scalar_type()).contiguous();
  }
  with_kernels(x, theta_in, filt, order, pad, mode, groups, [&](auto ns, auto zero, auto& g, const auto& f,
                                                               const at::Tensor& thr) {
    using T = decltype(zero);
    decltype(ns)::template forward<T>(g, x.const_data_ptr<T>(), thr.const_data_ptr<T>(),
                                      bias.defined() ? bias.const_data_ptr<T>() : nullptr, f,
                                      out.mutable_data_ptr<T>(), GemmFn{});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mf_conv_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                   const at::Tensor& theta_in, const at::Tensor& filt,
                                                   int64_t order, int64_t pad, int64_t mode,
                                                   int64_t groups, bool need_x, bool need_theta) {
  check_args("mf_conv_bwd", x_in, theta_in, filt, order, pad, mode, groups);
  const int64_t Co = theta_in.size(0);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == x_in.size(0) && grad_in.size(1) == Co &&
                  grad_in.size(2) == x_in.size(2) && grad_in.size(3) == x_in.size(3),
              "mf_conv_bwd: grad must be [N, C_out, H, W]=[", x_in.size(0), ", ", Co, ", ",
              x_in.size(2), ", ", x_in.size(3), "], got grad.shape=", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "mf_conv_bwd: grad.dtype=",
              grad_in.scalar_type(), " must match x.dtype=", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor dx = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor dtheta = need_theta ? at::zeros_like(theta_in) : at::Tensor();
  if (x.numel() == 0 || grad.numel() == 0 || !(need_x || need_theta)) {
    if (need_x) dx.zero_();
    return {need_x ? dx : at::empty({0}, x.options()), need_theta ? dtheta : at::empty({0}, x.options())};
  }
  with_kernels(x, theta_in, filt, order, pad, mode, groups, [&](auto ns, auto zero, auto& g, const auto& f,
                                                               const at::Tensor& thr) {
    using T = decltype(zero);
    using Ns = decltype(ns);
    const int64_t chunks = std::min<int64_t>(at::get_num_threads(), g.N * g.tiles());
    at::Tensor dv = need_x ? at::empty({g.N, g.P1 * g.C, g.H, g.W}, x.options()) : at::Tensor();
    at::Tensor dthr = need_theta ? at::zeros({chunks, thr.numel()}, x.options()) : at::Tensor();
    Ns::template tiles<T>(g, grad.const_data_ptr<T>(), x.const_data_ptr<T>(), thr.const_data_ptr<T>(), f,
                          need_x ? dv.mutable_data_ptr<T>() : nullptr,
                          need_theta ? dthr.mutable_data_ptr<T>() : nullptr, thr.numel(), chunks, GemmFn{});
    if (need_x) Ns::template rows<T>(g, dv.const_data_ptr<T>(), f, dx.mutable_data_ptr<T>());
    if (need_theta) dtheta = unpack_theta(dthr, Co, g.Cg, g.P1);
  });
  return {need_x ? dx : at::empty({0}, x.options()), need_theta ? dtheta : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(msconv, CPU, m) {
  m.impl("mf_conv_fwd", &mf_conv_fwd_cpu);
  m.impl("mf_conv_bwd", &mf_conv_bwd_cpu);
}

}  // namespace msconv

#pragma GCC diagnostic pop
