// The integer matmul and the activation quantizer of one instruction-set level (compiled once per
// level, see CMakeLists.txt; the layout and numerics are in quant.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/ggml_blocks.h"
#include "kernels/kernel_set.h"
#include "kernels/packed_layout.h"
#include "kernels/simd.h"

namespace cortex::kernels::detail::CS_ISA_NS {

namespace {

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint8_t ub(const std::byte* p, int i) { return static_cast<uint8_t>(p[i]); }

// f(std::integral_constant<int, I>) for I = 0..N-1, unrolled at compile time.
template <int N, class F>
inline void staticFor(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

template <WeightType WT>
constexpr int kBlocksPerCell = PackedLayout<WT>::kCellElems / 32;

// The offset subtracted from the stored unsigned values (quant.h "off").
template <WeightType WT>
constexpr int32_t kOff = WT == WeightType::Q4_0   ? 8
                         : WT == WeightType::Q5_0 ? 16
                         : WT == WeightType::Q8_0 ? 128
                         : WT == WeightType::Q6_K ? 32
                         : WT == WeightType::Q3_K ? 4
                                                  : 0;

// Types whose 32-column blocks have two 16-column sub-blocks with their own scales: the kernels
// keep Ia and Ib apart.
template <WeightType WT>
constexpr bool kHalves =
    WT == WeightType::Q6_K || WT == WeightType::Q3_K || WT == WeightType::Q2_K;

// --- activation quantization ---

#if !CS_KERNELS_AVX2
void quantizeBlockScalar(const float* x, int8_t* q, float& d, int32_t& sum, float& dsum,
                         int32_t& sumLo) {
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
    if (i == 15) sumLo = s;
  }
  sum = s;
  dsum = d * static_cast<float>(s);
}
#endif

#if CS_KERNELS_AVX2
void quantizeBlockAvx2(const float* x, int8_t* q, float& d, int32_t& sum, float& dsum,
                       int32_t& sumLo) {
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
  const auto hsum = [](__m256i w) {
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    return _mm_cvtsi128_si32(s4);
  };
  sumLo = hsum(_mm256_add_epi32(i32[0], i32[1]));
  sum = sumLo + hsum(_mm256_add_epi32(i32[2], i32[3]));
  dsum = d * static_cast<float>(sum);
}
#endif

// --- scalar group kernel: the definition every SIMD path reproduces ---

// Row i's 32 unsigned values u of a packed data block, read back as quant.h describes them.
template <PackedData D>
void unpackBlock(const std::byte* blk, int i, uint8_t* u) {
  const auto at = [&](int vec, int k) { return ub(blk, 64 * vec + 4 * i + k); };
  if constexpr (D == PackedData::Bytes) {
    for (int j = 0; j < 8; ++j) {
      for (int k = 0; k < 4; ++k) u[4 * j + k] = at(j, k);
    }
  } else if constexpr (D == PackedData::TwoBit || D == PackedData::TwoBit3) {
    for (int p = 0; p < 2; ++p) {
      for (int s = 0; s < 4; ++s) {
        for (int k = 0; k < 4; ++k) u[16 * p + 4 * s + k] = (at(p, k) >> (2 * s)) & 3;
      }
    }
    if constexpr (D == PackedData::TwoBit3) {
      for (int j = 0; j < 8; ++j) {
        for (int k = 0; k < 4; ++k) u[4 * j + k] |= static_cast<uint8_t>(((at(2, k) >> j) & 1) << 2);
      }
    }
  } else {
    for (int j = 0; j < 4; ++j) {
      for (int k = 0; k < 4; ++k) {
        u[4 * j + k] = at(j, k) & 0x0F;
        u[16 + 4 * j + k] = at(j, k) >> 4;
      }
    }
    for (int n = 0; n < 2; ++n) {
      for (int j = 0; j < 4; ++j) {
        for (int k = 0; k < 4; ++k) {
          uint8_t& v = u[16 * n + 4 * j + k];
          if constexpr (D == PackedData::Nibbles5) {
            v |= static_cast<uint8_t>(((at(4, k) >> (j + 4 * n)) & 1) << 4);
          } else if constexpr (D == PackedData::Nibbles6) {
            v |= static_cast<uint8_t>(((at(4 + n, k) >> (2 * j)) & 3) << 4);
          }
        }
      }
    }
  }
}

// acc after block s of `cell` for row i, given the exact Ia and Ib (quant.h's numerics).
template <WeightType WT>
float finishScalar(const std::byte* cell, int i, int s, const QuantizedActivations& X, int64_t xi,
                   int32_t ia, int32_t ib, float acc) {
  using L = PackedLayout<WT>;
  const float d = halfToFloat(loadU16(cell + L::kD + 2 * i));
  const float dx = X.d[xi];
  if constexpr (WT == WeightType::Q4_0 || WT == WeightType::Q5_0 || WT == WeightType::Q8_0) {
    const int32_t I = ia + ib - kOff<WT> * X.sum[xi];
    return std::fma(d * dx, static_cast<float>(I), acc);
  } else if constexpr (WT == WeightType::Q4_1 || WT == WeightType::Q5_1) {
    acc = std::fma(d * dx, static_cast<float>(ia + ib), acc);
    return std::fma(halfToFloat(loadU16(cell + L::kM + 2 * i)), X.dsum[xi], acc);
  } else if constexpr (WT == WeightType::Q4_K || WT == WeightType::Q5_K) {
    std::byte b[12];
    for (int p = 0; p < 12; ++p) b[p] = cell[L::kScales + 16 * p + i];
    uint8_t sc, m;
    scaleMinK(b, s, sc, m);
    const float S = d * static_cast<float>(sc);
    const float N = halfToFloat(loadU16(cell + L::kNegDmin + 2 * i)) * static_cast<float>(m);
    acc = std::fma(S * dx, static_cast<float>(ia + ib), acc);
    return std::fma(N, X.dsum[xi], acc);
  } else if constexpr (WT == WeightType::Q6_K || WT == WeightType::Q3_K) {
    int32_t sca, scb;
    if constexpr (WT == WeightType::Q6_K) {
      sca = static_cast<int8_t>(ub(cell, L::kScales + 16 * (2 * s) + i));
      scb = static_cast<int8_t>(ub(cell, L::kScales + 16 * (2 * s + 1) + i));
    } else {
      std::byte b[12];
      for (int p = 0; p < 12; ++p) b[p] = cell[L::kScales + 16 * p + i];
      sca = scaleQ3K(b, 2 * s);
      scb = scaleQ3K(b, 2 * s + 1);
    }
    const int32_t sa = X.sumLo[xi], sb = X.sum[xi] - sa;
    const int32_t J = sca * (ia - kOff<WT> * sa) + scb * (ib - kOff<WT> * sb);
    return std::fma(d * dx, static_cast<float>(J), acc);
  } else {
    static_assert(WT == WeightType::Q2_K);
    const int32_t a = ub(cell, L::kScales + 16 * (2 * s) + i);
    const int32_t b = ub(cell, L::kScales + 16 * (2 * s + 1) + i);
    const int32_t sa = X.sumLo[xi], sb = X.sum[xi] - sa;
    const int32_t J = (a & 15) * ia + (b & 15) * ib;
    const int32_t M = (a >> 4) * sa + (b >> 4) * sb;
    const float nd = halfToFloat(loadU16(cell + L::kNegDmin + 2 * i));
    acc = std::fma(d * dx, static_cast<float>(J), acc);
    return std::fma(nd * dx, static_cast<float>(M), acc);
  }
}

template <WeightType WT>
void groupScalar(const std::byte* gp, int64_t nCells, const QuantizedActivations& X, int64_t t,
                 float* acc) {
  using L = PackedLayout<WT>;
  const int8_t* xq = X.q.data() + t * X.cols;
  const int64_t xb = t * X.blocksPerRow();
  for (int i = 0; i < kPackRows; ++i) acc[i] = 0.0f;
  for (int64_t c = 0; c < nCells; ++c) {
    const std::byte* cell = gp + static_cast<size_t>(c) * kPackedCellBytes<WT>;
    for (int s = 0; s < kBlocksPerCell<WT>; ++s) {
      const int64_t b = c * kBlocksPerCell<WT> + s;
      const std::byte* blk = cell + L::kHeader + s * kPackedBlockBytes<WT>;
      const int8_t* x = xq + b * kQuantBlock;
      for (int i = 0; i < kPackRows; ++i) {
        uint8_t u[32];
        unpackBlock<L::kData>(blk, i, u);
        int32_t ia = 0, ib = 0;
        for (int e = 0; e < 16; ++e) ia += u[e] * x[e];
        for (int e = 16; e < 32; ++e) ib += u[e] * x[e];
        acc[i] = finishScalar<WT>(cell, i, s, X, xb + b, ia, ib, acc[i]);
      }
    }
  }
}

template <WeightType WT>
void groupsScalar(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0,
                  int64_t g1) {
  float acc[kPackRows];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t nr = std::min<int64_t>(kPackRows, W.rows() - g * kPackRows);
    for (int64_t t = 0; t < X.rows; ++t) {
      groupScalar<WT>(W.group(g), W.cellsPerRow(), X, t, acc);
      std::copy(acc, acc + nr, Y + t * W.rows() + g * kPackRows);
    }
  }
}

#if CS_KERNELS_AVX2
// --- SIMD: one vector of rows (16 with AVX-512, 8 with AVX2: one half of a group) x T tokens ---

#if CS_ISA_LEVEL >= 3
struct V {
  using I = __m512i;
  using F = __m512;
  static constexpr int kRows = 16;
  static constexpr int kTileTokens = 8;
  static I load(const std::byte* p) { return _mm512_loadu_si512(p); }
  static I bytes(int c) { return _mm512_set1_epi8(static_cast<char>(c)); }
  static I andv(I a, I b) { return _mm512_and_si512(a, b); }
  static I orv(I a, I b) { return _mm512_or_si512(a, b); }
  template <int N>
  static I srl16(I a) { return _mm512_srli_epi16(a, N); }
  template <int N>
  static I sll16(I a) { return _mm512_slli_epi16(a, N); }
  template <int N>
  static I srl32(I a) { return _mm512_srli_epi32(a, N); }
  template <int N>
  static I sll32(I a) { return _mm512_slli_epi32(a, N); }
  static I srlv32(I a, int n) { return _mm512_srlv_epi32(a, _mm512_set1_epi32(n)); }
  static I zero() { return _mm512_setzero_si512(); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I bcast(const int8_t* p) { return _mm512_set1_epi32(load32(p)); }
  static I dot(I acc, I u, I x) { return _mm512_dpbusd_epi32(acc, u, x); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I madd16(I a, I b) { return _mm512_madd_epi16(a, b); }
  static I u8(const std::byte* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static I i8(const std::byte* p) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F halves(const std::byte* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F zerof() { return _mm512_setzero_ps(); }
  static F setf(float v) { return _mm512_set1_ps(v); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* y, F v, int nr) {
    _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << nr) - 1u), v);
  }
};
#else
struct V {
  using I = __m256i;
  using F = __m256;
  static constexpr int kRows = 8;
  static constexpr int kTileTokens = 4;
  static I load(const std::byte* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I bytes(int c) { return _mm256_set1_epi8(static_cast<char>(c)); }
  static I andv(I a, I b) { return _mm256_and_si256(a, b); }
  static I orv(I a, I b) { return _mm256_or_si256(a, b); }
  template <int N>
  static I srl16(I a) { return _mm256_srli_epi16(a, N); }
  template <int N>
  static I sll16(I a) { return _mm256_slli_epi16(a, N); }
  template <int N>
  static I srl32(I a) { return _mm256_srli_epi32(a, N); }
  template <int N>
  static I sll32(I a) { return _mm256_slli_epi32(a, N); }
  static I srlv32(I a, int n) { return _mm256_srlv_epi32(a, _mm256_set1_epi32(n)); }
  static I zero() { return _mm256_setzero_si256(); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I bcast(const int8_t* p) { return _mm256_set1_epi32(load32(p)); }
  // acc += the 4-byte dot products of u (unsigned, <= 63 here) and x (signed), per 32-bit lane.
  static I dot(I acc, I u, I x) {
#if CS_ISA_LEVEL >= 2
    return _mm256_dpbusd_avx_epi32(acc, u, x);
#else
    return _mm256_add_epi32(acc,
                            _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
  }
  static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  static I madd16(I a, I b) { return _mm256_madd_epi16(a, b); }
  static I u8(const std::byte* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static I i8(const std::byte* p) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static F halves(const std::byte* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static F zerof() { return _mm256_setzero_ps(); }
  static F setf(float v) { return _mm256_set1_ps(v); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* y, F v, int nr) {
    if (nr >= 8) {
      _mm256_storeu_ps(y, v);
    } else {
      float tmp[8];
      _mm256_storeu_ps(tmp, v);
      std::copy(tmp, tmp + nr, y);
    }
  }
};
#endif

// Bits [From, From + W) of every byte of v moved to [To, To + W), the rest cleared. A 16-bit
// shift by |From - To| moves no bit of that range across a byte boundary, so it is exact.
template <int From, int To, int W>
inline V::I bitsTo(V::I v) {
  V::I s = v;
  if constexpr (From > To) s = V::srl16<From - To>(v);
  if constexpr (From < To) s = V::sll16<To - From>(v);
  return V::andv(s, V::bytes(((1 << W) - 1) << To));
}

// Ia and Ib (or, for types without halves, two partial sums of I) of T tokens for one data
// block; blk points at this vector's rows of the block, x at token 0's 32 int8 values.
template <WeightType WT, int T>
inline void blockDot(const std::byte* blk, const int8_t* x, int64_t cols, V::I (&ia)[T],
                     V::I (&ib)[T]) {
  constexpr PackedData D = PackedLayout<WT>::kData;
  // note: with few tokens, two integer accumulators per token halve the dependent vpdpbusd chain
  // (with many, the tokens' chains already overlap and the registers are better spent); integer
  // sums are exact, so the split changes no bit.
  constexpr bool kSplit = kHalves<WT> || T <= 2;
  // The operand of elements 4e..4e+3 (e 0..7).
  const auto feed = [&](auto ec, V::I op) {
    constexpr int e = decltype(ec)::value;
    for (int t = 0; t < T; ++t) {
      V::I& a = (kSplit && e >= 4) ? ib[t] : ia[t];
      a = V::dot(a, op, V::bcast(x + t * cols + 4 * e));
    }
  };
  const V::I nib = V::bytes(0x0F);
  if constexpr (D == PackedData::Bytes) {
#if CS_ISA_LEVEL == 1
    // note: (q + 128) * x would overflow vpmaddubsw's int16 pairs; multiply |q| by x with q's
    // sign instead (|q| <= 128, |x| <= 127), which gives sum(q * x) with no offset.
    staticFor<8>([&](auto j) {
      const V::I w = _mm256_xor_si256(V::load(blk + 64 * j), V::bytes(0x80));
      const V::I aw = _mm256_abs_epi8(w);
      for (int t = 0; t < T; ++t) {
        V::I& a = (kSplit && j >= 4) ? ib[t] : ia[t];
        const V::I xs = _mm256_sign_epi8(V::bcast(x + t * cols + 4 * j), w);
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), _mm256_set1_epi16(1)));
      }
    });
#else
    staticFor<8>([&](auto j) { feed(j, V::load(blk + 64 * j)); });
#endif
  } else if constexpr (D == PackedData::TwoBit || D == PackedData::TwoBit3) {
    [[maybe_unused]] V::I h{};
    if constexpr (D == PackedData::TwoBit3) h = V::load(blk + 128);
    staticFor<2>([&](auto p) {
      const V::I l = V::load(blk + 64 * p);
      staticFor<4>([&](auto s) {
        constexpr int e = 4 * decltype(p)::value + decltype(s)::value;
        V::I op = bitsTo<2 * s, 0, 2>(l);
        if constexpr (D == PackedData::TwoBit3) op = V::orv(op, bitsTo<e, 2, 1>(h));
        feed(std::integral_constant<int, e>{}, op);
      });
    });
  } else {
    [[maybe_unused]] V::I h0{}, h1{};
    if constexpr (D == PackedData::Nibbles5) h0 = V::load(blk + 256);
    if constexpr (D == PackedData::Nibbles6) {
      h0 = V::load(blk + 256);
      h1 = V::load(blk + 320);
    }
    staticFor<4>([&](auto j) {
      const V::I v = V::load(blk + 64 * j);
      V::I lo = V::andv(v, nib);
      V::I hi = V::andv(V::srl16<4>(v), nib);
      if constexpr (D == PackedData::Nibbles5) {
        lo = V::orv(lo, bitsTo<j, 4, 1>(h0));
        hi = V::orv(hi, bitsTo<4 + j, 4, 1>(h0));
      } else if constexpr (D == PackedData::Nibbles6) {
        lo = V::orv(lo, bitsTo<2 * j, 4, 2>(h0));
        hi = V::orv(hi, bitsTo<2 * j, 4, 2>(h1));
      }
      feed(j, lo);
      feed(std::integral_constant<int, 4 + j>{}, hi);
    });
  }
}

// The per-row scales of block s of a cell, for this vector's rows (rowOff: its first row in the
// group).
struct BlockScales {
  V::F d, m;          // see prepare()
  V::I sca, scb, mp;  // the two 16-column sub-blocks' scales; Q2_K's mins as int16 pairs
};

template <WeightType WT>
inline BlockScales prepare(const std::byte* cell, int rowOff, int s) {
  using L = PackedLayout<WT>;
  BlockScales r{};
  r.d = V::halves(cell + L::kD + 2 * rowOff);
  if constexpr (WT == WeightType::Q4_1 || WT == WeightType::Q5_1) {
    r.m = V::halves(cell + L::kM + 2 * rowOff);
  } else if constexpr (WT == WeightType::Q4_K || WT == WeightType::Q5_K) {
    // d becomes S = d * sc and m becomes N = (-dmin) * m (quant.h), both exact.
    const auto B = [&](int p) { return V::u8(cell + L::kScales + 16 * p + rowOff); };
    const V::I six = V::set1(63), four = V::set1(15);
    V::I sc, mn;
    if (s < 4) {
      sc = V::andv(B(s), six);
      mn = V::andv(B(s + 4), six);
    } else {
      const V::I hi = B(s + 4);
      sc = V::orv(V::andv(hi, four), V::sll32<4>(V::srl32<6>(B(s - 4))));
      mn = V::orv(V::srl32<4>(hi), V::sll32<4>(V::srl32<6>(B(s))));
    }
    r.d = V::mul(r.d, V::cvt(sc));
    r.m = V::mul(V::halves(cell + L::kNegDmin + 2 * rowOff), V::cvt(mn));
  } else if constexpr (WT == WeightType::Q6_K) {
    r.sca = V::i8(cell + L::kScales + 16 * (2 * s) + rowOff);
    r.scb = V::i8(cell + L::kScales + 16 * (2 * s + 1) + rowOff);
  } else if constexpr (WT == WeightType::Q3_K) {
    const auto scale = [&](int q) {
      const V::I lo = V::andv(V::srlv32(V::u8(cell + L::kScales + 16 * (q % 8) + rowOff), 4 * (q / 8)),
                              V::set1(15));
      const V::I hi = V::andv(V::srlv32(V::u8(cell + L::kScales + 16 * (8 + q % 4) + rowOff), 2 * (q / 4)),
                              V::set1(3));
      return V::sub(V::orv(lo, V::sll32<4>(hi)), V::set1(32));
    };
    r.sca = scale(2 * s);
    r.scb = scale(2 * s + 1);
  } else if constexpr (WT == WeightType::Q2_K) {
    const V::I a = V::u8(cell + L::kScales + 16 * (2 * s) + rowOff);
    const V::I b = V::u8(cell + L::kScales + 16 * (2 * s + 1) + rowOff);
    r.sca = V::andv(a, V::set1(15));
    r.scb = V::andv(b, V::set1(15));
    r.mp = V::orv(V::srl32<4>(a), V::sll32<16>(V::srl32<4>(b)));  // m_a | m_b << 16
    r.m = V::halves(cell + L::kNegDmin + 2 * rowOff);
  }
  return r;
}

// acc after one block for token block xi, from its Ia and Ib (quant.h's numerics).
template <WeightType WT>
inline void finish(const BlockScales& r, const QuantizedActivations& X, int64_t xi, V::I ia,
                   V::I ib, V::F& acc) {
  const V::F dx = V::setf(X.d[xi]);
  if constexpr (WT == WeightType::Q4_0 || WT == WeightType::Q5_0 || WT == WeightType::Q8_0) {
    // note: Q8_0 on plain AVX2 already has sum(q * x) (blockDot), no offset to take off.
    constexpr int32_t off = WT == WeightType::Q8_0 && CS_ISA_LEVEL == 1 ? 0 : kOff<WT>;
    V::I I = V::add(ia, ib);
    if constexpr (off != 0) I = V::sub(I, V::set1(off * X.sum[xi]));
    acc = V::fma(V::mul(r.d, dx), V::cvt(I), acc);
  } else if constexpr (WT == WeightType::Q4_1 || WT == WeightType::Q5_1 ||
                       WT == WeightType::Q4_K || WT == WeightType::Q5_K) {
    acc = V::fma(V::mul(r.d, dx), V::cvt(V::add(ia, ib)), acc);
    acc = V::fma(r.m, V::setf(X.dsum[xi]), acc);
  } else if constexpr (WT == WeightType::Q6_K || WT == WeightType::Q3_K) {
    const int32_t sa = X.sumLo[xi], sb = X.sum[xi] - sa;
    const V::I J = V::add(V::mullo(r.sca, V::sub(ia, V::set1(kOff<WT> * sa))),
                          V::mullo(r.scb, V::sub(ib, V::set1(kOff<WT> * sb))));
    acc = V::fma(V::mul(r.d, dx), V::cvt(J), acc);
  } else {
    static_assert(WT == WeightType::Q2_K);
    const int32_t sa = X.sumLo[xi], sb = X.sum[xi] - sa;
    const auto pair = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(sa)) |
                                           static_cast<uint32_t>(static_cast<uint16_t>(sb)) << 16);
    const V::I J = V::add(V::mullo(r.sca, ia), V::mullo(r.scb, ib));
    const V::I M = V::madd16(r.mp, V::set1(pair));
    acc = V::fma(V::mul(r.d, dx), V::cvt(J), acc);
    acc = V::fma(V::mul(r.m, dx), V::cvt(M), acc);
  }
}

template <WeightType WT, int T>
void tile(const std::byte* gp, int64_t nCells, const QuantizedActivations& X, int64_t t0,
          int rowOff, float* y, int64_t yStride, int nr) {
  using L = PackedLayout<WT>;
  const int64_t cols = X.cols, nb = X.blocksPerRow();
  V::F acc[T];
  for (int t = 0; t < T; ++t) acc[t] = V::zerof();
  for (int64_t c = 0; c < nCells; ++c) {
    const std::byte* cell = gp + static_cast<size_t>(c) * kPackedCellBytes<WT>;
    for (int s = 0; s < kBlocksPerCell<WT>; ++s) {
      const int64_t b = c * kBlocksPerCell<WT> + s;
      const BlockScales r = prepare<WT>(cell, rowOff, s);
      V::I ia[T], ib[T];
      for (int t = 0; t < T; ++t) ia[t] = ib[t] = V::zero();
      blockDot<WT, T>(cell + L::kHeader + s * kPackedBlockBytes<WT> + 4 * rowOff,
                      X.q.data() + t0 * cols + b * kQuantBlock, cols, ia, ib);
      for (int t = 0; t < T; ++t) finish<WT>(r, X, (t0 + t) * nb + b, ia[t], ib[t], acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) V::store(y + t * yStride, acc[t], nr);
}

// Tokens per tile: Q2_K and Q3_K, which keep Ia and Ib apart and have more per-row values to
// hold, use half as many (measured: with the full tile they spill registers).
template <WeightType WT>
constexpr int kTile =
    WT == WeightType::Q2_K || WT == WeightType::Q3_K ? V::kTileTokens / 2 : V::kTileTokens;

template <WeightType WT, int T>
void tileRest(const std::byte* gp, int64_t nCells, const QuantizedActivations& X, int64_t t0,
              int64_t n, int rowOff, float* y, int64_t yStride, int nr) {
  if constexpr (T > 0) {
    if (n == T) return tile<WT, T>(gp, nCells, X, t0, rowOff, y, yStride, nr);
    return tileRest<WT, T - 1>(gp, nCells, X, t0, n, rowOff, y, yStride, nr);
  }
}

template <WeightType WT>
void groupsSimd(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0,
                int64_t g1) {
  const int64_t nCells = W.cellsPerRow();
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t rowsLeft = W.rows() - g * kPackRows;
    for (int rowOff = 0; rowOff < kPackRows; rowOff += V::kRows) {
      const int nr = static_cast<int>(std::min<int64_t>(V::kRows, rowsLeft - rowOff));
      if (nr <= 0) break;
      float* y = Y + g * kPackRows + rowOff;
      int64_t t = 0;
      for (; t + kTile<WT> <= X.rows; t += kTile<WT>) {
        tile<WT, kTile<WT>>(W.group(g), nCells, X, t, rowOff, y + t * W.rows(), W.rows(), nr);
      }
      if (t < X.rows) {
        tileRest<WT, kTile<WT> - 1>(W.group(g), nCells, X, t, X.rows - t, rowOff,
                                    y + t * W.rows(), W.rows(), nr);
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
                        out.d[i], out.sum[i], out.dsum[i], out.sumLo[i]);
#else
      quantizeBlockScalar(X + t * cols + b * kQuantBlock, out.q.data() + t * cols + b * kQuantBlock,
                          out.d[i], out.sum[i], out.dsum[i], out.sumLo[i]);
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
    case WeightType::Q5_0: return groups<WeightType::Q5_0>(W, X, Y, g0, g1);
    case WeightType::Q5_1: return groups<WeightType::Q5_1>(W, X, Y, g0, g1);
    case WeightType::Q2_K: return groups<WeightType::Q2_K>(W, X, Y, g0, g1);
    case WeightType::Q3_K: return groups<WeightType::Q3_K>(W, X, Y, g0, g1);
    case WeightType::Q4_K: return groups<WeightType::Q4_K>(W, X, Y, g0, g1);
    case WeightType::Q5_K: return groups<WeightType::Q5_K>(W, X, Y, g0, g1);
    case WeightType::Q6_K: return groups<WeightType::Q6_K>(W, X, Y, g0, g1);
    default: return;
  }
}

}  // namespace cortex::kernels::detail::CS_ISA_NS
