// Kernel bodies of msconv::mf_conv_fwd / mf_conv_bwd (CPU, stride 1). Included twice by
// mf_conv_cpu.cpp after mf_jets_cpu_body.h (whose `wsum_any` does every stencil pass), once per
// instruction set, each time in its own namespace. No include guard on purpose.
//
// The mix is moved between the two 1-D passes: with V_b = (column filter b) * x_c,
//   y_o = bias_o + sum_a H_a Z_{o,a},   Z_{o,a} = sum_c sum_{b <= p-a} theta[o, c, (a, b)] V_b x_c
// (H_a: row filter a). Per pixel that is (p+1)K MACs per input channel, (p+1)K per output
// channel and C_out*C_in*M for the GEMMs; V (p+1 planes per input channel) and Z (p+1 per
// output channel) live only in per-tile buffers. Since the column padding commutes with the
// vertical pass and the mix, the GEMMs run on the W interior columns only and Z is padded per
// row just before the horizontal pass. Row padding is an index map into x (no padded copy).

// Where padded index p (p - pad in [-pad, n + K - 1 - pad)) reads from an axis of length n:
// the rule of msconv.reference.mf_pad (modes 0 zeros, 1 reflect, 2 replicate, 3 circular);
// -1 for a zero.
inline int64_t pad_source(int64_t p, int64_t n, int64_t mode) {
  if (p >= 0 && p < n) return p;
  if (mode == 0) return -1;
  if (mode == 2 || n == 1) return p < 0 ? 0 : n - 1;
  if (mode == 3) return ((p % n) + n) % n;
  const int64_t per = 2 * (n - 1);
  const int64_t i = ((p % per) + per) % per;
  return i < n ? i : per - i;
}

// f(p) for the padded indices p in [0, padded) outside the interior [pad, pad + n).
template <typename F>
inline void for_halo(int64_t pad, int64_t n, int64_t padded, F f) {
  for (int64_t p = 0; p < std::min(pad, padded); ++p) f(p);
  for (int64_t p = pad + n; p < padded; ++p) f(p);
}

// Register-blocked GEMMs for the thin products of few channels, where a BLAS call spends much
// of its time packing (measured: MKL sgemm at M = 16 runs at ~60% of its M = 128 rate).
// C[m, n] (row stride ldc) (+)= sum_k A[m * ams + k * aks] * B[k * ldb + n]; MB x NV vectors of
// C stay in registers while B streams through L1.
template <int MB, int NV, typename T>
inline void gemm_nn_block(int64_t K, const T* A, int64_t ams, int64_t aks, const T* B, int64_t ldb,
                          T* C, int64_t ldc, bool acc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V c[MB][NV];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[m][v] = acc ? load_lanes<T>(C + m * ldc + v * L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = load_lanes<T>(B + k * ldb + v * L);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const T a = A[m * ams + k * aks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[m][v] += a * b[v];
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) store_lanes<T>(C + m * ldc + v * L, 1, c[m][v]);
}

template <int NV, typename T>
void gemm_nn_cols(int64_t M, int64_t n0, int64_t K, const T* A, int64_t ams, int64_t aks,
                  const T* B, int64_t ldb, T* C, int64_t ldc, bool acc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) gemm_nn_block<4, NV>(K, A + m * ams, ams, aks, B + n0, ldb, C + m * ldc + n0, ldc, acc);
  for (; m < M; ++m) gemm_nn_block<1, NV>(K, A + m * ams, ams, aks, B + n0, ldb, C + m * ldc + n0, ldc, acc);
}

template <typename T>
void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t ams, int64_t aks, const T* B,
             int64_t ldb, T* C, int64_t ldc, bool acc) {
  constexpr int L = Vec<T>::lanes;
  int64_t n = 0;
  for (; n + 3 * L <= N; n += 3 * L) gemm_nn_cols<3>(M, n, K, A, ams, aks, B, ldb, C, ldc, acc);
  for (; n + L <= N; n += L) gemm_nn_cols<1>(M, n, K, A, ams, aks, B, ldb, C, ldc, acc);
  for (; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      T sum = acc ? C[m * ldc + n] : T(0);
      for (int64_t k = 0; k < K; ++k) sum += A[m * ams + k * aks] * B[k * ldb + n];
      C[m * ldc + n] = sum;
    }
}

// C[m, n] (+)= sum_k A[m * lda + k] * B[n * ldb + k]: MB x NB dot products along contiguous k.
template <int MB, int NB, typename T>
inline void gemm_nt_block(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                          int64_t ldc, bool acc) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V c[MB][NB] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V a[MB], b[NB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) a[m] = load_lanes<T>(A + m * lda + k);
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) b[j] = load_lanes<T>(B + j * ldb + k);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) c[m][j] += a[m] * b[j];
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NB; ++j) {
      T sum = acc ? C[m * ldc + j] : T(0);
      for (int l = 0; l < L; ++l) sum += c[m][j][l];
      for (int64_t kk = k; kk < K; ++kk) sum += A[m * lda + kk] * B[j * ldb + kk];
      C[m * ldc + j] = sum;
    }
}

template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
             T* C, int64_t ldc, bool acc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    int64_t n = 0;
    for (; n + 3 <= N; n += 3) gemm_nt_block<4, 3>(K, A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, acc);
    for (; n < N; ++n) gemm_nt_block<4, 1>(K, A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, acc);
  }
  for (; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) gemm_nt_block<1, 1>(K, A + m * lda, lda, B + n * ldb, ldb, C + m * ldc + n, ldc, acc);
}

// The GEMMs of the kernels below, row-major: C[M, N] (+)= op(A) op(B) with op(A) M x K (stored
// K x M when ta), op(B) K x N (stored N x K when tb). `blas` (at::mm_out) unless the register
// kernels were asked for (`own`; they do A B and A B^T).
template <typename T, typename Blas>
void tile_gemm(bool own, Blas blas, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A,
               int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool acc) {
  if (!own || (ta && tb)) return blas(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, acc);
  if (tb) return gemm_nt(M, N, K, A, lda, B, ldb, C, ldc, acc);
  gemm_nn(M, N, K, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, C, ldc, acc);
}

// Geometry. Buffers of one tile of T output rows: V [G][P1][Cg][TW], Z and dZ [P1][Co][TW]
// with TW = T * W; packed theta (thr) holds, per a, [G][Cog][(P1 - a) * Cg] with column
// b * Cg + cg = theta[k * Cog + og, cg, (a, b)], at thr_off[a].
struct ConvGeom {
  int64_t N, C, Co, G, Cg, Cog, P1, K, H, W, pad, mode, T;
  bool own_nn, own_nt;  // register-blocked GEMMs instead of at::mm_out (few channels per group)
  std::vector<int64_t> thr_off;
  int64_t tiles() const { return (H + T - 1) / T; }
  int64_t tw() const { return T * W; }
  int64_t wpad() const { return W + K - 1; }
};

// V rows of tile (n, i0, rows) from x (NCHW contiguous): V[k][b][cg][il*W + x].
template <typename T>
void vertical_tile(const ConvGeom& g, const T* x, const std::vector<T>& filt, const T* zero_row,
                   int64_t n, int64_t i0, int64_t rows, T* vbuf) {
  std::vector<const T*> src(g.K);
  std::vector<T*> dst(g.P1);
  const int64_t tw = g.tw();
  for (int64_t c = 0; c < g.C; ++c) {
    const int64_t k = c / g.Cg, cg = c % g.Cg;
    const T* xc = x + (n * g.C + c) * g.H * g.W;
    for (int64_t il = 0; il < rows; ++il) {
      for (int64_t t = 0; t < g.K; ++t) {
        const int64_t y = pad_source(i0 + il + t - g.pad, g.H, g.mode);
        src[t] = y < 0 ? zero_row : xc + y * g.W;
      }
      for (int64_t b = 0; b < g.P1; ++b) dst[b] = vbuf + ((k * g.P1 + b) * g.Cg + cg) * tw + il * g.W;
      wsum_any<T, T, T>(g.P1, g.K, src.data(), filt.data(), dst.data(), 1, g.W);
    }
  }
}

// Forward: y (NCHW contiguous) from x, packed theta, optional bias. Parallel over (image, tile).
template <typename T, typename Gemm>
void conv_forward(const ConvGeom& g, const T* x, const T* thr, const T* bias,
                  const std::vector<T>& filt, T* y, Gemm gemm) {
  const int64_t tw = g.tw(), wpad = g.wpad(), P1 = g.P1;
  const std::vector<T> zero_row(g.W, T(0));
  at::parallel_for(0, g.N * g.tiles(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> vbuf(P1 * g.C * tw), zbuf(P1 * g.Co * tw), zp(P1 * wpad);
    std::vector<const T*> hsrc(P1 * g.K);
    for (int64_t a = 0; a < P1; ++a)
      for (int64_t q = 0; q < g.K; ++q) hsrc[a * g.K + q] = zp.data() + a * wpad + q;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / g.tiles(), i0 = (task % g.tiles()) * g.T;
      const int64_t rows = std::min(g.T, g.H - i0);
      vertical_tile(g, x, filt, zero_row.data(), n, i0, rows, vbuf.data());
      // Z_a[k block] = thr_a[k] (Cog x (P1-a)Cg) @ V[k][b < P1-a] ((P1-a)Cg x rows*W)
      for (int64_t k = 0; k < g.G; ++k)
        for (int64_t a = 0; a < P1; ++a) {
          const int64_t kk = (P1 - a) * g.Cg;
          tile_gemm<T>(g.own_nn, gemm, false, false, g.Cog, rows * g.W, kk, thr + g.thr_off[a] + k * g.Cog * kk, kk,
               vbuf.data() + k * P1 * g.Cg * tw, tw, zbuf.data() + (a * g.Co + k * g.Cog) * tw, tw,
               false);
        }
      for (int64_t o = 0; o < g.Co; ++o)
        for (int64_t il = 0; il < rows; ++il) {
          for (int64_t a = 0; a < P1; ++a) {
            const T* zrow = zbuf.data() + (a * g.Co + o) * tw + il * g.W;
            T* zpa = zp.data() + a * wpad;
            std::copy(zrow, zrow + g.W, zpa + g.pad);
            for_halo(g.pad, g.W, wpad, [&](int64_t xp) {
              const int64_t c = pad_source(xp - g.pad, g.W, g.mode);
              zpa[xp] = c < 0 ? T(0) : zrow[c];
            });
          }
          T* yrow = y + ((n * g.Co + o) * g.H + i0 + il) * g.W;
          wsum_any<T, T, T>(1, P1 * g.K, hsrc.data(), filt.data(), &yrow, 1, g.W);
          if (bias != nullptr)
            for (int64_t j = 0; j < g.W; ++j) yrow[j] += bias[o];
        }
    }
  });
}

// Backward, tile phase. From dy: dZ (horizontal adjoint, column padding folded back), then
//   dthr_a += dZ_a V^T   (into dthr[chunk], when dthr != nullptr; V recomputed per tile)
//   dV      = sum_a thr_a^T dZ_a   (into dv [N][G][P1][Cg][H][W], when dv != nullptr).
// Tiles are split into `chunks` fixed ranges so the theta sums do not depend on scheduling.
template <typename T, typename Gemm>
void conv_backward_tiles(const ConvGeom& g, const T* dy, const T* x, const T* thr,
                         const std::vector<T>& filt, T* dv, T* dthr, int64_t thr_size,
                         int64_t chunks, Gemm gemm) {
  const int64_t tw = g.tw(), wpad = g.wpad(), P1 = g.P1, K = g.K, W = g.W;
  const int64_t wrun = (wpad + 7) / 8 * 8;  // whole vectors: no scalar tail in the adjoint pass
  const int64_t ntasks = g.N * g.tiles();
  const std::vector<T> zero_row(W, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> vbuf(dthr != nullptr ? P1 * g.C * tw : 0), dzbuf(P1 * g.Co * tw);
    std::vector<T> gext(wrun + K - 1, T(0)), dzp(P1 * wrun);
    std::vector<const T*> src(K);
    std::vector<T*> dst(P1);
    for (int64_t q = 0; q < K; ++q) src[q] = gext.data() + K - 1 - q;
    for (int64_t a = 0; a < P1; ++a) dst[a] = dzp.data() + a * wrun;
    for (int64_t ch = c0; ch < c1; ++ch) {
      T* dthr_ch = dthr != nullptr ? dthr + ch * thr_size : nullptr;
      for (int64_t task = ntasks * ch / chunks; task < ntasks * (ch + 1) / chunks; ++task) {
        const int64_t n = task / g.tiles(), i0 = (task % g.tiles()) * g.T;
        const int64_t rows = std::min(g.T, g.H - i0);
        for (int64_t o = 0; o < g.Co; ++o)
          for (int64_t il = 0; il < rows; ++il) {
            const T* grow = dy + ((n * g.Co + o) * g.H + i0 + il) * W;
            std::copy(grow, grow + W, gext.data() + K - 1);
            wsum_any<T, T, T>(P1, K, src.data(), filt.data(), dst.data(), 1, wrun);
            for (int64_t a = 0; a < P1; ++a) {
              T* dz = dzbuf.data() + (a * g.Co + o) * tw + il * W;
              const T* dza = dzp.data() + a * wrun;
              std::copy(dza + g.pad, dza + g.pad + W, dz);
              if (g.mode != 0)
                for_halo(g.pad, W, wpad, [&](int64_t xp) { dz[pad_source(xp - g.pad, W, g.mode)] += dza[xp]; });
            }
          }
        if (dthr_ch != nullptr) {
          vertical_tile(g, x, filt, zero_row.data(), n, i0, rows, vbuf.data());
          for (int64_t k = 0; k < g.G; ++k)
            for (int64_t a = 0; a < P1; ++a) {
              const int64_t kk = (P1 - a) * g.Cg;
              tile_gemm<T>(g.own_nt, gemm, false, true, g.Cog, kk, rows * W, dzbuf.data() + (a * g.Co + k * g.Cog) * tw, tw,
                   vbuf.data() + k * P1 * g.Cg * tw, tw, dthr_ch + g.thr_off[a] + k * g.Cog * kk,
                   kk, true);
            }
        }
        if (dv != nullptr) {
          for (int64_t k = 0; k < g.G; ++k)
            for (int64_t a = 0; a < P1; ++a) {
              const int64_t kk = (P1 - a) * g.Cg;
              tile_gemm<T>(false, gemm, true, false, kk, rows * W, g.Cog, thr + g.thr_off[a] + k * g.Cog * kk, kk,
                   dzbuf.data() + (a * g.Co + k * g.Cog) * tw, tw,
                   dv + ((n * g.G + k) * P1 * g.Cg) * g.H * W + i0 * W, g.H * W, a > 0);
            }
        }
      }
    }
  });
}

// Backward, plane phase: dx[n, c] = vertical adjoint of dV (row padding folded back), a
// gather per input row, parallel over planes.
template <typename T>
void conv_backward_rows(const ConvGeom& g, const T* dv, const std::vector<T>& filt, T* dx) {
  const int64_t P1 = g.P1, K = g.K, H = g.H, W = g.W, hpad = H + K - 1;
  // Padded row yp gathers dV_b row i = yp - t with weight filt[b, t]: offsets (from dV_0 of the
  // plane) and weights per yp, the same for every plane. Interior rows first (each writes its
  // own row of dx), then the halo rows add in.
  std::vector<int64_t> order, first(1, 0), off;
  std::vector<T> wts;
  for (int pass = 0; pass < 2; ++pass)
    for (int64_t yp = 0; yp < hpad; ++yp) {
      const bool interior = yp - g.pad >= 0 && yp - g.pad < H;
      if (interior != (pass == 0) || pad_source(yp - g.pad, H, g.mode) < 0) continue;
      for (int64_t t = 0; t < K; ++t) {
        const int64_t i = yp - t;
        if (i < 0 || i >= H) continue;
        for (int64_t b = 0; b < P1; ++b) {
          off.push_back(b * g.Cg * H * W + i * W);
          wts.push_back(filt[b * K + t]);
        }
      }
      order.push_back(yp);
      first.push_back(off.size());
    }
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<const T*> src(P1 * K);
    std::vector<T> tmp(W);
    for (int64_t plane = p0; plane < p1; ++plane) {
      const int64_t n = plane / g.C, c = plane % g.C, k = c / g.Cg, cg = c % g.Cg;
      const T* dvb = dv + ((n * g.G + k) * P1 * g.Cg + cg) * H * W;
      T* dxc = dx + plane * H * W;
      for (size_t r = 0; r < order.size(); ++r) {
        const int64_t yp = order[r], y = pad_source(yp - g.pad, H, g.mode);
        const bool interior = yp - g.pad >= 0 && yp - g.pad < H;
        const int64_t ns = first[r + 1] - first[r];
        for (int64_t j = 0; j < ns; ++j) src[j] = dvb + off[first[r] + j];
        T* out = interior ? dxc + y * W : tmp.data();
        if (ns == 0) {
          std::fill(out, out + W, T(0));
        } else {
          wsum_any<T, T, T>(1, ns, src.data(), wts.data() + first[r], &out, 1, W);
        }
        if (!interior)
          for (int64_t j = 0; j < W; ++j) dxc[y * W + j] += tmp[j];
      }
    }
  });
}
