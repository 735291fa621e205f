// Kernel bodies of msconv::mf_jets_fwd / mf_jets_adj (CPU). Included twice by
// mf_jets_cpu.cpp, once per instruction set (generic x86-64 and AVX2+FMA), each time inside a
// different namespace: the extension is built without -march flags, so this is how the hot
// loops get 256-bit FMAs where the CPU has them. No include guard on purpose.
//
// Every pass is one primitive, `wsum`: dst[b][e] = sum_k w[b][k] * src[k][e] over a run of
// contiguous elements e, register-blocked over e so the accumulators stay in registers while
// the (up to K) source rows stream through L1. The source rows are input rows (vertical pass),
// shifted phases of the vertically filtered rows (horizontal pass), or rows of the gradient.

template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4), may_alias));
  static constexpr int lanes = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8), may_alias));
  static constexpr int lanes = 4;
};

// Loads and stores by value through an unaligned vector type: nothing takes the address of
// the accumulators, so they live in registers.
template <typename acc_t, typename TS>
inline __attribute__((always_inline)) typename Vec<acc_t>::type load_lanes(const TS* p) {
  if constexpr (std::is_same_v<TS, acc_t>) {
    return *reinterpret_cast<const typename Vec<acc_t>::unaligned*>(p);
  } else {
    typename Vec<acc_t>::type v;
    for (int l = 0; l < Vec<acc_t>::lanes; ++l) v[l] = static_cast<acc_t>(p[l]);
    return v;
  }
}

template <typename acc_t, typename TD>
inline __attribute__((always_inline)) void store_lanes(TD* p, int64_t stride,
                                                       typename Vec<acc_t>::type v) {
  if constexpr (std::is_same_v<TD, acc_t>) {
    if (stride == 1) {
      *reinterpret_cast<typename Vec<acc_t>::unaligned*>(p) = v;
      return;
    }
  }
  for (int l = 0; l < Vec<acc_t>::lanes; ++l) p[l * stride] = static_cast<TD>(v[l]);
}

// dst[b][e * dstride] = sum_{k < nsrc} w[b * nsrc + k] * src[k][e] for b < NB, e in [e0, e1),
// NV vectors at a time; returns where it stopped (the remainder is shorter than NV vectors).
// NB * NV ~ 8 independent accumulators hide the FMA latency and stay in 16 registers.
template <int NB, int NV, typename TS, typename TD, typename acc_t>
inline int64_t wsum_blocks(int64_t nsrc, const TS* const* src, const acc_t* w, TD* const* dst,
                           int64_t dstride, int64_t e0, int64_t e1) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  constexpr int EB = NV * L;
  for (; e0 + EB <= e1; e0 += EB) {
    V acc[NB][NV];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[b][v] = V{};
    for (int64_t k = 0; k < nsrc; ++k) {
      const TS* s = src[k] + e0;
      V x[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) x[v] = load_lanes<acc_t>(s + v * L);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        const acc_t wk = w[b * nsrc + k];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[b][v] += wk * x[v];
      }
    }
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        store_lanes<acc_t>(dst[b] + (e0 + v * L) * dstride, dstride, acc[b][v]);
  }
  return e0;
}

template <int NB, int NV, typename TS, typename TD, typename acc_t>
void wsum(int64_t nsrc, const TS* const* src, const acc_t* w, TD* const* dst, int64_t dstride,
          int64_t len) {
  int64_t e0 = wsum_blocks<NB, NV>(nsrc, src, w, dst, dstride, 0, len);
  e0 = wsum_blocks<NB, 1>(nsrc, src, w, dst, dstride, e0, len);
  for (; e0 < len; ++e0) {
    acc_t acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = acc_t(0);
    for (int64_t k = 0; k < nsrc; ++k) {
      const acc_t x = static_cast<acc_t>(src[k][e0]);
      for (int b = 0; b < NB; ++b) acc[b] += w[b * nsrc + k] * x;
    }
    for (int b = 0; b < NB; ++b) dst[b][e0 * dstride] = static_cast<TD>(acc[b]);
  }
}

// wsum for any number of outputs, in groups of at most 4 sharing the source loads.
// w is [nb][nsrc], dst[b] the b-th output row.
template <typename TS, typename TD, typename acc_t>
void wsum_any(int64_t nb, int64_t nsrc, const TS* const* src, const acc_t* w, TD* const* dst,
              int64_t dstride, int64_t len) {
  for (int64_t b0 = 0; b0 < nb; b0 += 4) {
    const acc_t* wb = w + b0 * nsrc;
    TD* const* db = dst + b0;
    switch (std::min<int64_t>(4, nb - b0)) {
      case 1: wsum<1, 8, TS, TD, acc_t>(nsrc, src, wb, db, dstride, len); break;
      case 2: wsum<2, 4, TS, TD, acc_t>(nsrc, src, wb, db, dstride, len); break;
      case 3: wsum<3, 3, TS, TD, acc_t>(nsrc, src, wb, db, dstride, len); break;
      default: wsum<4, 2, TS, TD, acc_t>(nsrc, src, wb, db, dstride, len); break;
    }
  }
}

// Geometry shared by the forward and adjoint kernels. A "unit" is one NCHW plane (Cv = 1) or
// one NHWC image (Cv = C, the channels of a pixel travel together as one contiguous vector);
// rows are then Wp * Cv contiguous elements and every pass runs over flat rows.
struct JetGeom {
  int64_t units, C, Cv, P1, M, K, S, Hp, Wp, Ho, Wo;
  std::vector<int64_t> ja, jb;  // (a, b) of jet m, mf_multi_indices order
};

// Forward. in: unit u's row y starts at in_base(u) + y * in_sh, Wp * Cv contiguous elements.
// Output jet m of unit u, row i, flat element e = j * Cv + c is at
//   out + out_off(u, m) + i * o_sh + e * o_es.
template <typename scalar_t, typename acc_t, typename InBase, typename OutOff>
void jets_forward(const JetGeom& g, const scalar_t* in, InBase in_base, int64_t in_sh,
                  scalar_t* out, OutOff out_off, int64_t o_sh, int64_t o_es,
                  const std::vector<acc_t>& filt /* [P1][K] */) {
  const int64_t P1 = g.P1, K = g.K, S = g.S, Cv = g.Cv;
  const int64_t wflat = g.Wp * Cv, woflat = g.Wo * Cv;
  const int64_t phase_len = ((g.Wp + S - 1) / S) * Cv;
  // Rows per task: enough multiply-adds (~64k) that waking the other threads pays off.
  const int64_t row_work = K * (P1 * wflat + g.M * woflat / S) + 1;
  const int64_t grain = std::max<int64_t>(1, 65536 / row_work);
  at::parallel_for(0, g.units * g.Ho, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> vbuf(P1 * wflat), phase(S > 1 ? P1 * S * phase_len : 0);
    std::vector<const scalar_t*> rows(K);
    std::vector<acc_t*> vdst(P1);
    std::vector<const acc_t*> hsrc(K);
    std::vector<scalar_t*> odst(P1);
    std::vector<acc_t> hw(P1 * K);
    for (int64_t b = 0; b < P1; ++b) vdst[b] = vbuf.data() + b * wflat;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t u = r / g.Ho, i = r % g.Ho;
      const scalar_t* base = in + in_base(u) + i * S * in_sh;
      for (int64_t t = 0; t < K; ++t) rows[t] = base + t * in_sh;
      // Vertical: V_b = sum_t filt[b, t] * row(i*S + t), all b from one read of each row.
      wsum_any<scalar_t, acc_t, acc_t>(P1, K, rows.data(), filt.data(), vdst.data(), 1, wflat);
      // Strided horizontal taps read V_b[(j*S + q) * Cv + c]: split V_b into S phases so that
      // every tap q reads a contiguous run, phase q % S shifted by q / S.
      if (S > 1) {
        for (int64_t b = 0; b < P1; ++b)
          for (int64_t ph = 0; ph < S; ++ph) {
            acc_t* dstp = phase.data() + (b * S + ph) * phase_len;
            const acc_t* srcp = vbuf.data() + b * wflat;
            for (int64_t x = ph, uu = 0; x < g.Wp; x += S, ++uu)
              for (int64_t c = 0; c < Cv; ++c) dstp[uu * Cv + c] = srcp[x * Cv + c];
          }
      }
      // Horizontal: jet (a, b) = sum_q filt[a, q] * V_b shifted; the a of one b share loads.
      for (int64_t b = 0; b < P1; ++b) {
        for (int64_t q = 0; q < K; ++q)
          hsrc[q] = S > 1 ? phase.data() + (b * S + q % S) * phase_len + (q / S) * Cv
                          : vbuf.data() + b * wflat + q * Cv;
        int64_t na = 0;
        for (int64_t m = 0; m < g.M; ++m) {
          if (g.jb[m] != b) continue;
          for (int64_t q = 0; q < K; ++q) hw[na * K + q] = filt[g.ja[m] * K + q];
          odst[na++] = out + out_off(u, m) + i * o_sh;
        }
        wsum_any<acc_t, scalar_t, acc_t>(na, K, hsrc.data(), hw.data(), odst.data(), o_es, woflat);
      }
    }
  });
}

// Adjoint (gradient w.r.t. xp) as a gather: input row y sums the output rows i that read it
// (i*S <= y < i*S + K), so every output element is written by exactly one thread.
//   grad: jet m of unit u, row i is grad + g_off(u, m) + i * g_sh, Wo * Cv contiguous.
//   out:  unit u's row y at out + out_base(u) + y * o_sh, Wp * Cv contiguous.
// Per row y: U_a = sum_{b, i} filt[b, y - i*S] * G_(a,b)[i] (vertical adjoint, P1 rows of
// Wo*Cv), then out = sum_a sum_q filt[a, q] * U_a[(x - q) / S] (horizontal adjoint), split into
// S phases x = r + S*u so each phase is a plain correlation with taps filt[a, r + S*k].
template <typename scalar_t, typename acc_t, typename GOff, typename OutBase>
void jets_adjoint(const JetGeom& g, const scalar_t* grad, GOff g_off, int64_t g_sh, scalar_t* out,
                  OutBase out_base, int64_t o_sh, const std::vector<acc_t>& filt) {
  const int64_t P1 = g.P1, K = g.K, S = g.S, Cv = g.Cv;
  const int64_t Kq = (K + S - 1) / S;   // taps of the longest phase
  const int64_t pad = Kq;               // zero margin (in pixels) on both sides of U_a
  const int64_t ulen = (g.Wo + 2 * pad) * Cv;
  const int64_t phase_len = ((g.Wp + S - 1) / S) * Cv;
  const int64_t row_work = Kq * (g.M * g.Wo * Cv + P1 * g.Wp * Cv) + 1;
  const int64_t grain = std::max<int64_t>(1, 65536 / row_work);
  at::parallel_for(0, g.units * g.Hp, grain, [&](int64_t r0, int64_t r1) {
    // kRows input rows at a time share the loads of the gradient rows they read (they weigh
    // them with different taps, zero outside [0, K)).
    constexpr int64_t kRows = 4;
    const int64_t win = Kq + kRows;
    std::vector<acc_t> ubuf(kRows * P1 * ulen, acc_t(0)), phase(S > 1 ? phase_len : 0);
    std::vector<const scalar_t*> gsrc(g.M * win);
    std::vector<acc_t> gw(kRows * g.M * win);
    std::vector<acc_t*> udst(kRows);
    std::vector<const acc_t*> hsrc(P1 * Kq);
    std::vector<acc_t> hw(P1 * Kq);
    for (int64_t r = r0; r < r1;) {
      const int64_t u = r / g.Hp, y0 = r % g.Hp;
      const int64_t R = std::min(std::min(kRows, r1 - r), g.Hp - y0);
      // Output rows i with 0 <= y - i*S < K for some y in [y0, y0 + R), 0 <= i < Ho.
      const int64_t i_hi = std::min(g.Ho - 1, (y0 + R - 1) / S);
      const int64_t i_lo = y0 >= K ? (y0 - K + S) / S : 0;  // ceil((y0 - K + 1) / S)
      const int64_t ni = std::max<int64_t>(0, i_hi - i_lo + 1);
      for (int64_t a = 0; a < P1; ++a) {
        int64_t nm = 0;
        for (int64_t m = 0; m < g.M; ++m) nm += g.ja[m] == a;
        const int64_t n = nm * ni;
        int64_t k = 0;
        for (int64_t m = 0; m < g.M; ++m) {
          if (g.ja[m] != a) continue;
          const scalar_t* gm = grad + g_off(u, m);
          for (int64_t i = i_lo; i <= i_hi; ++i, ++k) {
            gsrc[k] = gm + i * g_sh;
            for (int64_t rr = 0; rr < R; ++rr) {
              const int64_t t = y0 + rr - i * S;
              gw[rr * n + k] = (t >= 0 && t < K) ? filt[g.jb[m] * K + t] : acc_t(0);
            }
          }
        }
        for (int64_t rr = 0; rr < R; ++rr) udst[rr] = ubuf.data() + (rr * P1 + a) * ulen + pad * Cv;
        if (n == 0) {
          for (int64_t rr = 0; rr < R; ++rr) std::fill(udst[rr], udst[rr] + g.Wo * Cv, acc_t(0));
        } else {
          wsum_any<scalar_t, acc_t, acc_t>(R, n, gsrc.data(), gw.data(), udst.data(), 1, g.Wo * Cv);
        }
      }
      for (int64_t rr = 0; rr < R; ++rr) {
        const int64_t y = y0 + rr;
        const acc_t* urow = ubuf.data() + rr * P1 * ulen;
        scalar_t* orow = out + out_base(u) + y * o_sh;
        for (int64_t ph = 0; ph < S; ++ph) {
          // Phase x = ph + S*v reads U_a[v - k] with tap filt[a, ph + S*k].
          const int64_t kr = (K - ph + S - 1) / S;
          const int64_t nv = (g.Wp - ph + S - 1) / S;
          if (nv <= 0) continue;
          int64_t n = 0;
          for (int64_t a = 0; a < P1; ++a)
            for (int64_t k = 0; k < kr; ++k) {
              hsrc[n] = urow + a * ulen + (pad - k) * Cv;
              hw[n++] = filt[a * K + ph + S * k];
            }
          if (S == 1) {
            wsum_any<acc_t, scalar_t, acc_t>(1, n, hsrc.data(), hw.data(), &orow, 1, nv * Cv);
          } else {
            acc_t* pp = phase.data();
            wsum_any<acc_t, acc_t, acc_t>(1, n, hsrc.data(), hw.data(), &pp, 1, nv * Cv);
            for (int64_t v = 0; v < nv; ++v)
              for (int64_t c = 0; c < Cv; ++c)
                orow[(ph + S * v) * Cv + c] = static_cast<scalar_t>(pp[v * Cv + c]);
          }
        }
      }
      r += R;
    }
  });
}
