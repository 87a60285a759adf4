// Paged attention of one instruction-set level (compiled once per level, see CMakeLists.txt).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

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

// 8 consecutive elements of a K/V row as floats.
template <KVDType DT>
void load8Scalar(const std::byte* p, float* out) {
  if constexpr (DT == KVDType::F32) {
    std::memcpy(out, p, 32);
  } else if constexpr (DT == KVDType::F16) {
    for (int l = 0; l < 8; ++l) out[l] = halfToFloat(loadU16(p + 2 * l));
  } else {
    for (int l = 0; l < 8; ++l) out[l] = bf16ToFloat(loadU16(p + 2 * l));
  }
}

#if CS_KERNELS_AVX2
template <KVDType DT>
__m256 load8(const std::byte* p) {
  if constexpr (DT == KVDType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  } else if constexpr (DT == KVDType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
}
#endif

// Calls f(j, row) for key positions j in [0, n) of head `head`, walking the block table.
template <class F>
void forKeys(const PagedKVView& v, int32_t head, int32_t n, F&& f) {
  const auto eb = static_cast<int64_t>(kv::dtypeBytes(v.dtype));
  const int64_t tokenBytes = v.tokenStride * eb;
  for (int32_t j0 = 0, bi = 0; j0 < n; j0 += v.blockSizeTokens, ++bi) {
    const std::byte* row =
        v.base + (static_cast<int64_t>(v.blockTable[bi]) * v.blockStride + head * v.headStride) * eb;
    const int32_t end = std::min(n, j0 + v.blockSizeTokens);
    for (int32_t j = j0; j < end; ++j, row += tokenBytes) f(j, row);
  }
}

// G query heads that share one KV head (consecutive heads: q + g * headDim, same for out), so
// each K and V row is loaded and converted once for all of them. Every head's arithmetic is the
// same sequence of operations whatever G is (and the same as the scalar path), so grouping is
// invisible in the results.
//   q, out: G rows of headDim floats (stride headDim); s: G score rows of sStride floats.
template <KVDType KT, KVDType VT, bool kSimd, int G>
void attendGroup(const float* q, int32_t n, int32_t kvh, const PagedKVView& K,
                 const PagedKVView& V, float scale, float* out, float* s, size_t sStride) {
  const int32_t D = K.headDim;
  // --- scores: s[g][j] = hsum8(8-lane fma chain of q_g . k_j) * scale ---
#if CS_KERNELS_AVX2
  if constexpr (kSimd) {
    const auto eb = static_cast<int64_t>(kBytes<KT>);
    const int64_t tokenBytes = K.tokenStride * eb;
    constexpr int KK = G <= 2 ? 4 : 2;  // keys side by side (G * KK accumulators)
    for (int32_t j0 = 0, bi = 0; j0 < n; j0 += K.blockSizeTokens, ++bi) {
      const std::byte* row =
          K.base + (static_cast<int64_t>(K.blockTable[bi]) * K.blockStride + kvh * K.headStride) * eb;
      const int32_t end = std::min(n, j0 + K.blockSizeTokens);
      int32_t j = j0;
      for (; j + KK <= end; j += KK, row += KK * tokenBytes) {
        __m256 acc[G][KK];
        for (int g = 0; g < G; ++g)
          for (int k = 0; k < KK; ++k) acc[g][k] = _mm256_setzero_ps();
        for (int32_t d = 0; d < D; d += 8) {
          __m256 kv[KK];
          for (int k = 0; k < KK; ++k) kv[k] = load8<KT>(row + k * tokenBytes + d * eb);
          for (int g = 0; g < G; ++g) {
            const __m256 qv = _mm256_loadu_ps(q + g * D + d);
            for (int k = 0; k < KK; ++k) acc[g][k] = _mm256_fmadd_ps(qv, kv[k], acc[g][k]);
          }
        }
        for (int g = 0; g < G; ++g)
          for (int k = 0; k < KK; ++k) s[g * sStride + j + k] = hsum8(acc[g][k]) * scale;
      }
      for (; j < end; ++j, row += tokenBytes) {
        __m256 acc[G];
        for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
        for (int32_t d = 0; d < D; d += 8) {
          const __m256 kv = load8<KT>(row + d * eb);
          for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, acc[g]);
        }
        for (int g = 0; g < G; ++g) s[g * sStride + j] = hsum8(acc[g]) * scale;
      }
    }
  } else
#endif
  {
    forKeys(K, kvh, n, [&](int32_t j, const std::byte* row) {
      float k8[8];
      for (int g = 0; g < G; ++g) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int32_t d = 0; d < D; d += 8) {
          load8Scalar<KT>(row + static_cast<size_t>(d) * kBytes<KT>, k8);
          for (int l = 0; l < 8; ++l) acc[l] = std::fma(q[g * D + d + l], k8[l], acc[l]);
        }
        s[g * sStride + j] = hsum8(acc) * scale;
      }
    });
  }
  // --- softmax weights per head: exp in key order (same bits in both paths), sum in double ---
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* sg = s + g * sStride;
    float mx = sg[0];
    for (int32_t j = 1; j < n; ++j) mx = std::max(mx, sg[j]);
    int32_t e = 0;
#if CS_KERNELS_AVX2
    if constexpr (kSimd) {
      const __m256 mv = _mm256_set1_ps(mx);
      for (; e + 8 <= n; e += 8) {
        _mm256_storeu_ps(sg + e, expNonPositive(_mm256_sub_ps(_mm256_loadu_ps(sg + e), mv)));
      }
    }
#endif
    for (; e < n; ++e) sg[e] = expNonPositive(sg[e] - mx);
    double sum = 0;
    for (e = 0; e < n; ++e) sum += sg[e];
    inv[g] = static_cast<float>(1.0 / sum);
  }
  // --- out[g][d] = (sum_j p_gj * v_j[d], fma in key order) * inv[g] ---
#if CS_KERNELS_AVX2
  if constexpr (kSimd) {
    constexpr int CV = G == 1 ? 8 : G <= 3 ? 4 : 2;  // vectors of dims per pass (G * CV accs)
    for (int32_t d0 = 0; d0 < D; d0 += 8 * CV) {
      const int nv = std::min(CV, static_cast<int>((D - d0) / 8));
      __m256 acc[G][CV];
      for (int g = 0; g < G; ++g)
        for (int k = 0; k < CV; ++k) acc[g][k] = _mm256_setzero_ps();
      forKeys(V, kvh, n, [&](int32_t j, const std::byte* row) {
        const std::byte* r = row + static_cast<size_t>(d0) * kBytes<VT>;
        __m256 vv[CV];
        for (int k = 0; k < nv; ++k) vv[k] = load8<VT>(r + static_cast<size_t>(8 * k) * kBytes<VT>);
        for (int g = 0; g < G; ++g) {
          const __m256 p = _mm256_set1_ps(s[g * sStride + j]);
          for (int k = 0; k < nv; ++k) acc[g][k] = _mm256_fmadd_ps(p, vv[k], acc[g][k]);
        }
      });
      for (int g = 0; g < G; ++g) {
        const __m256 iv = _mm256_set1_ps(inv[g]);
        for (int k = 0; k < nv; ++k) {
          _mm256_storeu_ps(out + g * D + d0 + 8 * k, _mm256_mul_ps(acc[g][k], iv));
        }
      }
    }
    return;
  }
#endif
  for (int g = 0; g < G; ++g) {
    for (int32_t d0 = 0; d0 < D; d0 += 64) {
      const int32_t dn = std::min(64, D - d0);
      float acc[64] = {};
      forKeys(V, kvh, n, [&](int32_t j, const std::byte* row) {
        const float p = s[g * sStride + j];
        float v8[8];
        for (int32_t d = 0; d < dn; d += 8) {
          load8Scalar<VT>(row + static_cast<size_t>(d0 + d) * kBytes<VT>, v8);
          for (int l = 0; l < 8; ++l) acc[d + l] = std::fma(p, v8[l], acc[d + l]);
        }
      });
      for (int32_t d = 0; d < dn; ++d) out[g * D + d0 + d] = acc[d] * inv[g];
    }
  }
}

constexpr int kMaxGroup = kAttentionMaxGroup;

template <KVDType KT, KVDType VT, bool kSimd>
void attentionT(ThreadPool& pool, const float* Q, int32_t nQ, int32_t firstPos, int32_t nHeads,
                const PagedKVView& K, const PagedKVView& V, float scale, float* out,
                float* scratch) {
  const int32_t D = K.headDim;
  const int32_t nKV = K.numKVHeads;
  const int32_t group = nHeads / nKV;
  const size_t stride = scoreStride(firstPos + nQ);
  const int64_t macs = static_cast<int64_t>(nQ) * nHeads * (firstPos + (nQ + 1) / 2) * D * 2;
  const bool parallel = macs >= kParallelMinMacs && pool.size() > 1;
  const int nThreads = parallel ? pool.size() : 1;
  // Work item = (query token, KV head, sub-group of up to kMaxGroup heads). Sub-groups shrink
  // when there are too few items to keep every thread busy (a decode step has only nKV groups).
  int sub = std::min(group, kMaxGroup);
  while (sub > 1 && static_cast<int64_t>(nQ) * nKV * ((group + sub - 1) / sub) < nThreads) {
    sub = (sub + 1) / 2;
  }
  const int32_t subsPerKV = (group + sub - 1) / sub;
  const int64_t items = static_cast<int64_t>(nQ) * nKV * subsPerKV;
  const auto body = [&](int64_t it, int tid) {
    const auto i = static_cast<int32_t>(it / (nKV * subsPerKV));
    const auto rest = static_cast<int32_t>(it % (nKV * subsPerKV));
    const int32_t kvh = rest / subsPerKV;
    const int32_t h0 = kvh * group + (rest % subsPerKV) * sub;
    const int count = std::min(sub, kvh * group + group - h0);
    const int64_t off = (static_cast<int64_t>(i) * nHeads + h0) * D;
    float* s = scratch + static_cast<size_t>(tid) * kMaxGroup * stride;
    const int32_t n = firstPos + i + 1;
    switch (count) {
      case 4: return attendGroup<KT, VT, kSimd, 4>(Q + off, n, kvh, K, V, scale, out + off, s, stride);
      case 3: return attendGroup<KT, VT, kSimd, 3>(Q + off, n, kvh, K, V, scale, out + off, s, stride);
      case 2: return attendGroup<KT, VT, kSimd, 2>(Q + off, n, kvh, K, V, scale, out + off, s, stride);
      default: return attendGroup<KT, VT, kSimd, 1>(Q + off, n, kvh, K, V, scale, out + off, s, stride);
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
              const PagedKVView& K, const PagedKVView& V, float scale, float* out, float* scratch) {
  const auto fail = [](const std::string& what) {
    throw std::invalid_argument("pagedAttention: " + what);
  };
  if (nQ <= 0) return;
  if (firstPos < 0) fail("negative firstQueryPos");
  if (K.numKVHeads <= 0 || K.numKVHeads != V.numKVHeads || K.headDim != V.headDim)
    fail("K and V views disagree on numKVHeads/headDim");
  if (K.headDim <= 0 || K.headDim % 8 != 0) fail("headDim must be a positive multiple of 8");
  if (nHeads <= 0 || nHeads % K.numKVHeads != 0) fail("nHeads must be a multiple of numKVHeads");
  if (K.numTokens < firstPos + nQ || V.numTokens < firstPos + nQ)
    fail("views hold " + std::to_string(std::min(K.numTokens, V.numTokens)) +
         " tokens, queries need " + std::to_string(firstPos + nQ));
  const auto go = [&]<KVDType KT>() {
    switch (V.dtype) {
      case KVDType::F32:
        return attentionT<KT, KVDType::F32, kSimd>(pool, Q, nQ, firstPos, nHeads, K, V, scale,
                                                    out, scratch);
      case KVDType::F16:
        return attentionT<KT, KVDType::F16, kSimd>(pool, Q, nQ, firstPos, nHeads, K, V, scale,
                                                    out, scratch);
      case KVDType::BF16:
        return attentionT<KT, KVDType::BF16, kSimd>(pool, Q, nQ, firstPos, nHeads, K, V, scale,
                                                     out, scratch);
    }
  };
  switch (K.dtype) {
    case KVDType::F32: return go.template operator()<KVDType::F32>();
    case KVDType::F16: return go.template operator()<KVDType::F16>();
    case KVDType::BF16: return go.template operator()<KVDType::BF16>();
  }
}

}  // namespace

void pagedAttention(ThreadPool& pool, const float* Q, int32_t nQueryTokens, int32_t firstQueryPos,
                    int32_t nHeads, const kv::PagedKVView& K, const kv::PagedKVView& V,
                    float scale, float* out, float* scratch) {
#if CS_KERNELS_AVX2
  dispatch<true>(pool, Q, nQueryTokens, firstQueryPos, nHeads, K, V, scale, out, scratch);
#else
  dispatch<false>(pool, Q, nQueryTokens, firstQueryPos, nHeads, K, V, scale, out, scratch);
#endif
}

}  // namespace cortex::kernels::detail::CS_ISA_NS
