// Test-only: random weight matrices in the stored layouts, and their rows decoded by hand.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "common/half.h"
#include "kernels/weights.h"
#include "reference.h"

namespace cortex::kernels::testref {

// The test shapes' column counts, made valid for `type`: K-quants need multiples of 256.
inline int64_t colsFor(WeightType type, int64_t cols) {
  const int64_t m = blockElems(type);
  return m > 32 ? (cols + m - 1) / m * m : cols;
}

// Byte offsets of the fp16 fields of a block: d, and m or dmin (-1: none).
struct HalfFields {
  int d, m;
};
inline HalfFields halfFields(WeightType type) {
  switch (type) {
    case WeightType::Q4_1:
    case WeightType::Q5_1:
    case WeightType::Q4_K:
    case WeightType::Q5_K: return {0, 2};
    case WeightType::Q2_K: return {80, 82};
    case WeightType::Q3_K: return {108, -1};
    case WeightType::Q6_K: return {208, -1};
    default: return {0, -1};
  }
}

// Random bytes in the documented layout of `type` (rows x cols).
inline std::vector<uint8_t> randomWeights(WeightType type, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> val(-1, 1), scale(0.002f, 0.06f), sign(-1, 1);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> out;
  const auto put16 = [&](uint16_t v) {
    out.push_back(static_cast<uint8_t>(v & 0xff));
    out.push_back(static_cast<uint8_t>(v >> 8));
  };
  const auto randScale = [&] { return floatToHalf(scale(rng) * (sign(rng) < 0 ? -1.f : 1.f)); };
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      switch (type) {
        case WeightType::F32: {
          const float f = val(rng);
          uint8_t b[4];
          std::memcpy(b, &f, 4);
          out.insert(out.end(), b, b + 4);
          break;
        }
        case WeightType::F16: put16(floatToHalf(val(rng))); break;
        case WeightType::BF16: put16(floatToBf16(val(rng))); break;
        case WeightType::Q5_0:
        case WeightType::Q5_1:
        case WeightType::Q2_K:
        case WeightType::Q3_K:
        case WeightType::Q4_K:
        case WeightType::Q5_K:
        case WeightType::Q6_K: {
          // Random bytes, then sane fp16 scales (d of either sign, m or dmin as ggml makes them).
          const auto bb = blockBytes(type);
          if (c % blockElems(type) != 0) break;
          const size_t at = out.size();
          for (size_t i = 0; i < bb; ++i) out.push_back(static_cast<uint8_t>(byte(rng)));
          const HalfFields f = halfFields(type);
          const uint16_t d = randScale();
          out[at + f.d] = static_cast<uint8_t>(d & 0xff);
          out[at + f.d + 1] = static_cast<uint8_t>(d >> 8);
          if (f.m >= 0) {
            const float mv = type == WeightType::Q5_1 ? -0.3f * std::abs(val(rng))
                                                      : scale(rng) * 0.5f;  // dmin >= 0
            const uint16_t m = floatToHalf(mv);
            out[at + f.m] = static_cast<uint8_t>(m & 0xff);
            out[at + f.m + 1] = static_cast<uint8_t>(m >> 8);
          }
          break;
        }
        default:
          if (c % 32 != 0) break;
          put16(randScale());
          if (type == WeightType::Q4_1) put16(floatToHalf(-0.3f * std::abs(val(rng))));
          for (int i = 0; i < (type == WeightType::Q8_0 ? 32 : 16); ++i) {
            out.push_back(static_cast<uint8_t>(byte(rng)));
          }
      }
    }
  }
  return out;
}

// Element e (0..255) of a K-quant super-block in double, decoded by hand from the layout
// (weights.h).
inline double refKQuant(WeightType type, const uint8_t* blk, int e) {
  const int h = e / 128, s = (e % 128) / 32, l = e % 32, sub16 = e / 16, sub32 = e / 32;
  // Q4_K/Q5_K: the 6-bit scale and min of sub-block j from the 12 bytes at sb.
  const auto scaleMin = [](const uint8_t* sb, int j, int& sc, int& m) {
    if (j < 4) {
      sc = sb[j] % 64;
      m = sb[j + 4] % 64;
    } else {
      sc = sb[j + 4] % 16 + 16 * (sb[j - 4] / 64);
      m = sb[j + 4] / 16 + 16 * (sb[j] / 64);
    }
  };
  switch (type) {
    case WeightType::Q2_K: {
      const int q = (blk[16 + 32 * h + l] >> (2 * s)) % 4;
      return f16(u16(blk + 80)) * (blk[sub16] % 16) * q - f16(u16(blk + 82)) * (blk[sub16] / 16);
    }
    case WeightType::Q3_K: {
      const int lo = (blk[96 + sub16 % 8] >> (4 * (sub16 / 8))) % 16;
      const int hi = (blk[104 + sub16 % 4] >> (2 * (sub16 / 4))) % 4;
      const int q = (blk[32 + 32 * h + l] >> (2 * s)) % 4 - (((blk[l] >> (4 * h + s)) & 1) ? 0 : 4);
      return f16(u16(blk + 108)) * (lo + 16 * hi - 32) * q;
    }
    case WeightType::Q4_K:
    case WeightType::Q5_K: {
      const bool five = type == WeightType::Q5_K;
      int sc, m;
      scaleMin(blk + 4, sub32, sc, m);
      int q = (blk[(five ? 48 : 16) + 32 * (e / 64) + l] >> (4 * (sub32 % 2))) % 16;
      if (five) q += 16 * ((blk[16 + l] >> sub32) & 1);
      return f16(u16(blk)) * sc * q - f16(u16(blk + 2)) * m;
    }
    case WeightType::Q6_K: {
      const int lo = (blk[64 * h + 32 * (s % 2) + l] >> (4 * (s / 2))) % 16;
      const int hi = (blk[128 + 32 * h + l] >> (2 * s)) % 4;
      return f16(u16(blk + 208)) * static_cast<int8_t>(blk[192 + sub16]) * (lo + 16 * hi - 32);
    }
    default: return NAN;
  }
}

// Row r of the matrix in double, decoded by hand from the layout.
inline std::vector<double> refRow(WeightType type, const uint8_t* data, int64_t cols, int64_t r) {
  std::vector<double> w(static_cast<size_t>(cols));
  const size_t rb = rowBytes(type, cols);
  const uint8_t* p = data + static_cast<size_t>(r) * rb;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t b = c / 32, j = c % 32;  // 32-element blocks (the K-quants index their own)
    switch (type) {
      case WeightType::F32: {
        float f;
        std::memcpy(&f, p + 4 * c, 4);
        w[c] = f;
        break;
      }
      case WeightType::F16: w[c] = f16(u16(p + 2 * c)); break;
      case WeightType::BF16: w[c] = testref::bf16(u16(p + 2 * c)); break;
      case WeightType::Q8_0: {
        const uint8_t* blk = p + 34 * b;
        w[c] = f16(u16(blk)) * static_cast<int8_t>(blk[2 + j]);
        break;
      }
      case WeightType::Q4_0: {
        const uint8_t* blk = p + 18 * b;
        const int q = j < 16 ? (blk[2 + j] & 0x0F) : (blk[2 + j - 16] >> 4);
        w[c] = f16(u16(blk)) * (q - 8);
        break;
      }
      case WeightType::Q4_1: {
        const uint8_t* blk = p + 20 * b;
        const int q = j < 16 ? (blk[4 + j] & 0x0F) : (blk[4 + j - 16] >> 4);
        w[c] = f16(u16(blk)) * q + f16(u16(blk + 2));
        break;
      }
      case WeightType::Q5_0:
      case WeightType::Q5_1: {
        const bool hasMin = type == WeightType::Q5_1;
        const uint8_t* blk = p + (hasMin ? 24 : 22) * b;
        const uint8_t* qh = blk + (hasMin ? 4 : 2);
        const uint8_t* qs = qh + 4;
        const int nib = j < 16 ? (qs[j] & 0x0F) : (qs[j - 16] >> 4);
        const int q = nib + 16 * ((qh[j / 8] >> (j % 8)) & 1);
        w[c] = hasMin ? f16(u16(blk)) * q + f16(u16(blk + 2)) : f16(u16(blk)) * (q - 16);
        break;
      }
      default: w[c] = refKQuant(type, p + rowBytes(type, 256) * (c / 256), static_cast<int>(c % 256));
    }
  }
  return w;
}

}  // namespace cortex::kernels::testref
