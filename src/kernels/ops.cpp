#include "kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/simd.h"

namespace cortex::kernels {

void rmsNorm(const float* x, const float* weight, int64_t nTokens, int64_t n, float eps,
             float* out) {
  for (int64_t t = 0; t < nTokens; ++t) {
    const float* xr = x + t * n;
    float* yr = out + t * n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const auto scale =
        static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + static_cast<double>(eps)));
    for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * scale * weight[i];
  }
}

RopeTable::RopeTable(int32_t maxPositions, int32_t rotDim, double theta)
    : maxPositions_(maxPositions), rotDim_(rotDim) {
  if (maxPositions <= 0 || rotDim < 2 || rotDim % 2 != 0 || !(theta > 0)) {
    throw std::invalid_argument("RopeTable: need maxPositions > 0, even rotDim >= 2, theta > 0");
  }
  const int32_t half = rotDim / 2;
  table_.resize(static_cast<size_t>(maxPositions) * static_cast<size_t>(rotDim));
  for (int32_t p = 0; p < maxPositions; ++p) {
    float* row = table_.data() + static_cast<size_t>(p) * rotDim;
    for (int32_t i = 0; i < half; ++i) {
      const double freq = std::pow(theta, -2.0 * i / rotDim);
      const double a = p * freq;
      row[i] = static_cast<float>(std::cos(a));
      row[half + i] = static_cast<float>(std::sin(a));
    }
  }
}

void ropeInPlace(float* x, int64_t nTokens, int32_t nHeads, int32_t headDim,
                 const int32_t* positions, const RopeTable& table) {
  const int32_t half = table.rotDim() / 2;
  if (table.rotDim() > headDim) {
    throw std::invalid_argument("ropeInPlace: rotDim " + std::to_string(table.rotDim()) +
                                " > headDim " + std::to_string(headDim));
  }
  for (int64_t t = 0; t < nTokens; ++t) {
    const int32_t pos = positions[t];
    if (pos < 0 || pos >= table.maxPositions()) {
      throw std::out_of_range("ropeInPlace: position " + std::to_string(pos) +
                              " outside the RoPE table [0, " +
                              std::to_string(table.maxPositions()) + ")");
    }
    const float* cs = table.at(pos);
    const float* sn = cs + half;
    float* row = x + t * static_cast<int64_t>(nHeads) * headDim;
    for (int32_t h = 0; h < nHeads; ++h) {
      float* v = row + static_cast<int64_t>(h) * headDim;
      for (int32_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * cs[i] - b * sn[i];
        v[2 * i + 1] = a * sn[i] + b * cs[i];
      }
    }
  }
}

// note: silu(g) = g * t / (1 + e) with e = exp(-|g|), t = 1 for g >= 0 and e otherwise, so the
// exponential only ever sees arguments <= 0 (detail::expNonPositive); the AVX2 loop and the scalar
// tail do the same operations, so an element's bits do not depend on where it sits in the array.
void swiglu(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
#if CS_KERNELS_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = detail::expNonPositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_and_ps(g, absMask)));
    const __m256 t = _mm256_blendv_ps(e, one, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ));
    const __m256 silu = _mm256_div_ps(_mm256_mul_ps(g, t), _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = gate[i];
    const float e = detail::expNonPositive(0.0f - std::fabs(g));
    const float t = g >= 0.0f ? 1.0f : e;
    out[i] = (g * t) / (1.0f + e) * up[i];
  }
}

void addInPlace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void logSoftmax(const float* x, int64_t n, float* out) {
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i]) - mx);
  const double logZ = std::log(sum) + mx;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i] - logZ);
}

int64_t argmax(const float* x, int64_t n) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) continue;
    if (best < 0 || x[i] > x[best]) best = i;
  }
  return best;
}

}  // namespace cortex::kernels
