// Paged attention of one instruction-set level (compiled once per level, see CMakeLists.txt).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/attention.h"
#include "kernels/kernel_set.h"
#include "kernels/simd.h"
#include "kernels/thread_pool.h"

namespace cortex::kernels::detail::CS_ISA_NS {
namespace {

using kv::KVDType;
using kv::PagedKVView;

constexpr int64_t kParallelMinMacs = 1 << 14;

template <KVDType DT>
constexpr size_t kBytes = kv::dtypeBytes(DT);

// The scale of the row starting at `row` (headDim D elements): a Q8 row's stored scale, 1 for the
// float formats. Loads give a Q8 row's int8 values as floats; the scale is applied once per row
// (a key's score is (q . k_int) x (scale_k x attention scale), a value row's weight p_j x scale_v),
// and for the float formats those products are exact (x 1), so their bits are unchanged.
template <KVDType DT>
float rowScale(const std::byte* row, int32_t D) {
  if constexpr (DT == KVDType::Q8) {
    float scale;
    std::memcpy(&scale, row + D, sizeof scale);
    return scale;
  } else {
    (void)row;
    (void)D;
    return 1.0f;
  }
}

// 8 consecutive elements of a K/V row as floats (a Q8 element: its int8 value).
template <KVDType DT>
void load8Scalar(const std::byte* p, float* out) {
  if constexpr (DT == KVDType::F32) {
    std::memcpy(out, p, 32);
  } else if constexpr (DT == KVDType::F16) {
    for (int l = 0; l < 8; ++l) out[l] = halfToFloat(loadU16(p + 2 * l));
  } else if constexpr (DT == KVDType::BF16) {
    for (int l = 0; l < 8; ++l) out[l] = bf16ToFloat(loadU16(p + 2 * l));
  } else {
    for (int l = 0; l < 8; ++l) out[l] = static_cast<float>(static_cast<int8_t>(p[l]));
  }
}

#if CS_KERNELS_AVX2
template <KVDType DT>
__m256 load8(const std::byte* p) {
  if constexpr (DT == KVDType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (DT == KVDType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (DT == KVDType::BF16) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  } else {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(v);
  }
}
#endif

// Calls f(j, row) for key positions j in [a, b) of head `head`, walking the block table.
template <class F>
void forKeys(const PagedKVView& v, int32_t head, int32_t a, int32_t b, F&& f) {
  const auto eb = static_cast<int64_t>(kv::dtypeBytes(v.dtype));
  const int64_t tokenBytes = v.tokenStride * eb;
  const int32_t bs = v.blockSizeTokens;
  for (int32_t bi = a / bs, j0 = bi * bs; j0 < b; j0 += bs, ++bi) {
    const int32_t first = std::max(a, j0), end = std::min(b, j0 + bs);
    const std::byte* row =
        v.base + (static_cast<int64_t>(v.blockTable[bi]) * v.blockStride + head * v.headStride) * eb +
        static_cast<int64_t>(first - j0) * tokenBytes;
    for (int32_t j = first; j < end; ++j, row += tokenBytes) f(j, row);
  }
}

// Calls f(j, count, row) for chunks of up to C consecutive key positions [j, j + count) of head
// `head` that lie in one block (rows row, row + tokenBytes, ...), for keys [a, b).
template <int C, class F>
void forKeyChunks(const PagedKVView& v, int32_t head, int32_t a, int32_t b, F&& f) {
  const auto eb = static_cast<int64_t>(kv::dtypeBytes(v.dtype));
  const int64_t tokenBytes = v.tokenStride * eb;
  const int32_t bs = v.blockSizeTokens;
  for (int32_t bi = a / bs, j0 = bi * bs; j0 < b; j0 += bs, ++bi) {
    const int32_t first = std::max(a, j0), end = std::min(b, j0 + bs);
    const std::byte* row =
        v.base + (static_cast<int64_t>(v.blockTable[bi]) * v.blockStride + head * v.headStride) * eb +
        static_cast<int64_t>(first - j0) * tokenBytes;
    for (int32_t j = first; j < end; j += C, row += C * tokenBytes) {
      f(j, std::min(C, end - j), row);
    }
  }
}

#if CS_KERNELS_AVX2
// kt[d * ktStride + k] = K row k's element d, for d < D and k < 8: the chunk's `count` rows, then
// zeros.
template <KVDType KT>
void transposeChunk(const std::byte* row, int count, int64_t tokenBytes, int32_t D, float* kt,
                    size_t ktStride) {
  for (int32_t d0 = 0; d0 < D; d0 += 8) {
    __m256 r[8];
    for (int k = 0; k < 8; ++k) {
      r[k] = k < count ? load8<KT>(row + k * tokenBytes + static_cast<int64_t>(d0) * kBytes<KT>)
                       : _mm256_setzero_ps();
    }
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    float* o = kt + static_cast<size_t>(d0) * ktStride;
    const size_t w = ktStride;
    _mm256_storeu_ps(o + 0 * w, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(o + 1 * w, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(o + 2 * w, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(o + 3 * w, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(o + 4 * w, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(o + 5 * w, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(o + 6 * w, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(o + 7 * w, _mm256_permute2f128_ps(u3, u7, 0x31));
  }
}

// The SIMD widths the value and score loops run at, as one interface: 8 lanes (AVX2) and 16
// lanes (AVX-512). Each lane is its own key or dim with its own chain of operations, so the width
// never changes a bit.
struct Lanes8 {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V loadf(const float* p) { return _mm256_loadu_ps(p); }
  template <KVDType DT>
  static V load(const std::byte* p) {
    return load8<DT>(p);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void storeFirst(float* p, V v, int count) {
    if (count == W) return store(p, v);
    float tmp[W];
    _mm256_storeu_ps(tmp, v);
    std::copy(tmp, tmp + count, p);
  }
};
#endif

#if CS_ISA_LEVEL >= 3
struct Lanes16 {
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V loadf(const float* p) { return _mm512_loadu_ps(p); }
  template <KVDType DT>
  static V load(const std::byte* p) {
    if constexpr (DT == KVDType::F32) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
    } else if constexpr (DT == KVDType::F16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else if constexpr (DT == KVDType::BF16) {
      const __m512i v =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    } else {
      const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm512_cvtepi32_ps(v);
    }
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void storeFirst(float* p, V v, int count) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1u), v);
  }
};
#endif

#if CS_KERNELS_AVX2
// M query vectors against the L::W keys of a transposed chunk (kt holds d * L::W + k): one fma
// chain over d per (vector, key), keys in the lanes, times each key's scale (kscale[k]: its row
// scale x the attention scale); `count` keys are stored.
template <class L, int M>
void scoreChunk(const float* const* qs, const float* kt, int32_t D, const float* kscale, float* s,
                size_t sStride, int count) {
  typename L::V acc[M];
  for (int m = 0; m < M; ++m) acc[m] = L::zero();
  for (int32_t d = 0; d < D; ++d) {
    const typename L::V kv = L::loadf(kt + static_cast<size_t>(d) * L::W);
    for (int m = 0; m < M; ++m) acc[m] = L::fma(L::set1(qs[m][d]), kv, acc[m]);
  }
  const typename L::V sv = L::loadf(kscale);
  for (int m = 0; m < M; ++m) L::storeFirst(s + m * sStride, L::mul(acc[m], sv), count);
}

// The SIMD part of scoreRows (below) at width L: chunks of L::W keys, transposed 8 rows at a time.
template <class L, KVDType KT>
void scoreRowsSimd(const float* const* qs, int nv, int32_t a, int32_t b, int32_t kvh,
                   const PagedKVView& K, float scale, float* s, size_t sStride, float* kt) {
  const int32_t D = K.headDim;
  const int64_t tokenBytes = K.tokenStride * static_cast<int64_t>(kBytes<KT>);
  forKeyChunks<L::W>(K, kvh, a, b, [&](int32_t j, int count, const std::byte* row) {
    for (int h = 0; h < L::W; h += 8) {
      transposeChunk<KT>(row + h * tokenBytes, std::clamp(count - h, 0, 8), tokenBytes, D, kt + h,
                         L::W);
    }
    alignas(64) float kscale[L::W];
    for (int k = 0; k < L::W; ++k) {
      kscale[k] = k < count ? rowScale<KT>(row + k * tokenBytes, D) * scale : 0.0f;
    }
    for (int v0 = 0; v0 < nv; v0 += 8) {
      float* sv = s + static_cast<size_t>(v0) * sStride + j;
      const float* const* q = qs + v0;
      switch (std::min(8, nv - v0)) {
        case 8: scoreChunk<L, 8>(q, kt, D, kscale, sv, sStride, count); break;
        case 7: scoreChunk<L, 7>(q, kt, D, kscale, sv, sStride, count); break;
        case 6: scoreChunk<L, 6>(q, kt, D, kscale, sv, sStride, count); break;
        case 5: scoreChunk<L, 5>(q, kt, D, kscale, sv, sStride, count); break;
        case 4: scoreChunk<L, 4>(q, kt, D, kscale, sv, sStride, count); break;
        case 3: scoreChunk<L, 3>(q, kt, D, kscale, sv, sStride, count); break;
        case 2: scoreChunk<L, 2>(q, kt, D, kscale, sv, sStride, count); break;
        default: scoreChunk<L, 1>(q, kt, D, kscale, sv, sStride, count); break;
      }
    }
  });
}
#endif

// Scores of nv query vectors (qs[v], headDim floats each) against keys [a, b) of KV head kvh:
//   s[v * sStride + j] = (fma chain over d = 0, 1, ... of q_v[d] * k_j[d], from 0) * scale.
// The SIMD paths (scoreRowsSimd) transpose each chunk of 8 (AVX2) or 16 (AVX-512) K rows once
// (into kt, headDim * 16 floats) and run the chains of up to 8 vectors side by side with keys in
// the lanes; same bits as the scalar path.
template <KVDType KT, bool kSimd>
void scoreRows(const float* const* qs, int nv, int32_t a, int32_t b, int32_t kvh,
               const PagedKVView& K, float scale, float* s, size_t sStride, float* kt) {
  const int32_t D = K.headDim;
  const int64_t tokenBytes = K.tokenStride * static_cast<int64_t>(kBytes<KT>);
#if CS_ISA_LEVEL >= 3
  if constexpr (kSimd) return scoreRowsSimd<Lanes16, KT>(qs, nv, a, b, kvh, K, scale, s, sStride, kt);
#elif CS_KERNELS_AVX2
  if constexpr (kSimd) return scoreRowsSimd<Lanes8, KT>(qs, nv, a, b, kvh, K, scale, s, sStride, kt);
#endif
  (void)kt;
  forKeyChunks<8>(K, kvh, a, b, [&](int32_t j, int count, const std::byte* row) {
    for (int k = 0; k < count; ++k, row += tokenBytes) {
      float k8[8];
      const float ks = rowScale<KT>(row, D) * scale;
      for (int v = 0; v < nv; ++v) {
        float acc = 0.0f;
        for (int32_t d = 0; d < D; d += 8) {
          load8Scalar<KT>(row + static_cast<size_t>(d) * kBytes<KT>, k8);
          for (int l = 0; l < 8; ++l) acc = std::fma(qs[v][d + l], k8[l], acc);
        }
        s[static_cast<size_t>(v) * sStride + j + k] = acc * ks;
      }
    }
  });
}

// For G score rows over one chunk of keys [a, b): m[g] = the chunk's largest score, scores
// replaced by exp(score - m[g]) (the canonical polynomial), and l[g] = their sum, taken in double
// over 8 lanes (lane l adds keys j = l mod 8 in increasing j, then the fixed hsum8 order) so that
// it is not one long dependent chain. (a is a multiple of 8 unless a sliding window starts the
// chunk; the keys before the next multiple of 8 then go through the scalar loop.)
template <bool kSimd, int G>
void softmaxChunk(float* s, size_t sStride, int32_t a, int32_t b, float* m, double* l) {
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * sStride;
    float mx = sg[a];
    int32_t j = a + 1;
#if CS_KERNELS_AVX2
    if constexpr (kSimd) {
      // note: a max is exact whatever the order, so the lanes give the scalar loop's result; one
      // scalar chain would wait on each vmaxss's latency.
      if (b - j >= 16) {
        __m256 m0 = _mm256_loadu_ps(sg + j), m1 = _mm256_loadu_ps(sg + j + 8);
        for (j += 16; j + 16 <= b; j += 16) {
          m0 = _mm256_max_ps(m0, _mm256_loadu_ps(sg + j));
          m1 = _mm256_max_ps(m1, _mm256_loadu_ps(sg + j + 8));
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
        for (float v : lanes) mx = std::max(mx, v);
      }
    }
#endif
    for (; j < b; ++j) mx = std::max(mx, sg[j]);
    m[g] = mx;
    int32_t e = a;
    double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (; e < b && (e & 7) != 0; ++e) {
      sg[e] = expNonPositive(sg[e] - mx);
      lanes[e & 7] += sg[e];
    }
#if CS_KERNELS_AVX2
    if constexpr (kSimd) {
      const __m256 mv = _mm256_set1_ps(mx);
      // note: the lanes go on from the scalar head's sums, key after key as in the scalar loop.
      __m256d lo = _mm256_loadu_pd(lanes), hi = _mm256_loadu_pd(lanes + 4);
      for (; e + 8 <= b; e += 8) {
        const __m256 p = expNonPositive(_mm256_sub_ps(_mm256_loadu_ps(sg + e), mv));
        _mm256_storeu_ps(sg + e, p);
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
      }
      _mm256_storeu_pd(lanes, lo);
      _mm256_storeu_pd(lanes + 4, hi);
    }
#endif
    for (; e < b; ++e) {
      sg[e] = expNonPositive(sg[e] - mx);
      lanes[e & 7] += sg[e];
    }
    l[g] = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
           ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
  }
}

#if CS_KERNELS_AVX2
// The SIMD part of weightedValues (below) at width L: G x CV accumulators of L::W dims per pass over
// the keys.
template <class L, KVDType VT, int G>
void weightedValuesSimd(const float* s, size_t sStride, int32_t a, int32_t b, int32_t kvh,
                        const PagedKVView& V, float* out) {
  const int32_t D = V.headDim;
  // Vectors of dims per pass: as many accumulators as the registers hold (16 ymm, 32 zmm).
  constexpr int CV = L::W == 8 ? (G == 1 ? 8 : G <= 3 ? 4 : 2) : (G <= 2 ? 8 : 4);
  for (int32_t d0 = 0; d0 < D; d0 += L::W * CV) {
    const int nv = std::min(CV, static_cast<int>((D - d0) / L::W));
    typename L::V acc[G][CV];
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < CV; ++k) acc[g][k] = L::zero();
    forKeys(V, kvh, a, b, [&](int32_t j, const std::byte* row) {
      const std::byte* r = row + static_cast<size_t>(d0) * kBytes<VT>;
      const float vs = rowScale<VT>(row, D);
      typename L::V vv[CV];
      for (int k = 0; k < nv; ++k) {
        vv[k] = L::template load<VT>(r + static_cast<size_t>(L::W * k) * kBytes<VT>);
      }
      for (int g = 0; g < G; ++g) {
        const typename L::V p = L::set1(s[g * sStride + j] * vs);
        for (int k = 0; k < nv; ++k) acc[g][k] = L::fma(p, vv[k], acc[g][k]);
      }
    });
    for (int g = 0; g < G; ++g) {
      for (int k = 0; k < nv; ++k) L::store(out + g * D + d0 + L::W * k, acc[g][k]);
    }
  }
}
#endif

// o[g][d] = sum_j p_gj * v_j[d] over keys j in [a, b) (fma in key order, from 0) for G query
// heads of one token that share KV head kvh (o rows consecutive, headDim apart), so each V row is
// loaded and converted once for all of them; every head's arithmetic is the same whatever G is.
template <KVDType VT, bool kSimd, int G>
void weightedValues(const float* s, size_t sStride, int32_t a, int32_t b, int32_t kvh,
                    const PagedKVView& V, float* out) {
  const int32_t D = V.headDim;
#if CS_ISA_LEVEL >= 3
  if (kSimd && D % 16 == 0) return weightedValuesSimd<Lanes16, VT, G>(s, sStride, a, b, kvh, V, out);
#endif
#if CS_KERNELS_AVX2
  if constexpr (kSimd) return weightedValuesSimd<Lanes8, VT, G>(s, sStride, a, b, kvh, V, out);
#endif
  for (int g = 0; g < G; ++g) {
    for (int32_t d0 = 0; d0 < D; d0 += 64) {
      const int32_t dn = std::min(64, D - d0);
      float acc[64] = {};
      forKeys(V, kvh, a, b, [&](int32_t j, const std::byte* row) {
        const float p = s[g * sStride + j] * rowScale<VT>(row, D);
        float v8[8];
        for (int32_t d = 0; d < dn; d += 8) {
          load8Scalar<VT>(row + static_cast<size_t>(d0 + d) * kBytes<VT>, v8);
          for (int l = 0; l < 8; ++l) acc[d + l] = std::fma(p, v8[l], acc[d + l]);
        }
      });
      for (int32_t d = 0; d < dn; ++d) out[g * D + d0 + d] = acc[d];
    }
  }
}

// One chunk's share of G heads' attention: the chunk's max m, sum of exps l and unnormalized
// weighted values o (G x headDim). Scores must be in s for keys [a, b).
template <KVDType VT, bool kSimd, int G>
void chunkPartial(float* s, size_t sStride, int32_t a, int32_t b, int32_t kvh,
                  const PagedKVView& V, float* m, double* l, float* o) {
  softmaxChunk<kSimd, G>(s, sStride, a, b, m, l);
  weightedValues<VT, kSimd, G>(s, sStride, a, b, kvh, V, o);
}

// Merges the chunks of `count` heads (partials in chunk order: m[c * count + g], l likewise,
// o[(c * count + g) * D + d]) into out (count rows of D floats): with M the largest chunk max and
// w_c = exp(m_c - M), out = (sum_c w_c o_c, fma in chunk order, from 0) * float(1 / sum_c w_c l_c)
// (the sum in double, in chunk order). One chunk gives w = 1 exactly, so out = o * 1/l.
void mergeChunks(int32_t nChunks, int count, int32_t D, const float* m, const double* l,
                 const float* o, float* out) {
  for (int g = 0; g < count; ++g) {
    float mx = m[g];
    for (int32_t c = 1; c < nChunks; ++c) mx = std::max(mx, m[c * count + g]);
    double sum = 0;
    float* og = out + static_cast<size_t>(g) * D;
    std::fill(og, og + D, 0.0f);
    for (int32_t c = 0; c < nChunks; ++c) {
      const float w = expNonPositive(m[c * count + g] - mx);
      sum += static_cast<double>(w) * l[c * count + g];
      const float* oc = o + (static_cast<size_t>(c) * count + g) * D;
      for (int32_t d = 0; d < D; ++d) og[d] = std::fma(w, oc[d], og[d]);
    }
    const auto inv = static_cast<float>(1.0 / sum);
    for (int32_t d = 0; d < D; ++d) og[d] *= inv;
  }
}

// The chunks of keys one query at position p reads, in merge order (attention.h). Without a gap
// between the sinks and the window: chunks of [lo, p] from lo's chunk on (lo = 0 with no window,
// and whenever the window starts at or before the end of the sinks, so such a query's chunks are
// those of full attention). With a gap (lo > sinkTokens): the sink chunks [k * kChunk,
// min(sinkTokens, (k + 1) * kChunk)), then the window's chunks as without sinks.
struct KeyChunks {
  int32_t sinkEnd = 0;  // keys [0, sinkEnd) read as sink chunks (0 without a gap)
  int32_t nSink = 0;    // sink chunks
  int32_t lo = 0;       // first key of the rest
  int32_t n = 0;        // p + 1
  int32_t c0 = 0;       // chunk of lo
  int32_t count = 0;    // chunks in all

  KeyChunks(int32_t p, int32_t window, int32_t sink) : n(p + 1) {
    lo = window > 0 ? std::max(0, p - window + 1) : 0;
    if (lo <= sink) {
      lo = 0;
    } else {
      sinkEnd = sink;
      nSink = (sink + kAttentionChunkKeys - 1) / kAttentionChunkKeys;
    }
    c0 = lo / kAttentionChunkKeys;
    count = nSink + (n + kAttentionChunkKeys - 1) / kAttentionChunkKeys - c0;
  }
  // Keys [a, b) of chunk k (never empty).
  void range(int32_t k, int32_t& a, int32_t& b) const {
    if (k < nSink) {
      a = k * kAttentionChunkKeys;
      b = std::min(sinkEnd, a + kAttentionChunkKeys);
      return;
    }
    const int32_t c = c0 + k - nSink;
    a = std::max(lo, c * kAttentionChunkKeys);
    b = std::min(n, c * kAttentionChunkKeys + kAttentionChunkKeys);
  }
};

// Partials of chunks [k0, k1) of `kc` into the partial buffers (indexed by k - k0). Scores must be
// in s for those chunks' keys.
template <KVDType VT, bool kSimd>
void chunkPartials(int count, float* s, size_t sStride, const KeyChunks& kc, int32_t k0,
                   int32_t k1, int32_t kvh, const PagedKVView& V, float* m, double* l, float* o) {
  const int32_t D = V.headDim;
  for (int32_t k = k0; k < k1; ++k) {
    int32_t a, b;
    kc.range(k, a, b);
    const size_t i = static_cast<size_t>(k - k0) * count;
    float* mc = m + i;
    double* lc = l + i;
    float* oc = o + i * D;
    switch (count) {
      case 4: chunkPartial<VT, kSimd, 4>(s, sStride, a, b, kvh, V, mc, lc, oc); break;
      case 3: chunkPartial<VT, kSimd, 3>(s, sStride, a, b, kvh, V, mc, lc, oc); break;
      case 2: chunkPartial<VT, kSimd, 2>(s, sStride, a, b, kvh, V, mc, lc, oc); break;
      default: chunkPartial<VT, kSimd, 1>(s, sStride, a, b, kvh, V, mc, lc, oc); break;
    }
  }
}

// Per-thread buffers of chunk partials, grown once to the largest call.
struct Partials {
  std::vector<float> m, o;
  std::vector<double> l;
  void reserve(size_t entries, int32_t D) {
    if (m.size() < entries) {
      m.resize(entries);
      l.resize(entries);
    }
    if (o.size() < entries * static_cast<size_t>(D)) o.resize(entries * static_cast<size_t>(D));
  }
};

constexpr int kMaxGroup = kAttentionMaxGroup;
constexpr int kTileTokens = kAttentionTileTokens;

template <KVDType KT, KVDType VT, bool kSimd>
void attentionT(ThreadPool& pool, const float* Q, int32_t nQ, int32_t firstPos, int32_t nHeads,
                const PagedKVView& K, const PagedKVView& V, float scale, float* out,
                float* scratch, int32_t window, int32_t sink) {
  const int32_t D = K.headDim;
  const int32_t nKV = K.numKVHeads;
  const int32_t group = nHeads / nKV;
  const size_t stride = scoreStride(firstPos + nQ);
  const int64_t macs = static_cast<int64_t>(nQ) * nHeads * (firstPos + (nQ + 1) / 2) * D * 2;
  const bool parallel = macs >= kParallelMinMacs && pool.size() > 1;
  const int nThreads = parallel ? pool.size() : 1;
  // Work item = (tile of up to kTileTokens query tokens, KV head, sub-group of up to kMaxGroup
  // heads): the tile's K rows are transposed once for all its query vectors. Sub-groups shrink
  // when there are too few items to keep every thread busy (a decode step has only nKV groups).
  const int32_t nTiles = (nQ + kTileTokens - 1) / kTileTokens;
  int sub = std::min(group, kMaxGroup);
  while (sub > 1 && static_cast<int64_t>(nTiles) * nKV * ((group + sub - 1) / sub) < nThreads) {
    sub = (sub + 1) / 2;
  }
  const int32_t subsPerKV = (group + sub - 1) / sub;
  const int64_t items = static_cast<int64_t>(nTiles) * nKV * subsPerKV;
  const auto subGroup = [&](int32_t rest, int32_t subs, int32_t width, int32_t& kvh, int32_t& h0,
                            int& count) {
    kvh = rest / subs;
    h0 = kvh * group + (rest % subs) * width;
    count = std::min(width, kvh * group + group - h0);
  };
  const auto ensureKt = [D]() -> float* {
    // note: grows once per thread to the widest head; nothing is allocated in steady state.
    thread_local std::vector<float> ktBuf;
    if (ktBuf.size() < static_cast<size_t>(D) * 16) ktBuf.resize(static_cast<size_t>(D) * 16);
    return ktBuf.data();
  };

  // One decode token over several chunks of keys: the (head group, chunk) pieces are spread over
  // the threads, then each head's chunks are merged in chunk order, the same arithmetic as the
  // sequential path below, so the result does not depend on the thread count.
  const KeyChunks decode(firstPos, window, sink);
  const int32_t nChunksDecode = decode.count;
  if (nQ == 1 && parallel && nChunksDecode > 1) {
    const int width = std::min(group, kMaxGroup);
    const int32_t subs = (group + width - 1) / width;
    // note: a lambda does not capture a thread_local (the workers would see their own, empty
    // ones), hence the reference.
    thread_local Partials callerPartials;
    Partials& shared = callerPartials;
    shared.reserve(static_cast<size_t>(nHeads) * nChunksDecode, D);
    pool.parallelFor(static_cast<int64_t>(nKV) * subs * nChunksDecode, [&](int64_t it, int tid) {
      int32_t kvh, h0;
      int count;
      subGroup(static_cast<int32_t>(it / nChunksDecode), subs, width, kvh, h0, count);
      const auto k = static_cast<int32_t>(it % nChunksDecode);
      int32_t a, b;
      decode.range(k, a, b);
      float* s = scratch + static_cast<size_t>(tid) * kMaxGroup * kTileTokens * stride;
      const float* qs[kMaxGroup];
      for (int g = 0; g < count; ++g) qs[g] = Q + static_cast<int64_t>(h0 + g) * D;
      scoreRows<KT, kSimd>(qs, count, a, b, kvh, K, scale, s, stride, ensureKt());
      const size_t at = static_cast<size_t>(h0) * nChunksDecode + static_cast<size_t>(k) * count;
      chunkPartials<VT, kSimd>(count, s, stride, decode, k, k + 1, kvh, V, shared.m.data() + at,
                               shared.l.data() + at, shared.o.data() + at * D);
    });
    for (int32_t r = 0; r < nKV * subs; ++r) {
      int32_t kvh, h0;
      int count;
      subGroup(r, subs, width, kvh, h0, count);
      const size_t at = static_cast<size_t>(h0) * nChunksDecode;
      mergeChunks(nChunksDecode, count, D, shared.m.data() + at, shared.l.data() + at,
                  shared.o.data() + at * D, out + static_cast<int64_t>(h0) * D);
    }
    return;
  }

  const auto body = [&](int64_t it, int tid) {
    const auto tile = static_cast<int32_t>(it / (nKV * subsPerKV));
    int32_t kvh, h0;
    int count;
    subGroup(static_cast<int32_t>(it % (nKV * subsPerKV)), subsPerKV, sub, kvh, h0, count);
    const int32_t i0 = tile * kTileTokens;
    const int32_t nt = std::min(kTileTokens, nQ - i0);
    float* s = scratch + static_cast<size_t>(tid) * kMaxGroup * kTileTokens * stride;
    const float* qs[kMaxGroup * kTileTokens];
    for (int t = 0; t < nt; ++t) {
      for (int g = 0; g < count; ++g) {
        qs[t * count + g] = Q + ((static_cast<int64_t>(i0 + t) * nHeads) + h0 + g) * D;
      }
    }
    // The keys any query of the tile reads: [0, end) when the first query has no gap (it reads
    // [0, its position]), else [0, sinks) and [its lo, end), since later windows start no earlier.
    const KeyChunks first(firstPos + i0, window, sink);
    const int32_t end = firstPos + i0 + nt;
    if (first.sinkEnd > 0) {
      scoreRows<KT, kSimd>(qs, nt * count, 0, first.sinkEnd, kvh, K, scale, s, stride, ensureKt());
    }
    scoreRows<KT, kSimd>(qs, nt * count, first.lo, end, kvh, K, scale, s, stride, ensureKt());
    thread_local Partials partials;
    for (int t = 0; t < nt; ++t) {
      float* st = s + static_cast<size_t>(t) * count * stride;
      const KeyChunks kc(firstPos + i0 + t, window, sink);
      partials.reserve(static_cast<size_t>(kc.count) * count, D);
      chunkPartials<VT, kSimd>(count, st, stride, kc, 0, kc.count, kvh, V, partials.m.data(),
                               partials.l.data(), partials.o.data());
      mergeChunks(kc.count, count, D, partials.m.data(), partials.l.data(), partials.o.data(),
                  out + (static_cast<int64_t>(i0 + t) * nHeads + h0) * D);
    }
  };
  if (!parallel) {
    for (int64_t it = 0; it < items; ++it) body(it, 0);
    return;
  }
  pool.parallelFor(items, [&](int64_t it, int worker) { body(it, worker); });
}

template <bool kSimd>
void dispatch(ThreadPool& pool, const float* Q, int32_t nQ, int32_t firstPos, int32_t nHeads,
              const PagedKVView& K, const PagedKVView& V, float scale, float* out, float* scratch,
              int32_t window, int32_t sink) {
  const auto fail = [](const std::string& what) {
    throw std::invalid_argument("pagedAttention: " + what);
  };
  if (nQ <= 0) return;
  if (firstPos < 0) fail("negative firstQueryPos");
  if (K.numKVHeads <= 0 || K.numKVHeads != V.numKVHeads || K.headDim != V.headDim)
    fail("K and V views disagree on numKVHeads/headDim");
  if (K.headDim <= 0 || K.headDim % 8 != 0) fail("headDim must be a positive multiple of 8");
  if (nHeads <= 0 || nHeads % K.numKVHeads != 0) fail("nHeads must be a multiple of numKVHeads");
  if (window < 0) fail("negative windowTokens");
  if (sink < 0) fail("negative sinkTokens");
  if (window == 0) sink = 0;  // full attention reads the sinks anyway
  if (K.numTokens < firstPos + nQ || V.numTokens < firstPos + nQ)
    fail("views hold " + std::to_string(std::min(K.numTokens, V.numTokens)) +
         " tokens, queries need " + std::to_string(firstPos + nQ));
  // Q8 only pairs with Q8 (one KV format stores both); the float formats mix freely.
  if ((K.dtype == KVDType::Q8) != (V.dtype == KVDType::Q8)) fail("q8 K needs q8 V and vice versa");
  if (K.dtype == KVDType::Q8) {
    return attentionT<KVDType::Q8, KVDType::Q8, kSimd>(pool, Q, nQ, firstPos, nHeads, K, V,
                                                        scale, out, scratch, window, sink);
  }
  const auto go = [&]<KVDType KT>() {
    switch (V.dtype) {
      case KVDType::Q8: break;  // handled above
      case KVDType::F32:
        return attentionT<KT, KVDType::F32, kSimd>(pool, Q, nQ, firstPos, nHeads, K, V, scale,
                                                    out, scratch, window, sink);
      case KVDType::F16:
        return attentionT<KT, KVDType::F16, kSimd>(pool, Q, nQ, firstPos, nHeads, K, V, scale,
                                                    out, scratch, window, sink);
      case KVDType::BF16:
        return attentionT<KT, KVDType::BF16, kSimd>(pool, Q, nQ, firstPos, nHeads, K, V, scale,
                                                     out, scratch, window, sink);
    }
  };
  switch (K.dtype) {
    case KVDType::F32: return go.template operator()<KVDType::F32>();
    case KVDType::F16: return go.template operator()<KVDType::F16>();
    case KVDType::BF16: return go.template operator()<KVDType::BF16>();
    case KVDType::Q8: break;  // handled above
  }
}

}  // namespace

void pagedAttention(ThreadPool& pool, const float* Q, int32_t nQueryTokens, int32_t firstQueryPos,
                    int32_t nHeads, const kv::PagedKVView& K, const kv::PagedKVView& V,
                    float scale, float* out, float* scratch, int32_t windowTokens,
                    int32_t sinkTokens) {
#if CS_KERNELS_AVX2
  dispatch<true>(pool, Q, nQueryTokens, firstQueryPos, nHeads, K, V, scale, out, scratch,
                 windowTokens, sinkTokens);
#else
  dispatch<false>(pool, Q, nQueryTokens, firstQueryPos, nHeads, K, V, scale, out, scratch,
                  windowTokens, sinkTokens);
#endif
}

}  // namespace cortex::kernels::detail::CS_ISA_NS
