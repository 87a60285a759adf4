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

// RoPE: adjacent pairs, angle pos * theta^(-2i/rotDim). The table holds cos/sin rounded once to
// float and each output is two float products and a sum: error below 4 ulps of the operands'
// magnitude (|x| <= 1), so 1e-6 absolute.
TEST(Ops, RopeAdjacentPairsMatchesReference) {
  const int32_t heads = 3, headDim = 16, tokens = 4;
  const double theta = 100000;
  for (int32_t rotDim : {16, 8}) {
    RopeTable table(64, rotDim, theta);
    const int32_t pos[tokens] = {0, 1, 17, 63};
    auto x = testref::randomFloats(tokens * heads * headDim, 3);
    const auto orig = x;
    ropeInPlace(x.data(), tokens, heads, headDim, pos, table);
    for (int32_t t = 0; t < tokens; ++t) {
      for (int32_t h = 0; h < heads; ++h) {
        const size_t o = static_cast<size_t>((t * heads + h) * headDim);
        for (int32_t i = 0; i < headDim / 2; ++i) {
          const double a = orig[o + 2 * i], b = orig[o + 2 * i + 1];
          double ra = a, rb = b;
          if (2 * i < rotDim) {
            const double ang = pos[t] * std::pow(theta, -2.0 * i / rotDim);
            ra = a * std::cos(ang) - b * std::sin(ang);
            rb = a * std::sin(ang) + b * std::cos(ang);
          }
          ASSERT_NEAR(x[o + 2 * i], ra, 1e-6);
          ASSERT_NEAR(x[o + 2 * i + 1], rb, 1e-6);
        }
      }
    }
  }
  RopeTable table(8, 16, theta);
  std::vector<float> v(16);
  const int32_t bad = 8;
  EXPECT_THROW(ropeInPlace(v.data(), 1, 1, 16, &bad, table), std::out_of_range);
  EXPECT_THROW(ropeInPlace(v.data(), 1, 1, 8, &bad, table), std::invalid_argument);
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
