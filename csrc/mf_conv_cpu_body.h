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

// Geometry. Buffers of one tile of T output rows: V [G][P1][Cg][TW], Z and dZ [P1][Co][TW]
// with TW = T * W; packed theta (thr) holds, per a, [G][Cog][(P1 - a) * Cg] with column
// b * Cg + cg = theta[k * Cog + og, cg, (a, b)], at thr_off[a].
struct ConvGeom {
  int64_t N, C, Co, G, Cg, Cog, P1, K, H, W, pad, mode, T;
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
          gemm(false, false, g.Cog, rows * g.W, kk, thr + g.thr_off[a] + k * g.Cog * kk, kk,
               vbuf.data() + k * P1 * g.Cg * tw, tw, zbuf.data() + (a * g.Co + k * g.Cog) * tw, tw,
               false);
        }
      for (int64_t o = 0; o < g.Co; ++o)
        for (int64_t il = 0; il < rows; ++il) {
          for (int64_t a = 0; a < P1; ++a) {
            const T* zrow = zbuf.data() + (a * g.Co + o) * tw + il * g.W;
            T* zpa = zp.data() + a * wpad;
            for (int64_t xp = 0; xp < wpad; ++xp) {
              const int64_t c = pad_source(xp - g.pad, g.W, g.mode);
              zpa[xp] = c < 0 ? T(0) : zrow[c];
            }
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
  const int64_t ntasks = g.N * g.tiles();
  const std::vector<T> zero_row(W, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> vbuf(dthr != nullptr ? P1 * g.C * tw : 0), dzbuf(P1 * g.Co * tw);
    std::vector<T> gext(W + 2 * (K - 1), T(0)), dzp(P1 * wpad);
    std::vector<const T*> src(K);
    std::vector<T*> dst(P1);
    for (int64_t q = 0; q < K; ++q) src[q] = gext.data() + K - 1 - q;
    for (int64_t a = 0; a < P1; ++a) dst[a] = dzp.data() + a * wpad;
    for (int64_t ch = c0; ch < c1; ++ch) {
      T* dthr_ch = dthr != nullptr ? dthr + ch * thr_size : nullptr;
      for (int64_t task = ntasks * ch / chunks; task < ntasks * (ch + 1) / chunks; ++task) {
        const int64_t n = task / g.tiles(), i0 = (task % g.tiles()) * g.T;
        const int64_t rows = std::min(g.T, g.H - i0);
        for (int64_t o = 0; o < g.Co; ++o)
          for (int64_t il = 0; il < rows; ++il) {
            const T* grow = dy + ((n * g.Co + o) * g.H + i0 + il) * W;
            std::copy(grow, grow + W, gext.data() + K - 1);
            wsum_any<T, T, T>(P1, K, src.data(), filt.data(), dst.data(), 1, wpad);
            for (int64_t a = 0; a < P1; ++a) {
              T* dz = dzbuf.data() + (a * g.Co + o) * tw + il * W;
              const T* dza = dzp.data() + a * wpad;
              std::copy(dza + g.pad, dza + g.pad + W, dz);
              if (g.mode == 0) continue;
              for (int64_t xp = 0; xp < wpad; ++xp) {
                if (xp - g.pad >= 0 && xp - g.pad < W) continue;
                dz[pad_source(xp - g.pad, W, g.mode)] += dza[xp];
              }
            }
          }
        if (dthr_ch != nullptr) {
          vertical_tile(g, x, filt, zero_row.data(), n, i0, rows, vbuf.data());
          for (int64_t k = 0; k < g.G; ++k)
            for (int64_t a = 0; a < P1; ++a) {
              const int64_t kk = (P1 - a) * g.Cg;
              gemm(false, true, g.Cog, kk, rows * W, dzbuf.data() + (a * g.Co + k * g.Cog) * tw, tw,
                   vbuf.data() + k * P1 * g.Cg * tw, tw, dthr_ch + g.thr_off[a] + k * g.Cog * kk,
                   kk, true);
            }
        }
        if (dv != nullptr) {
          for (int64_t k = 0; k < g.G; ++k)
            for (int64_t a = 0; a < P1; ++a) {
              const int64_t kk = (P1 - a) * g.Cg;
              gemm(true, false, kk, rows * W, g.Cog, thr + g.thr_off[a] + k * g.Cog * kk, kk,
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
  at::parallel_for(0, g.N * g.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<const T*> src(P1 * K);
    std::vector<T> w(P1 * K), tmp(W);
    for (int64_t plane = p0; plane < p1; ++plane) {
      const int64_t n = plane / g.C, c = plane % g.C, k = c / g.Cg, cg = c % g.Cg;
      const T* dvb = dv + ((n * g.G + k) * P1 * g.Cg + cg) * H * W;  // + b * Cg * H * W
      T* dxc = dx + plane * H * W;
      // Interior padded rows first (each writes its own row), then the halo rows add in.
      for (int pass = 0; pass < 2; ++pass)
        for (int64_t yp = 0; yp < hpad; ++yp) {
          const bool interior = yp - g.pad >= 0 && yp - g.pad < H;
          if (interior != (pass == 0)) continue;
          const int64_t y = pad_source(yp - g.pad, H, g.mode);
          if (y < 0) continue;
          int64_t ns = 0;
          for (int64_t t = 0; t < K; ++t) {
            const int64_t i = yp - t;
            if (i < 0 || i >= H) continue;
            for (int64_t b = 0; b < P1; ++b) {
              src[ns] = dvb + b * g.Cg * H * W + i * W;
              w[ns++] = filt[b * K + t];
            }
          }
          T* out = interior ? dxc + y * W : tmp.data();
          if (ns == 0) {
            std::fill(out, out + W, T(0));
          } else {
            wsum_any<T, T, T>(1, ns, src.data(), w.data(), &out, 1, W);
          }
          if (!interior)
            for (int64_t j = 0; j < W; ++j) dxc[y * W + j] += tmp[j];
        }
    }
  });
}
