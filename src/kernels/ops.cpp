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

Rope::Rope(RopeStyle style, int32_t rotDim, double theta, double freqScale,
           std::vector<float> freqFactors, double attnFactor)
    : style_(style), rotDim_(rotDim), attnFactor_(attnFactor) {
  if (rotDim < 2 || rotDim % 2 != 0 || !(theta > 0) || !(freqScale > 0) || !(attnFactor > 0)) {
    throw std::invalid_argument(
        "Rope: need an even rotDim >= 2, theta > 0, freqScale > 0 and attnFactor > 0");
  }
  const int32_t half = rotDim / 2;
  if (!freqFactors.empty() && static_cast<int32_t>(freqFactors.size()) != half) {
    throw std::invalid_argument("Rope: " + std::to_string(freqFactors.size()) +
                                " frequency factors for " + std::to_string(half) + " frequencies");
  }
  freq_.resize(static_cast<size_t>(half));
  for (int32_t i = 0; i < half; ++i) {
    const double factor = freqFactors.empty() ? 1.0 : freqFactors[static_cast<size_t>(i)];
    if (!(factor > 0)) throw std::invalid_argument("Rope: frequency factors must be positive");
    freq_[static_cast<size_t>(i)] = freqScale * std::pow(theta, -2.0 * i / rotDim) / factor;
  }
}

void Rope::angles(const int32_t* positions, int64_t nTokens, float* cs) const {
  const int32_t half = rotDim_ / 2;
  for (int64_t t = 0; t < nTokens; ++t) {
    const int32_t pos = positions[t];
    if (pos < 0) throw std::out_of_range("Rope: negative position " + std::to_string(pos));
    float* row = cs + t * rotDim_;
    for (int32_t i = 0; i < half; ++i) {
      const double a = pos * freq_[static_cast<size_t>(i)];
      row[i] = static_cast<float>(std::cos(a) * attnFactor_);
      row[half + i] = static_cast<float>(std::sin(a) * attnFactor_);
    }
  }
}

void Rope::rotation(int32_t delta, float* cs) const {
  const int32_t half = rotDim_ / 2;
  for (int32_t i = 0; i < half; ++i) {
    const double a = delta * freq_[static_cast<size_t>(i)];
    cs[i] = static_cast<float>(std::cos(a));
    cs[half + i] = static_cast<float>(std::sin(a));
  }
}

void ropeInPlace(float* x, int64_t nTokens, int32_t nHeads, int32_t headDim, const float* cs,
                 int32_t rotDim, RopeStyle style) {
  const int32_t half = rotDim / 2;
  if (rotDim > headDim) {
    throw std::invalid_argument("ropeInPlace: rotDim " + std::to_string(rotDim) + " > headDim " +
                                std::to_string(headDim));
  }
  // Pair i is (x[ia * i], x[ia * i + ib]): adjacent (2i, 2i + 1) or split (i, i + rotDim/2).
  const int32_t ia = style == RopeStyle::Normal ? 2 : 1;
  const int32_t ib = style == RopeStyle::Normal ? 1 : half;
  for (int64_t t = 0; t < nTokens; ++t) {
    const float* cs_t = cs + t * rotDim;
    const float* sn = cs_t + half;
    float* row = x + t * static_cast<int64_t>(nHeads) * headDim;
    for (int32_t h = 0; h < nHeads; ++h) {
      float* v = row + static_cast<int64_t>(h) * headDim;
      for (int32_t i = 0; i < half; ++i) {
        float* p = v + ia * i;
        const float a = p[0], b = p[ib];
        p[0] = a * cs_t[i] - b * sn[i];
        p[ib] = a * sn[i] + b * cs_t[i];
      }
    }
  }
}

namespace {

// out[i] = gate[i] * sigmoid(z(gate[i])) * up[i], the shared shape of SwiGLU (z = g) and GeGLU
// (z from the tanh GELU). sigmoid(z) = t / (1 + e) with e = exp(-|z|), t = 1 for z >= 0 and e
// otherwise, so the exponential only ever sees arguments <= 0 (detail::expNonPositive); the AVX2
// loop and the scalar tail do the same operations, so an element's bits do not depend on where it
// sits in the array.
template <class ZVec, class ZScalar>
void gateBySigmoid(const float* gate, const float* up, int64_t n, float* out, ZVec zVec,
                   ZScalar zScalar) {
  int64_t i = 0;
#if CS_KERNELS_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 z = zVec(g);
    const __m256 e = detail::expNonPositive(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_and_ps(z, absMask)));
    const __m256 t = _mm256_blendv_ps(e, one, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
    const __m256 act = _mm256_div_ps(_mm256_mul_ps(g, t), _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(act, _mm256_loadu_ps(up + i)));
  }
#else
  (void)zVec;
#endif
  for (; i < n; ++i) {
    const float g = gate[i];
    const float z = zScalar(g);
    const float e = detail::expNonPositive(0.0f - std::fabs(z));
    const float t = z >= 0.0f ? 1.0f : e;
    out[i] = (g * t) / (1.0f + e) * up[i];
  }
}

constexpr float kGeluC0 = 2.0f * 0.7978845608028654f;  // 2 sqrt(2/pi)
constexpr float kGeluC1 = 0.044715f;

}  // namespace

void swiglu(const float* gate, const float* up, int64_t n, float* out) {
  gateBySigmoid(gate, up, n, out, [](auto g) { return g; }, [](float g) { return g; });
}

// gelu(g) = g * sigmoid(z), z = 2 sqrt(2/pi) (g + 0.044715 g^3) = (c0 g) (1 + c1 g^2).
void geglu(const float* gate, const float* up, int64_t n, float* out) {
  gateBySigmoid(
      gate, up, n, out,
      [](auto g) {
#if CS_KERNELS_AVX2
        return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(kGeluC0), g),
                             _mm256_fmadd_ps(_mm256_set1_ps(kGeluC1), _mm256_mul_ps(g, g),
                                             _mm256_set1_ps(1.0f)));
#else
        return g;
#endif
      },
      [](float g) { return (kGeluC0 * g) * std::fma(kGeluC1, g * g, 1.0f); });
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
