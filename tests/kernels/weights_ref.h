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

// Row r of the matrix in double, decoded by hand from the layout.
inline std::vector<double> refRow(WeightType type, const uint8_t* data, int64_t cols, int64_t r) {
  std::vector<double> w(static_cast<size_t>(cols));
  const size_t rb = rowBytes(type, cols);
  const uint8_t* p = data + static_cast<size_t>(r) * rb;
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t b = c / 32, j = c % 32;
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
    }
  }
  return w;
}

}  // namespace cortex::kernels::testref
