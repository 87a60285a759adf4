// Internal to the kernels: the 5-bit and K-quant block layouts of weights.h. First their integer
// fields unpacked in plain scalar code (the repacking for the integer path, quant.cpp, builds on
// these), then the float decoders of these types in the form of simd.h (scalar and AVX2, giving
// the canonical floats of weights.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/simd.h"

namespace cortex::kernels::detail {
inline namespace CS_SIMD_CAT(blocks_, CS_ISA_NS) {

inline uint8_t byteAt(const std::byte* p, int i) { return static_cast<uint8_t>(p[i]); }

// Byte offsets of the fields of each block (the fp16 scales are read with loadU16).
struct Q5_0Block { static constexpr int kD = 0, kQh = 2, kQs = 6; };
struct Q5_1Block { static constexpr int kD = 0, kM = 2, kQh = 4, kQs = 8; };
struct Q2_KBlock { static constexpr int kScales = 0, kQs = 16, kD = 80, kDmin = 82; };
struct Q3_KBlock { static constexpr int kHmask = 0, kQs = 32, kScales = 96, kD = 108; };
struct Q4_KBlock { static constexpr int kD = 0, kDmin = 2, kScales = 4, kQs = 16; };
struct Q5_KBlock { static constexpr int kD = 0, kDmin = 2, kScales = 4, kQh = 16, kQs = 48; };
struct Q6_KBlock { static constexpr int kQl = 0, kQh = 128, kScales = 192, kD = 208; };

// Q5_0/Q5_1: the 32 unsigned 5-bit values (0..31) of a block from its qh word and nibbles.
inline void unpackQ5(const std::byte* qhp, const std::byte* qs, uint8_t* q) {
  uint32_t qh;
  std::memcpy(&qh, qhp, 4);
  for (int j = 0; j < 16; ++j) {
    const uint8_t b = byteAt(qs, j);
    q[j] = static_cast<uint8_t>((b & 0x0F) | ((qh >> j) & 1u) << 4);
    q[j + 16] = static_cast<uint8_t>((b >> 4) | ((qh >> (j + 16)) & 1u) << 4);
  }
}

// Q4_K/Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 scale bytes.
inline void scaleMinK(const std::byte* s, int j, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = byteAt(s, j) & 63;
    m = byteAt(s, j + 4) & 63;
  } else {
    sc = static_cast<uint8_t>((byteAt(s, j + 4) & 0x0F) | (byteAt(s, j - 4) >> 6) << 4);
    m = static_cast<uint8_t>((byteAt(s, j + 4) >> 4) | (byteAt(s, j) >> 6) << 4);
  }
}

// Q2_K: q (0..3) of the 256 elements, and sc, m (0..15) of the 16 sub-blocks.
inline void unpackQ2K(const std::byte* b, uint8_t* q, uint8_t* sc, uint8_t* m) {
  for (int i = 0; i < 16; ++i) {
    sc[i] = byteAt(b, Q2_KBlock::kScales + i) & 0x0F;
    m[i] = byteAt(b, Q2_KBlock::kScales + i) >> 4;
  }
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      for (int l = 0; l < 32; ++l) {
        q[128 * h + 32 * s + l] =
            static_cast<uint8_t>((byteAt(b, Q2_KBlock::kQs + 32 * h + l) >> (2 * s)) & 3);
      }
    }
  }
}

// Q3_K: the signed scales (-32..31) of the 16 sub-blocks; unpackQ3K adds u = q + 4 (0..7) of the
// 256 elements.
inline int8_t scaleQ3K(const std::byte* s, int i) {
  const int lo = (byteAt(s, i % 8) >> (4 * (i / 8))) & 0x0F;
  const int hi = (byteAt(s, 8 + i % 4) >> (2 * (i / 4))) & 3;
  return static_cast<int8_t>((lo | hi << 4) - 32);
}
inline void scalesQ3K(const std::byte* b, int8_t* sc) {
  for (int i = 0; i < 16; ++i) sc[i] = scaleQ3K(b + Q3_KBlock::kScales, i);
}
inline void unpackQ3K(const std::byte* b, uint8_t* u, int8_t* sc) {
  scalesQ3K(b, sc);
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      for (int l = 0; l < 32; ++l) {
        const int low = (byteAt(b, Q3_KBlock::kQs + 32 * h + l) >> (2 * s)) & 3;
        const int hbit = (byteAt(b, Q3_KBlock::kHmask + l) >> (4 * h + s)) & 1;
        u[128 * h + 32 * s + l] = static_cast<uint8_t>(low + 4 * hbit);
      }
    }
  }
}

// Q4_K: q (0..15) of the 256 elements, and sc, m (0..63) of the 8 sub-blocks.
inline void unpackQ4K(const std::byte* b, uint8_t* q, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 8; ++j) scaleMinK(b + Q4_KBlock::kScales, j, sc[j], m[j]);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t v = byteAt(b, Q4_KBlock::kQs + 32 * c + l);
      q[64 * c + l] = v & 0x0F;
      q[64 * c + 32 + l] = v >> 4;
    }
  }
}

// Q5_K: q (0..31) of the 256 elements, and sc, m (0..63) of the 8 sub-blocks.
inline void unpackQ5K(const std::byte* b, uint8_t* q, uint8_t* sc, uint8_t* m) {
  for (int j = 0; j < 8; ++j) scaleMinK(b + Q5_KBlock::kScales, j, sc[j], m[j]);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t v = byteAt(b, Q5_KBlock::kQs + 32 * c + l);
      const uint8_t h = byteAt(b, Q5_KBlock::kQh + l);
      q[64 * c + l] = static_cast<uint8_t>((v & 0x0F) | ((h >> (2 * c)) & 1) << 4);
      q[64 * c + 32 + l] = static_cast<uint8_t>((v >> 4) | ((h >> (2 * c + 1)) & 1) << 4);
    }
  }
}

// Q6_K: q (0..63, the value is q - 32) of the 256 elements, and the 16 int8 scales.
inline void unpackQ6K(const std::byte* b, uint8_t* q, int8_t* sc) {
  for (int i = 0; i < 16; ++i) sc[i] = static_cast<int8_t>(byteAt(b, Q6_KBlock::kScales + i));
  for (int h = 0; h < 2; ++h) {
    for (int s = 0; s < 4; ++s) {
      for (int l = 0; l < 32; ++l) {
        const int lo = (byteAt(b, Q6_KBlock::kQl + 64 * h + 32 * (s % 2) + l) >> (4 * (s / 2))) & 0x0F;
        const int hi = (byteAt(b, Q6_KBlock::kQh + 32 * h + l) >> (2 * s)) & 3;
        q[128 * h + 32 * s + l] = static_cast<uint8_t>(lo | hi << 4);
      }
    }
  }
}


// --- float decoders (the interface of simd.h's DecQ4_0 and friends) ---

#if CS_KERNELS_AVX2
// 8 bytes at p widened to 8 int32 lanes.
inline __m256i loadU8x8(const std::byte* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i bitsAt(__m256i v, int shift, int mask) {
  return _mm256_and_si256(_mm256_srli_epi32(v, shift), _mm256_set1_epi32(mask));
}
#endif

template <bool kHasMin>
struct DecQ5 {
  using B = std::conditional_t<kHasMin, Q5_1Block, Q5_0Block>;
  static constexpr int kElems = 32;
  static constexpr size_t kBytes = kHasMin ? 24 : 22;
  static void scalar(const std::byte* b, float* w) {
    const float d = halfToFloat(loadU16(b + B::kD));
    uint8_t q[32];
    unpackQ5(b + B::kQh, b + B::kQs, q);
    for (int i = 0; i < 32; ++i) {
      if constexpr (kHasMin) {
        w[i] = std::fma(d, static_cast<float>(q[i]), halfToFloat(loadU16(b + Q5_1Block::kM)));
      } else {
        w[i] = d * static_cast<float>(q[i] - 16);
      }
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(loadU16(b + B::kD)));
    uint32_t qh;
    std::memcpy(&qh, b + B::kQh, 4);
    const __m256i e0 = loadU8x8(b + B::kQs), e1 = loadU8x8(b + B::kQs + 8);
    const __m256i nib[4] = {bitsAt(e0, 0, 0x0F), bitsAt(e1, 0, 0x0F), bitsAt(e0, 4, 0x0F),
                            bitsAt(e1, 4, 0x0F)};
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i qhv = _mm256_set1_epi32(static_cast<int>(qh));
    for (int k = 0; k < 4; ++k) {
      // note: bit e of qh is bit 4 of element e; lanes of vector k are elements 8k..8k+7.
      const __m256i hb = _mm256_and_si256(
          _mm256_srlv_epi32(qhv, _mm256_add_epi32(lane, _mm256_set1_epi32(8 * k))),
          _mm256_set1_epi32(1));
      const __m256i q = _mm256_or_si256(nib[k], _mm256_slli_epi32(hb, 4));
      if constexpr (kHasMin) {
        const __m256 m = _mm256_set1_ps(_cvtsh_ss(loadU16(b + Q5_1Block::kM)));
        w[k] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), m);
      } else {
        w[k] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, _mm256_set1_epi32(16))));
      }
    }
  }
#endif
};
using DecQ5_0 = DecQ5<false>;
using DecQ5_1 = DecQ5<true>;

struct DecQ2_K {
  static constexpr int kElems = 256;
  static constexpr size_t kBytes = 84;
  static void scalar(const std::byte* b, float* w) {
    uint8_t q[256], sc[16], m[16];
    unpackQ2K(b, q, sc, m);
    const float d = halfToFloat(loadU16(b + Q2_KBlock::kD));
    const float dmin = halfToFloat(loadU16(b + Q2_KBlock::kDmin));
    for (int e = 0; e < 256; ++e) {
      const int i = e / 16;
      w[e] = std::fma(d * static_cast<float>(sc[i]), static_cast<float>(q[e]),
                      -(dmin * static_cast<float>(m[i])));
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    const float d = _cvtsh_ss(loadU16(b + Q2_KBlock::kD));
    const float dmin = _cvtsh_ss(loadU16(b + Q2_KBlock::kDmin));
    for (int h = 0; h < 2; ++h) {
      for (int v = 0; v < 4; ++v) {
        const __m256i bytes = loadU8x8(b + Q2_KBlock::kQs + 32 * h + 8 * v);
        for (int s = 0; s < 4; ++s) {
          const int i = 8 * h + 2 * s + v / 2;
          const int sm = byteAt(b, Q2_KBlock::kScales + i);
          const __m256 ds = _mm256_set1_ps(d * static_cast<float>(sm & 0x0F));
          const __m256 dm = _mm256_set1_ps(-(dmin * static_cast<float>(sm >> 4)));
          w[16 * h + 4 * s + v] =
              _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(bitsAt(bytes, 2 * s, 3)), dm);
        }
      }
    }
  }
#endif
};

struct DecQ3_K {
  static constexpr int kElems = 256;
  static constexpr size_t kBytes = 110;
  static void scalar(const std::byte* b, float* w) {
    uint8_t u[256];
    int8_t sc[16];
    unpackQ3K(b, u, sc);
    const float d = halfToFloat(loadU16(b + Q3_KBlock::kD));
    for (int e = 0; e < 256; ++e) {
      w[e] = (d * static_cast<float>(sc[e / 16])) * static_cast<float>(u[e] - 4);
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    int8_t sc[16];
    scalesQ3K(b, sc);
    const float d = _cvtsh_ss(loadU16(b + Q3_KBlock::kD));
    const __m256i four = _mm256_set1_epi32(4);
    for (int v = 0; v < 4; ++v) {
      const __m256i hm = loadU8x8(b + Q3_KBlock::kHmask + 8 * v);
      for (int h = 0; h < 2; ++h) {
        const __m256i bytes = loadU8x8(b + Q3_KBlock::kQs + 32 * h + 8 * v);
        for (int s = 0; s < 4; ++s) {
          const __m256i hb = _mm256_slli_epi32(bitsAt(hm, 4 * h + s, 1), 2);
          const __m256i q = _mm256_sub_epi32(_mm256_or_si256(bitsAt(bytes, 2 * s, 3), hb), four);
          const __m256 ds = _mm256_set1_ps(d * static_cast<float>(sc[8 * h + 2 * s + v / 2]));
          w[16 * h + 4 * s + v] = _mm256_mul_ps(ds, _mm256_cvtepi32_ps(q));
        }
      }
    }
  }
#endif
};

// Q4_K and Q5_K (kFive: the 5-bit one).
template <bool kFive>
struct DecQ45_K {
  using B = std::conditional_t<kFive, Q5_KBlock, Q4_KBlock>;
  static constexpr int kElems = 256;
  static constexpr size_t kBytes = kFive ? 176 : 144;
  static void scalar(const std::byte* b, float* w) {
    uint8_t q[256], sc[8], m[8];
    if constexpr (kFive) {
      unpackQ5K(b, q, sc, m);
    } else {
      unpackQ4K(b, q, sc, m);
    }
    const float d = halfToFloat(loadU16(b + B::kD));
    const float dmin = halfToFloat(loadU16(b + B::kDmin));
    for (int e = 0; e < 256; ++e) {
      const int j = e / 32;
      w[e] = std::fma(d * static_cast<float>(sc[j]), static_cast<float>(q[e]),
                      -(dmin * static_cast<float>(m[j])));
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    const float d = _cvtsh_ss(loadU16(b + B::kD));
    const float dmin = _cvtsh_ss(loadU16(b + B::kDmin));
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, m;
      scaleMinK(b + B::kScales, j, sc, m);
      const __m256 ds = _mm256_set1_ps(d * static_cast<float>(sc));
      const __m256 dm = _mm256_set1_ps(-(dmin * static_cast<float>(m)));
      for (int v = 0; v < 4; ++v) {
        __m256i q = bitsAt(loadU8x8(b + B::kQs + 32 * (j / 2) + 8 * v), 4 * (j % 2), 0x0F);
        if constexpr (kFive) {
          const __m256i hb = bitsAt(loadU8x8(b + Q5_KBlock::kQh + 8 * v), j, 1);
          q = _mm256_or_si256(q, _mm256_slli_epi32(hb, 4));
        }
        w[4 * j + v] = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(q), dm);
      }
    }
  }
#endif
};
using DecQ4_K = DecQ45_K<false>;
using DecQ5_K = DecQ45_K<true>;

struct DecQ6_K {
  static constexpr int kElems = 256;
  static constexpr size_t kBytes = 210;
  static void scalar(const std::byte* b, float* w) {
    uint8_t q[256];
    int8_t sc[16];
    unpackQ6K(b, q, sc);
    const float d = halfToFloat(loadU16(b + Q6_KBlock::kD));
    for (int e = 0; e < 256; ++e) {
      w[e] = (d * static_cast<float>(sc[e / 16])) * static_cast<float>(q[e] - 32);
    }
  }
#if CS_KERNELS_AVX2
  static void avx2(const std::byte* b, __m256* w) {
    const float d = _cvtsh_ss(loadU16(b + Q6_KBlock::kD));
    const __m256i off = _mm256_set1_epi32(32);
    for (int h = 0; h < 2; ++h) {
      for (int v = 0; v < 4; ++v) {
        const __m256i qh = loadU8x8(b + Q6_KBlock::kQh + 32 * h + 8 * v);
        const __m256i ql[2] = {loadU8x8(b + Q6_KBlock::kQl + 64 * h + 8 * v),
                               loadU8x8(b + Q6_KBlock::kQl + 64 * h + 32 + 8 * v)};
        for (int s = 0; s < 4; ++s) {
          const __m256i lo = bitsAt(ql[s % 2], 4 * (s / 2), 0x0F);
          const __m256i q = _mm256_or_si256(lo, _mm256_slli_epi32(bitsAt(qh, 2 * s, 3), 4));
          const auto sc = static_cast<int8_t>(byteAt(b, Q6_KBlock::kScales + 8 * h + 2 * s + v / 2));
          const __m256 ds = _mm256_set1_ps(d * static_cast<float>(sc));
          w[16 * h + 4 * s + v] = _mm256_mul_ps(ds, _mm256_cvtepi32_ps(_mm256_sub_epi32(q, off)));
        }
      }
    }
  }
#endif
};

}  // namespace CS_SIMD_CAT(blocks_, CS_ISA_NS)
}  // namespace cortex::kernels::detail
