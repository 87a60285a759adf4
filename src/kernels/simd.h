// Internal to the kernels: block decoders for each weight type (scalar and AVX2, producing the
// same canonical floats, see weights.h) and the fixed 8-lane reduction every kernel uses.
//
// The 8-lane convention: a dot product of length n (n a multiple of 8) keeps one 8-lane float
// accumulator, acc[l] = fma(a[8k+l], b[8k+l], acc[l]) for k = 0, 1, ... in order, then reduces
// the lanes with hsum8 below. The AVX2 and scalar paths follow it exactly, so they agree to the
// bit, and nothing in it depends on the batch.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "kernels/weights.h"

// CS_ISA_LEVEL is the instruction-set level this translation unit is compiled for (0 scalar,
// 1 AVX2, 2 AVX-VNNI, 3 AVX512-VNNI; see isa.h) and CS_ISA_NS the namespace of its code. The
// per-level kernel compilations set both; any other file gets the level its compiler flags allow,
// in a namespace of its own, so no inline function here is ever shared between levels.
#ifndef CS_ISA_LEVEL
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CS_ISA_LEVEL 1
#else
#define CS_ISA_LEVEL 0
#endif
#define CS_ISA_NS isa_default
#endif

#if CS_ISA_LEVEL >= 1
#if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "CS_ISA_LEVEL >= 1 needs -mavx2 -mfma -mf16c"
#endif
#include <immintrin.h>
#define CS_KERNELS_AVX2 1
#endif

#define CS_SIMD_CAT2(a, b) a##b
#define CS_SIMD_CAT(a, b) CS_SIMD_CAT2(a, b)

namespace cortex::kernels::detail {
inline namespace CS_SIMD_CAT(simd_, CS_ISA_NS) {

inline uint16_t loadU16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Fixed lane reduction: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)), the order the AVX2 code uses.
inline float hsum8(const float* l) {
  const float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
  const float b0 = a0 + a2, b1 = a1 + a3;
  return b0 + b1;
}

// One decoder per weight type. kElems elements per block (32 for quantized types, 8 for float
// types), kBytes bytes per block; scalar() writes kElems floats; avx2() writes kElems/8 vectors.
struct DecF32 {
  static constexpr int kElems = 8;
  static constexpr size_t kBytes = 32;
  static void scalar(const std::byte* b, float* w) { std::memcpy(w, b, 32); }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    w[0] = _mm256_loadu_ps(reinterpret_cast<const float*>(b));
  }
#endif
};

struct DecF16 {
  static constexpr int kElems = 8;
  static constexpr size_t kBytes = 16;
  static void scalar(const std::byte* b, float* w) {
    for (int i = 0; i < 8; ++i) w[i] = halfToFloat(loadU16(b + 2 * i));
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    w[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  }
#endif
};

struct DecBF16 {
  static constexpr int kElems = 8;
  static constexpr size_t kBytes = 16;
  static void scalar(const std::byte* b, float* w) {
    for (int i = 0; i < 8; ++i) w[i] = bf16ToFloat(loadU16(b + 2 * i));
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
#endif
};

struct DecQ8_0 {
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 34;
  static void scalar(const std::byte* b, float* w) {
    const float d = halfToFloat(loadU16(b));
    for (int i = 0; i < 32; ++i) {
      w[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(loadU16(b)));
    for (int k = 0; k < 4; ++k) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * k));
      w[k] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
  }
#endif
};

struct DecQ4_0 {
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 18;
  static void scalar(const std::byte* b, float* w) {
    const float d = halfToFloat(loadU16(b));
    for (int j = 0; j < 16; ++j) {
      const auto byte = static_cast<uint8_t>(b[2 + j]);
      w[j] = d * static_cast<float>((byte & 0x0F) - 8);
      w[j + 16] = d * static_cast<float>((byte >> 4) - 8);
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(loadU16(b)));
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m256i e0 =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2)));
    const __m256i e1 =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 10)));
    const __m256i q[4] = {_mm256_and_si256(e0, mask), _mm256_and_si256(e1, mask),
                          _mm256_srli_epi32(e0, 4), _mm256_srli_epi32(e1, 4)};
    for (int k = 0; k < 4; ++k) {
      w[k] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q[k], eight)));
    }
  }
#endif
};

struct DecQ4_1 {
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = 20;
  static void scalar(const std::byte* b, float* w) {
    const float d = halfToFloat(loadU16(b));
    const float m = halfToFloat(loadU16(b + 2));
    for (int j = 0; j < 16; ++j) {
      const auto byte = static_cast<uint8_t>(b[4 + j]);
      w[j] = std::fma(d, static_cast<float>(byte & 0x0F), m);
      w[j + 16] = std::fma(d, static_cast<float>(byte >> 4), m);
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    // note: one broadcast load of (d, m) and one conversion give d,m,d,m,...; dup splits them.
    int32_t dmBits;
    std::memcpy(&dmBits, b, 4);
    const __m256 dm = _mm256_cvtph_ps(_mm_set1_epi32(dmBits));
    const __m256 d = _mm256_moveldup_ps(dm);
    const __m256 m = _mm256_movehdup_ps(dm);
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i e0 =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 4)));
    const __m256i e1 =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 12)));
    w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(e0, mask)), m);
    w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(e1, mask)), m);
    w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(e0, 4)), m);
    w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_srli_epi32(e1, 4)), m);
  }
#endif
};

// exp(x) for softmax arguments x <= 0, in a form the AVX2 code repeats operation for operation
// (so both paths give the same bits): Cody-Waite reduction x = n ln2 + r, Cephes' degree-5
// polynomial, scaling by 2^n through the exponent bits. Within 2 ulp of exp for x in
// [-87, 0]; 0 below -87 (exp there is < 2^-125, irrelevant next to the max term's 1).
inline constexpr float kExpLn2Hi = 0.693359375f, kExpLn2Lo = -2.12194440e-4f;
inline constexpr float kExpP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                   4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
inline float expNonPositive(float x) {
  if (!(x >= -87.0f)) return 0.0f;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fma(n, -kExpLn2Hi, x);
  r = std::fma(n, -kExpLn2Lo, r);
  float p = kExpP[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kExpP[i]);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const auto bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scaleBits;
  std::memcpy(&scaleBits, &bits, 4);
  return y * scaleBits;
}

#if CS_KERNELS_AVX2
inline __m256 expNonPositive(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kExpLn2Hi), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kExpLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP[i]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

// hsum8 on a register, same order as the scalar version.
inline float hsum8(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // a0..a3
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));  // b0 = a0+a2, b1 = a1+a3
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
#endif

}  // namespace CS_SIMD_CAT(simd_, CS_ISA_NS)
}  // namespace cortex::kernels::detail
