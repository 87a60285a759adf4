// The integer matmul and the activation quantizer of one instruction-set level (compiled once per
// level, see CMakeLists.txt; the layout and numerics are in quant.h).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/kernel_set.h"
#include "kernels/simd.h"

namespace cortex::kernels::detail::CS_ISA_NS {

namespace {

template <WeightType WT>
constexpr int kQuads = WT == WeightType::Q8_0 ? 8 : 4;
template <WeightType WT>
constexpr size_t kScaleBytes = WT == WeightType::Q4_1 ? 64 : 32;
template <WeightType WT>
constexpr size_t kCellBytes = kScaleBytes<WT> + static_cast<size_t>(kQuads<WT>) * 64;
template <WeightType WT>
constexpr int32_t kOffset = WT == WeightType::Q4_0 ? 8 : WT == WeightType::Q8_0 ? 128 : 0;

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// --- activation quantization ---

#if !CS_KERNELS_AVX2
void quantizeBlockScalar(const float* x, int8_t* q, float& d, int32_t& sum, float& dsum) {
  float amax = 0.0f;
  for (int i = 0; i < kQuantBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  d = amax / 127.0f;
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  int32_t s = 0;
  for (int i = 0; i < kQuantBlock; ++i) {
    float v = std::nearbyint(x[i] * id);
    // note: a NaN gives -127 as the AVX2 code's max/min do (never undefined behaviour).
    v = v == v ? std::clamp(v, -127.0f, 127.0f) : -127.0f;
    q[i] = static_cast<int8_t>(v);
    s += q[i];
  }
  sum = s;
  dsum = d * static_cast<float>(s);
}
#endif

#if CS_KERNELS_AVX2
void quantizeBlockAvx2(const float* x, int8_t* q, float& d, int32_t& sum, float& dsum) {
  const __m256 absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm256_loadu_ps(x + 8 * k);
    mx = _mm256_max_ps(mx, _mm256_and_ps(v[k], absMask));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  d = amax / 127.0f;
  const __m256 id = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m256 lim = _mm256_set1_ps(127.0f);
  __m256i i32[4];
  for (int k = 0; k < 4; ++k) {
    // note: the rounding mode is round-to-nearest-even, as std::nearbyint in the scalar code.
    __m256 r = _mm256_round_ps(_mm256_mul_ps(v[k], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    i32[k] = _mm256_cvtps_epi32(r);
  }
  // Pack 32 int32 to 32 int8 in order (the packs interleave 128-bit lanes; the permute undoes it).
  const __m256i a = _mm256_packs_epi32(i32[0], i32[1]);
  const __m256i b = _mm256_packs_epi32(i32[2], i32[3]);
  __m256i p = _mm256_packs_epi16(a, b);
  p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), p);
  __m256i s = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  sum = _mm_cvtsi128_si32(s4);
  dsum = d * static_cast<float>(sum);
}
#endif

// --- scalar group kernel: the definition every SIMD path reproduces ---

template <WeightType WT>
void groupScalar(const std::byte* gp, int64_t nb, const QuantizedActivations& X, int64_t t,
                 float* acc) {
  const int8_t* xq = X.q.data() + t * X.cols;
  const int64_t xb = t * nb;
  for (int i = 0; i < kPackRows; ++i) acc[i] = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const std::byte* p = gp + static_cast<size_t>(b) * kCellBytes<WT>;
    const auto* u = reinterpret_cast<const uint8_t*>(p + kScaleBytes<WT>);
    const int8_t* x = xq + b * kQuantBlock;
    for (int i = 0; i < kPackRows; ++i) {
      int32_t I = 0;
      for (int j = 0; j < kQuads<WT>; ++j) {
        for (int k = 0; k < 4; ++k) {
          const int32_t byte = u[j * 64 + i * 4 + k];
          if constexpr (WT == WeightType::Q8_0) {
            I += byte * x[4 * j + k];
          } else {
            I += (byte & 0x0F) * x[4 * j + k] + (byte >> 4) * x[16 + 4 * j + k];
          }
        }
      }
      I -= kOffset<WT> * X.sum[xb + b];
      const float dw = halfToFloat(loadU16(p + 2 * i));
      acc[i] = std::fma(dw * X.d[xb + b], static_cast<float>(I), acc[i]);
      if constexpr (WT == WeightType::Q4_1) {
        acc[i] = std::fma(halfToFloat(loadU16(p + 32 + 2 * i)), X.dsum[xb + b], acc[i]);
      }
    }
  }
}

template <WeightType WT>
void groupsScalar(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0,
                  int64_t g1) {
  const int64_t nb = W.blocksPerRow();
  float acc[kPackRows];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t nr = std::min<int64_t>(kPackRows, W.rows() - g * kPackRows);
    for (int64_t t = 0; t < X.rows; ++t) {
      groupScalar<WT>(W.group(g), nb, X, t, acc);
      std::copy(acc, acc + nr, Y + t * W.rows() + g * kPackRows);
    }
  }
}

#if CS_ISA_LEVEL >= 3
// --- AVX-512 VNNI: a 16-row group x T tokens per call ---
template <WeightType WT, int T>
void tile512(const std::byte* gp, int64_t nb, const QuantizedActivations& X, int64_t t0,
             float* y, int64_t yStride, int nr) {
  const int64_t cols = X.cols;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const std::byte* p = gp + static_cast<size_t>(b) * kCellBytes<WT>;
    const std::byte* qp = p + kScaleBytes<WT>;
    const int8_t* x = X.q.data() + t0 * cols + b * kQuantBlock;
    // note: with few tokens, two integer accumulators per token halve the dependent vpdpbusd
    // chain (with many, the tokens' chains already overlap and the registers are better spent);
    // integer sums are exact, so the split changes no bit.
    constexpr bool kSplit = T <= 2;
    __m512i isum[T], isum2[T];
    for (int t = 0; t < T; ++t) isum[t] = isum2[t] = _mm512_setzero_si512();
    for (int j = 0; j < kQuads<WT>; ++j) {
      const __m512i v = _mm512_loadu_si512(qp + 64 * j);
      if constexpr (WT == WeightType::Q8_0) {
        for (int t = 0; t < T; ++t) {
          __m512i& a = (kSplit && (j & 1)) ? isum2[t] : isum[t];
          a = _mm512_dpbusd_epi32(a, v, _mm512_set1_epi32(load32(x + t * cols + 4 * j)));
        }
      } else {
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        for (int t = 0; t < T; ++t) {
          isum[t] = _mm512_dpbusd_epi32(isum[t], lo, _mm512_set1_epi32(load32(x + t * cols + 4 * j)));
          __m512i& a = kSplit ? isum2[t] : isum[t];
          a = _mm512_dpbusd_epi32(a, hi, _mm512_set1_epi32(load32(x + t * cols + 16 + 4 * j)));
        }
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    for (int t = 0; t < T; ++t) {
      const int64_t xi = (t0 + t) * nb + b;
      __m512i I = kSplit ? _mm512_add_epi32(isum[t], isum2[t]) : isum[t];
      if constexpr (kOffset<WT> != 0) {
        I = _mm512_sub_epi32(I, _mm512_set1_epi32(kOffset<WT> * X.sum[xi]));
      }
      const __m512 s = _mm512_mul_ps(dw, _mm512_set1_ps(X.d[xi]));
      acc[t] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(I), acc[t]);
      if constexpr (WT == WeightType::Q4_1) {
        const __m512 m =
            _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
        acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(X.dsum[xi]), acc[t]);
      }
    }
  }
  const auto mask = static_cast<__mmask16>((1u << nr) - 1u);
  for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(y + t * yStride, mask, acc[t]);
}

constexpr int kTileTokens = 8;

template <WeightType WT, int T>
void tileRest(const std::byte* gp, int64_t nb, const QuantizedActivations& X, int64_t t0,
              int64_t n, float* y, int64_t yStride, int nr) {
  if constexpr (T > 0) {
    if (n == T) return tile512<WT, T>(gp, nb, X, t0, y, yStride, nr);
    return tileRest<WT, T - 1>(gp, nb, X, t0, n, y, yStride, nr);
  }
}

template <WeightType WT>
void groupsSimd(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0,
                int64_t g1) {
  const int64_t nb = W.blocksPerRow();
  for (int64_t g = g0; g < g1; ++g) {
    const int nr = static_cast<int>(std::min<int64_t>(kPackRows, W.rows() - g * kPackRows));
    float* y = Y + g * kPackRows;
    int64_t t = 0;
    for (; t + kTileTokens <= X.rows; t += kTileTokens) {
      tile512<WT, kTileTokens>(W.group(g), nb, X, t, y + t * W.rows(), W.rows(), nr);
    }
    if (t < X.rows) {
      tileRest<WT, kTileTokens - 1>(W.group(g), nb, X, t, X.rows - t, y + t * W.rows(), W.rows(),
                                    nr);
    }
  }
}

#elif CS_KERNELS_AVX2
// --- AVX2 (and AVX-VNNI): one 8-row half of a group x T tokens per call ---

// acc += the 4-byte dot products of u (unsigned) and x (signed), per 32-bit lane.
inline __m256i dot4(__m256i acc, __m256i u, __m256i x) {
#if CS_ISA_LEVEL >= 2
  return _mm256_dpbusd_avx_epi32(acc, u, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}

template <WeightType WT, int T>
void tile256(const std::byte* gp, int64_t nb, const QuantizedActivations& X, int64_t t0, int half,
             float* y, int64_t yStride, int nr) {
  const int64_t cols = X.cols;
  const __m256i nib = _mm256_set1_epi8(0x0F);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const std::byte* p = gp + static_cast<size_t>(b) * kCellBytes<WT>;
    const std::byte* qp = p + kScaleBytes<WT> + 32 * half;
    const int8_t* x = X.q.data() + t0 * cols + b * kQuantBlock;
    __m256i isum[T];
    for (int t = 0; t < T; ++t) isum[t] = _mm256_setzero_si256();
    for (int j = 0; j < kQuads<WT>; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + 64 * j));
      if constexpr (WT == WeightType::Q8_0) {
#if CS_ISA_LEVEL >= 2
        for (int t = 0; t < T; ++t) {
          isum[t] = dot4(isum[t], v, _mm256_set1_epi32(load32(x + t * cols + 4 * j)));
        }
#else
        // note: (q + 128) * x would overflow vpmaddubsw's int16 pairs; multiply |q| by x with
        // q's sign instead (|q| <= 128, |x| <= 127), which gives sum(q * x) with no offset.
        const __m256i w = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
        const __m256i aw = _mm256_abs_epi8(w);
        for (int t = 0; t < T; ++t) {
          const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(load32(x + t * cols + 4 * j)), w);
          isum[t] = _mm256_add_epi32(
              isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), _mm256_set1_epi16(1)));
        }
#endif
      } else {
        const __m256i lo = _mm256_and_si256(v, nib);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        for (int t = 0; t < T; ++t) {
          isum[t] = dot4(isum[t], lo, _mm256_set1_epi32(load32(x + t * cols + 4 * j)));
          isum[t] = dot4(isum[t], hi, _mm256_set1_epi32(load32(x + t * cols + 16 + 4 * j)));
        }
      }
    }
    const __m256 dw =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * half)));
    for (int t = 0; t < T; ++t) {
      const int64_t xi = (t0 + t) * nb + b;
      __m256i I = isum[t];
#if CS_ISA_LEVEL < 2
      constexpr int32_t off = WT == WeightType::Q8_0 ? 0 : kOffset<WT>;
#else
      constexpr int32_t off = kOffset<WT>;
#endif
      if constexpr (off != 0) I = _mm256_sub_epi32(I, _mm256_set1_epi32(off * X.sum[xi]));
      const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(X.d[xi]));
      acc[t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(I), acc[t]);
      if constexpr (WT == WeightType::Q4_1) {
        const __m256 m = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 16 * half)));
        acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(X.dsum[xi]), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    if (nr >= 8) {
      _mm256_storeu_ps(y + t * yStride, acc[t]);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, acc[t]);
      std::copy(tmp, tmp + nr, y + t * yStride);
    }
  }
}

constexpr int kTileTokens = 4;

template <WeightType WT, int T>
void tileRest(const std::byte* gp, int64_t nb, const QuantizedActivations& X, int64_t t0,
              int64_t n, int half, float* y, int64_t yStride, int nr) {
  if constexpr (T > 0) {
    if (n == T) return tile256<WT, T>(gp, nb, X, t0, half, y, yStride, nr);
    return tileRest<WT, T - 1>(gp, nb, X, t0, n, half, y, yStride, nr);
  }
}

template <WeightType WT>
void groupsSimd(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0,
                int64_t g1) {
  const int64_t nb = W.blocksPerRow();
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rowsLeft = W.rows() - g * kPackRows;
    for (int half = 0; half < 2; ++half) {
      const int nr = static_cast<int>(std::min<int64_t>(8, rowsLeft - 8 * half));
      if (nr <= 0) break;
      float* y = Y + g * kPackRows + 8 * half;
      int64_t t = 0;
      for (; t + kTileTokens <= X.rows; t += kTileTokens) {
        tile256<WT, kTileTokens>(W.group(g), nb, X, t, half, y + t * W.rows(), W.rows(), nr);
      }
      if (t < X.rows) {
        tileRest<WT, kTileTokens - 1>(W.group(g), nb, X, t, X.rows - t, half, y + t * W.rows(),
                                      W.rows(), nr);
      }
    }
  }
}
#endif

template <WeightType WT>
void groups(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0,
            int64_t g1) {
#if CS_KERNELS_AVX2
  groupsSimd<WT>(W, X, Y, g0, g1);
#else
  groupsScalar<WT>(W, X, Y, g0, g1);
#endif
}

}  // namespace

void quantizeRows(const float* X, int64_t r0, int64_t r1, QuantizedActivations& out) {
  const int64_t cols = out.cols, nb = out.blocksPerRow();
  for (int64_t t = r0; t < r1; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i = t * nb + b;
#if CS_KERNELS_AVX2
      quantizeBlockAvx2(X + t * cols + b * kQuantBlock, out.q.data() + t * cols + b * kQuantBlock,
                        out.d[i], out.sum[i], out.dsum[i]);
#else
      quantizeBlockScalar(X + t * cols + b * kQuantBlock, out.q.data() + t * cols + b * kQuantBlock,
                          out.d[i], out.sum[i], out.dsum[i]);
#endif
    }
  }
}

void packedGroups(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0,
                  int64_t g1) {
  switch (W.type()) {
    case WeightType::Q4_0: return groups<WeightType::Q4_0>(W, X, Y, g0, g1);
    case WeightType::Q4_1: return groups<WeightType::Q4_1>(W, X, Y, g0, g1);
    case WeightType::Q8_0: return groups<WeightType::Q8_0>(W, X, Y, g0, g1);
    default: return;
  }
}

}  // namespace cortex::kernels::detail::CS_ISA_NS
