// Element-wise ops against double references.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/ops.h"
#include "kernels/simd.h"
#include "reference.h"

namespace cortex::kernels {
namespace {

// rmsNorm: sum of squares in double, then one float scale and two float products: within a few
// ulps of the double result; 4e-7 relative is 6 ulps at float precision.
TEST(Ops, RmsNormMatchesReference) {
  const int64_t n = 576, tokens = 5;
  const auto x = testref::randomFloats(n * tokens, 1, -3, 3);
  const auto w = testref::randomFloats(n, 2, 0.5f, 1.5f);
  std::vector<float> y(x.size());
  rmsNorm(x.data(), w.data(), tokens, n, 1e-5f, y.data());
  for (int64_t t = 0; t < tokens; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[t * n + i]) * x[t * n + i];
    const double s = 1 / std::sqrt(ss / n + 1e-5);
    for (int64_t i = 0; i < n; ++i) {
      const double ref = x[t * n + i] * s * w[i];
      ASSERT_NEAR(y[t * n + i], ref, 4e-7 * std::abs(ref) + 1e-30);
    }
  }
  // In place gives the same bits.
  std::vector<float> z = x;
  rmsNorm(z.data(), w.data(), tokens, n, 1e-5f, z.data());
  EXPECT_EQ(std::memcmp(z.data(), y.data(), 4 * y.size()), 0);
}

// RoPE: pair i is (2i, 2i+1) (Normal) or (i, i + rotDim/2) (Neox), rotated by pos * freq_i with
// freq_i = scale * theta^(-2i/rotDim) / factor_i. cos/sin are rounded once to float and each output
// is two float products and a sum: error below 4 ulps of the operands' magnitude (|x| <= 1), so
// 1e-6 absolute.
TEST(Ops, RopeMatchesReferenceInBothStyles) {
  const int32_t heads = 3, headDim = 16, tokens = 4;
  const double theta = 100000;
  for (RopeStyle style : {RopeStyle::Normal, RopeStyle::Neox}) {
    for (int32_t rotDim : {16, 8}) {
      for (bool scaled : {false, true}) {
        std::vector<float> factors;
        if (scaled) {
          for (int32_t i = 0; i < rotDim / 2; ++i) factors.push_back(1.0f + 0.5f * static_cast<float>(i));
        }
        const double freqScale = scaled ? 0.25 : 1.0;
        Rope rope(style, rotDim, theta, freqScale, factors);
        const int32_t pos[tokens] = {0, 1, 17, 63};
        std::vector<float> cs(static_cast<size_t>(tokens * rotDim));
        rope.angles(pos, tokens, cs.data());
        auto x = testref::randomFloats(tokens * heads * headDim, 3);
        const auto orig = x;
        ropeInPlace(x.data(), tokens, heads, headDim, cs.data(), rotDim, style);
        for (int32_t t = 0; t < tokens; ++t) {
          for (int32_t h = 0; h < heads; ++h) {
            const size_t o = static_cast<size_t>((t * heads + h) * headDim);
            std::vector<double> want(orig.begin() + static_cast<std::ptrdiff_t>(o),
                                     orig.begin() + static_cast<std::ptrdiff_t>(o) + headDim);
            for (int32_t i = 0; i < rotDim / 2; ++i) {
              const size_t ia = style == RopeStyle::Normal ? 2 * static_cast<size_t>(i) : static_cast<size_t>(i);
              const size_t ib = style == RopeStyle::Normal ? ia + 1 : ia + static_cast<size_t>(rotDim / 2);
              const double f = scaled ? factors[static_cast<size_t>(i)] : 1.0;
              const double ang = pos[t] * freqScale * std::pow(theta, -2.0 * i / rotDim) / f;
              const double a = orig[o + ia], b = orig[o + ib];
              want[ia] = a * std::cos(ang) - b * std::sin(ang);
              want[ib] = a * std::sin(ang) + b * std::cos(ang);
            }
            for (int32_t d = 0; d < headDim; ++d) {
              ASSERT_NEAR(x[o + static_cast<size_t>(d)], want[static_cast<size_t>(d)], 1e-6)
                  << "style " << static_cast<int>(style) << " rotDim " << rotDim << " d " << d;
            }
          }
        }
      }
    }
  }
  std::vector<float> v(16), cs(16);
  const int32_t bad = -1;
  EXPECT_THROW(Rope(RopeStyle::Normal, 16, theta).angles(&bad, 1, cs.data()), std::out_of_range);
  EXPECT_THROW(ropeInPlace(v.data(), 1, 1, 8, cs.data(), 16, RopeStyle::Neox), std::invalid_argument);
  EXPECT_THROW(Rope(RopeStyle::Normal, 16, theta, 1.0, {1.0f, 2.0f}), std::invalid_argument);
}

// GeGLU with the tanh GELU: against the formula in double, within float rounding of the inputs'
// magnitude; the AVX2 body and the scalar tail agree to the bit (odd offsets and lengths).
TEST(Ops, GegluMatchesTanhGeluAndIsBatchInvariant) {
  const int64_t n = 1000;
  const auto g = testref::randomFloats(n, 7, -8, 8);
  const auto u = testref::randomFloats(n, 8);
  std::vector<float> all(static_cast<size_t>(n)), part(static_cast<size_t>(n));
  geglu(g.data(), u.data(), n, all.data());
  for (int64_t i = 0; i < n; ++i) {
    const double x = g[static_cast<size_t>(i)];
    const double gelu = 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    ASSERT_NEAR(all[static_cast<size_t>(i)], gelu * u[static_cast<size_t>(i)], 2e-6 * (std::abs(x) + 1));
  }
  geglu(g.data() + 3, u.data() + 3, 101, part.data());
  ASSERT_EQ(std::memcmp(part.data(), all.data() + 3, 4 * 101), 0);
}

// Each element depends only on itself: a row computed alone or inside a longer array, at any
// offset, has the same bits.
TEST(Ops, ElementwiseOpsAreBatchInvariant) {
  const int64_t n = 1536;
  const auto g = testref::randomFloats(17 * n, 4, -6, 6);
  const auto u = testref::randomFloats(17 * n, 5);
  std::vector<float> all(g.size()), one(n);
  swiglu(g.data(), u.data(), 17 * n, all.data());
  for (int64_t t : {0, 5, 16}) {
    swiglu(g.data() + t * n, u.data() + t * n, n, one.data());
    ASSERT_EQ(std::memcmp(one.data(), all.data() + t * n, 4 * n), 0);
    for (int64_t i = 0; i < n; i += 97) {
      const double gg = g[t * n + i];
      ASSERT_NEAR(one[i], gg / (1 + std::exp(-gg)) * u[t * n + i], 1e-6 * (std::abs(gg) + 1));
    }
  }
  // Odd offset, odd length.
  swiglu(g.data() + 3, u.data() + 3, 101, one.data());
  ASSERT_EQ(std::memcmp(one.data(), all.data() + 3, 4 * 101), 0);
}

// The exp used by softmax weights and silu: within 2 ulp of the true exp on [-87, 0], 0 below,
// and the AVX2 version gives the scalar version's bits.
TEST(Ops, ExpNonPositiveAccuracyAndSimdAgreement) {
  std::vector<float> xs;
  for (float x = -87.0f; x <= 0.0f; x += 0.00731f) xs.push_back(x);
  xs.push_back(0.0f);
  xs.push_back(-1e-30f);
  xs.push_back(-87.5f);
  xs.push_back(-1000.0f);
  for (float x : xs) {
    const float got = detail::expNonPositive(x);
    if (x < -87.0f) {
      ASSERT_EQ(got, 0.0f);
      continue;
    }
    const double ref = std::exp(static_cast<double>(x));
    const double ulp = std::ldexp(1.0, std::ilogb(ref) - 23);
    ASSERT_LE(std::abs(got - ref), 2 * ulp) << x;
  }
#if CS_KERNELS_AVX2
  for (size_t i = 0; i + 8 <= xs.size(); i += 8) {
    float v[8];
    _mm256_storeu_ps(v, detail::expNonPositive(_mm256_loadu_ps(xs.data() + i)));
    for (int l = 0; l < 8; ++l) {
      const float s = detail::expNonPositive(xs[i + l]);
      ASSERT_EQ(std::memcmp(&v[l], &s, 4), 0) << xs[i + l];
    }
  }
#endif
}

TEST(Ops, AddInPlace) {
  std::vector<float> y = {1, 2, 3}, x = {0.5f, -2, 4};
  addInPlace(y.data(), x.data(), 3);
  EXPECT_EQ(y, (std::vector<float>{1.5f, 0, 7}));
}

TEST(Ops, LogSoftmaxMatchesReferenceAndIsStable) {
  const std::vector<float> x = {1000, 1001, 999, -5};
  std::vector<float> out(4);
  logSoftmax(x.data(), 4, out.data());
  double sum = 0;
  for (float v : x) sum += std::exp(double(v) - 1001);
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(out[i], double(x[i]) - 1001 - std::log(sum), 1e-4);
  double total = 0;
  for (float v : out) total += std::exp(double(v));
  EXPECT_NEAR(total, 1.0, 1e-6);
}

TEST(Ops, Argmax) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x = {nan, 1, 3, 3, -2};
  EXPECT_EQ(argmax(x.data(), 5), 2);
  EXPECT_EQ(argmax(x.data(), 1), -1);
  EXPECT_EQ(argmax(x.data(), 0), -1);
  std::vector<float> y = {-std::numeric_limits<float>::infinity(), -1e30f};
  EXPECT_EQ(argmax(y.data(), 2), 1);
}

}  // namespace
}  // namespace cortex::kernels
