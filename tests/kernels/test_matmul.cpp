// matmul and dequantizeRow against an independent double-precision reference.
#include <gtest/gtest.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <random>
#include <vector>

#include "common/half.h"
#include "kernels/matmul.h"
#include "kernels/thread_pool.h"
#include "kernels/weights.h"
#include "kernels/kernel_set.h"
#include "reference.h"
#include "weights_ref.h"

namespace cortex::kernels {
namespace {

using testref::f16;
using testref::randomWeights;
using testref::refRow;
using testref::u16;

using testref::colsFor;

const WeightType kAllTypes[] = {WeightType::F32,  WeightType::F16,  WeightType::BF16,
                                WeightType::Q8_0, WeightType::Q4_0, WeightType::Q4_1,
                                WeightType::Q5_0, WeightType::Q5_1, WeightType::Q2_K,
                                WeightType::Q3_K, WeightType::Q4_K, WeightType::Q5_K,
                                WeightType::Q6_K};

TEST(Weights, RowBytesMatchGgml) {
  EXPECT_EQ(rowBytes(WeightType::Q4_1, 576), 18u * 20u);
  EXPECT_EQ(rowBytes(WeightType::Q4_0, 64), 36u);
  EXPECT_EQ(rowBytes(WeightType::Q8_0, 576), 18u * 34u);
  EXPECT_EQ(rowBytes(WeightType::F16, 10), 20u);
  EXPECT_EQ(rowBytes(WeightType::BF16, 10), 20u);
  EXPECT_EQ(rowBytes(WeightType::F32, 10), 40u);
  EXPECT_EQ(rowBytes(WeightType::Q5_0, 640), 20u * 22u);
  EXPECT_EQ(rowBytes(WeightType::Q5_1, 64), 48u);
  EXPECT_EQ(rowBytes(WeightType::Q2_K, 512), 168u);
  EXPECT_EQ(rowBytes(WeightType::Q3_K, 256), 110u);
  EXPECT_EQ(rowBytes(WeightType::Q4_K, 1024), 4u * 144u);
  EXPECT_EQ(rowBytes(WeightType::Q5_K, 256), 176u);
  EXPECT_EQ(rowBytes(WeightType::Q6_K, 2048), 8u * 210u);
  for (WeightType t : kAllTypes) EXPECT_EQ(blockElems(t) == 256, isKQuant(t)) << toString(t);
}

TEST(Weights, ValidateRejectsBadShapes) {
  float x = 0;
  EXPECT_THROW(validate({nullptr, WeightType::F32, 1, 8}), std::invalid_argument);
  EXPECT_THROW(validate({&x, WeightType::Q4_1, 1, 48}), std::invalid_argument);
  EXPECT_THROW(validate({&x, WeightType::F16, 1, 12}), std::invalid_argument);
  EXPECT_THROW(validate({&x, WeightType::F32, 0, 8}), std::invalid_argument);
  EXPECT_NO_THROW(validate({&x, WeightType::F32, 1, 8}));
  EXPECT_NO_THROW(validate({&x, WeightType::Q5_0, 1, 640}));
  for (WeightType t : {WeightType::Q2_K, WeightType::Q3_K, WeightType::Q4_K, WeightType::Q5_K,
                       WeightType::Q6_K}) {
    SCOPED_TRACE(toString(t));
    EXPECT_NO_THROW(validate({&x, t, 3, 512}));
    try {
      validate({&x, t, 3, 640});
      ADD_FAILURE() << "640 columns accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("multiple of 256"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(toString(t)), std::string::npos) << e.what();
    }
  }
}

// The canonical floats are the exact values rounded once to float: for every type the double
// decoding is exact (fp16 d times small integers, plus fp16 m or dmin times one, fits in 53
// bits), so dequantizeRow must equal it rounded to float, bit for bit.
TEST(Weights, DequantizeRowIsExactlyRounded) {
  for (WeightType type : kAllTypes) {
    SCOPED_TRACE(toString(type));
    const int64_t rows = 5, cols = colsFor(type, 96);
    const auto bytes = randomWeights(type, rows, cols, 7);
    ASSERT_EQ(bytes.size(), rows * rowBytes(type, cols));
    const WeightMatrix w{bytes.data(), type, rows, cols};
    std::vector<float> out(cols);
    for (int64_t r = 0; r < rows; ++r) {
      dequantizeRow(w, r, out.data());
      const auto ref = refRow(type, bytes.data(), cols, r);
      for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(out[c], static_cast<float>(ref[c])) << r << "," << c;
    }
  }
}

// Tolerance: each output is a float32 sum of n = cols products, evaluated as 8 lane chains of
// cols/8 fmas and 3 lane additions, over weights that carry at most one rounding (Q4_1, Q5_1 and
// the K-quants but Q3_K). The
// classical bound for recursive summation gives |error| <= (cols/8 + 4) * 2^-24 * sum |w * x|,
// which we assert as is (it is a worst case; typical errors are far smaller).
void expectMatchesReference(ThreadPool& pool, WeightType type, int64_t rows, int64_t cols0,
                            int64_t nTokens, uint32_t seed) {
  const int64_t cols = colsFor(type, cols0);
  const auto bytes = randomWeights(type, rows, cols, seed);
  const WeightMatrix w{bytes.data(), type, rows, cols};
  const auto x = testref::randomFloats(static_cast<size_t>(nTokens * cols), seed + 1);
  std::vector<float> y(static_cast<size_t>(nTokens * rows), -1.f), ys(y.size(), -2.f);
  matmul(pool, w, x.data(), nTokens, y.data());
  detail::kernelSet(Isa::Scalar).matmulFloat(pool, w, x.data(), nTokens, ys.data());
  const double u = std::ldexp(1.0, -24);
  for (int64_t r = 0; r < rows; ++r) {
    const auto wr = refRow(type, bytes.data(), cols, r);
    for (int64_t t = 0; t < nTokens; ++t) {
      double ref = 0, mag = 0;
      for (int64_t c = 0; c < cols; ++c) {
        ref += wr[c] * x[t * cols + c];
        mag += std::abs(wr[c] * x[t * cols + c]);
      }
      const double tol = (static_cast<double>(cols) / 8 + 4) * u * mag;
      const float got = y[t * rows + r];
      ASSERT_LE(std::abs(got - ref), tol) << "row " << r << " token " << t;
      // The SIMD and portable paths follow the same order: identical bits.
      ASSERT_EQ(std::memcmp(&got, &ys[t * rows + r], 4), 0) << "row " << r << " token " << t;
    }
  }
}

TEST(Matmul, MatchesDoubleReferenceAllTypes) {
  ThreadPool pool(2);
  for (WeightType type : kAllTypes) {
    SCOPED_TRACE(toString(type));
    expectMatchesReference(pool, type, 1, 32, 1, 1);
    expectMatchesReference(pool, type, 7, 64, 3, 2);
    expectMatchesReference(pool, type, 13, 96, 5, 3);
    expectMatchesReference(pool, type, 50, 576, 9, 4);
    expectMatchesReference(pool, type, 101, 160, 17, 5);
    for (int64_t n = 1; n <= 20; ++n) {
      expectMatchesReference(pool, type, 11, 128, n, 100 + static_cast<uint32_t>(n));
    }
  }
}

// Prefill batches longer than one 32-token chunk, with a ragged last tile, against the reference
// and against the same tokens computed one at a time.
TEST(Matmul, LongBatchMatchesSingleTokens) {
  ThreadPool pool(2);
  for (WeightType type : kAllTypes) {
    SCOPED_TRACE(toString(type));
    const int64_t rows = 38, cols = colsFor(type, 192), n = 71;
    expectMatchesReference(pool, type, rows, cols, n, 77);
    const auto bytes = randomWeights(type, rows, cols, 78);
    const WeightMatrix w{bytes.data(), type, rows, cols};
    const auto x = testref::randomFloats(static_cast<size_t>(n * cols), 79);
    std::vector<float> all(static_cast<size_t>(n * rows)), one(static_cast<size_t>(rows));
    matmul(pool, w, x.data(), n, all.data());
    for (int64_t t = 0; t < n; ++t) {
      matmul(pool, w, x.data() + t * cols, 1, one.data());
      ASSERT_EQ(std::memcmp(one.data(), all.data() + t * rows, 4 * rows), 0) << "token " << t;
    }
  }
}

TEST(Matmul, FloatTypesAcceptColsMultipleOf8) {
  ThreadPool pool(2);
  for (WeightType type : {WeightType::F32, WeightType::F16, WeightType::BF16}) {
    SCOPED_TRACE(toString(type));
    expectMatchesReference(pool, type, 5, 40, 6, 9);
  }
}

// A token's output row must be bit-identical whatever batch it is computed in and however many
// threads run: alone, in batches of 3 and 17, on pools of 1, 2 and 3 threads, on every
// instruction-set level the CPU has.
TEST(Matmul, BatchAndThreadInvariant) {
  const int64_t rows = 101, total = 17;
  ThreadPool reference(2);
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  for (WeightType type : kAllTypes) {
    SCOPED_TRACE(toString(type));
    const int64_t cols = colsFor(type, 576);
    const auto bytes = randomWeights(type, rows, cols, 42);
    const WeightMatrix w{bytes.data(), type, rows, cols};
    const auto x = testref::randomFloats(static_cast<size_t>(total * cols), 43);
    std::vector<float> full(static_cast<size_t>(total * rows));
    matmul(reference, w, x.data(), total, full.data());
    for (ThreadPool& pool : pools) {
      for (int64_t batch : {1, 3, 17}) {
        std::vector<float> y(static_cast<size_t>(batch * rows)), ys(y.size());
        for (int64_t t0 = 0; t0 < total; t0 += batch) {
          const int64_t n = std::min(batch, total - t0);
          matmul(pool, w, x.data() + t0 * cols, n, y.data());
          ASSERT_EQ(std::memcmp(y.data(), full.data() + t0 * rows, sizeof(float) * n * rows), 0)
              << "threads " << pool.size() << " batch " << batch << " at token " << t0;
          for (Isa isa : supportedIsas()) {
            detail::kernelSet(isa).matmulFloat(pool, w, x.data() + t0 * cols, n, ys.data());
            ASSERT_EQ(std::memcmp(ys.data(), full.data() + t0 * rows, sizeof(float) * n * rows),
                      0)
                << toString(isa) << " level, threads " << pool.size() << " batch " << batch
                << " at token " << t0;
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace cortex::kernels
