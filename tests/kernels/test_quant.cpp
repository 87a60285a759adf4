// The integer matmul path (quant.h) against an independent double-precision reference, and the
// instruction-set levels against each other.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/isa.h"
#include "kernels/kernel_set.h"
#include "kernels/quant.h"
#include "kernels/thread_pool.h"
#include "reference.h"
#include "weights_ref.h"

namespace cortex::kernels {
namespace {

const WeightType kPackedTypes[] = {WeightType::Q4_0, WeightType::Q4_1, WeightType::Q8_0,
                                   WeightType::Q5_0, WeightType::Q5_1, WeightType::Q2_K,
                                   WeightType::Q3_K, WeightType::Q4_K, WeightType::Q5_K,
                                   WeightType::Q6_K};

using testref::colsFor;

TEST(Isa, NamesRoundTripAndScalarIsAlwaysThere) {
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni}) {
    EXPECT_EQ(parseIsa(toString(isa)), isa);
  }
  EXPECT_FALSE(parseIsa("sse9").has_value());
  EXPECT_TRUE(cpuSupports(Isa::Scalar));
  ASSERT_FALSE(supportedIsas().empty());
  EXPECT_EQ(supportedIsas().front(), Isa::Scalar);
  EXPECT_TRUE(cpuSupports(activeIsa()));
}

// The activation quantizer against its definition, written out in scalar code here: per block of
// 32, d = amax / 127, q = nearest-even(x * (127 / amax)); and the rounding bound |q d - x| <= d/2
// (plus the rounding of the product x * (127 / amax), at most a few ulp of 127).
TEST(Quantize, MatchesDefinitionAndBound) {
  ThreadPool pool(2);
  const int64_t rows = 9, cols = 96;
  auto x = testref::randomFloats(static_cast<size_t>(rows * cols), 5, -3, 3);
  std::fill(x.begin() + 32, x.begin() + 64, 0.0f);  // an all-zero block
  x[100] = 1e-30f;                                   // a tiny value next to normal ones
  QuantizedActivations qa;
  quantizeActivations(pool, x.data(), rows, cols, qa);
  ASSERT_EQ(qa.rows, rows);
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t b = 0; b < cols / 32; ++b) {
      const float* xb = x.data() + t * cols + b * 32;
      float amax = 0;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
      const int64_t bi = t * (cols / 32) + b;
      ASSERT_EQ(qa.d[bi], d);
      int32_t sum = 0, sumLo = 0;
      for (int i = 0; i < 32; ++i) {
        const int8_t q = qa.q[t * cols + b * 32 + i];
        ASSERT_EQ(q, static_cast<int8_t>(std::nearbyint(xb[i] * id))) << t << "," << b << "," << i;
        ASSERT_LE(std::abs(q), 127);
        ASSERT_LE(std::abs(q * static_cast<double>(d) - xb[i]), 0.5001 * d + 1e-30);
        sum += q;
        if (i < 16) sumLo += q;
      }
      ASSERT_EQ(qa.sum[bi], sum);
      ASSERT_EQ(qa.sumLo[bi], sumLo);
      ASSERT_EQ(qa.dsum[bi], d * static_cast<float>(sum));
    }
  }
  EXPECT_THROW(quantizeActivations(pool, x.data(), rows, 40, qa), std::invalid_argument);
}

// Every level quantizes to the same bytes.
TEST(Quantize, LevelsAgree) {
  const int64_t rows = 5, cols = 256;
  const auto x = testref::randomFloats(static_cast<size_t>(rows * cols), 6, -100, 100);
  QuantizedActivations ref, got;
  ref.resize(rows, cols);
  got.resize(rows, cols);
  detail::kernelSet(Isa::Scalar).quantizeRows(x.data(), 0, rows, ref);
  for (Isa isa : supportedIsas()) {
    SCOPED_TRACE(toString(isa));
    detail::kernelSet(isa).quantizeRows(x.data(), 0, rows, got);
    ASSERT_EQ(0, std::memcmp(ref.q.data(), got.q.data(), static_cast<size_t>(rows * cols)));
    ASSERT_EQ(0, std::memcmp(ref.d.data(), got.d.data(), sizeof(float) * rows * cols / 32));
    ASSERT_EQ(ref.sum, got.sum);
    ASSERT_EQ(ref.sumLo, got.sumLo);
    ASSERT_EQ(0, std::memcmp(ref.dsum.data(), got.dsum.data(), sizeof(float) * rows * cols / 32));
  }
}

// Y against the reference computed in double from the unpacked weights (decoded by hand from
// the GGUF layout) and the quantized activations: sum over blocks of dw * dx * I (+ m * dx * s),
// or for the K-quants the same per sub-block. The kernel evaluates each term with at most two
// float roundings (d * dx, then the fma) and adds at most 2 nb terms in order, so
// |error| <= (2 nb + 2) * 2^-24 * sum |term| (recursive summation bound).
// Against the float activations, the extra error is the quantization's: at most
// sum_c |w_c| * dx_c / 2.
void expectMatchesReference(WeightType type, int64_t rows, int64_t cols0, int64_t nTokens,
                            uint32_t seed) {
  const int64_t cols = colsFor(type, cols0);
  ThreadPool pool(2);
  const auto bytes = testref::randomWeights(type, rows, cols, seed);
  const WeightMatrix w{bytes.data(), type, rows, cols};
  const PackedWeights packed(w);
  const auto x = testref::randomFloats(static_cast<size_t>(nTokens * cols), seed + 1);
  QuantizedActivations qa;
  quantizeActivations(pool, x.data(), nTokens, cols, qa);
  std::vector<float> y(static_cast<size_t>(nTokens * rows), -1.0f);
  matmul(pool, packed, qa, y.data());
  const double u = std::ldexp(1.0, -24);
  for (int64_t r = 0; r < rows; ++r) {
    const auto wr = testref::refRow(type, bytes.data(), cols, r);
    for (int64_t t = 0; t < nTokens; ++t) {
      double ref = 0, mag = 0, exact = 0, qbound = 0;
      for (int64_t c = 0; c < cols; ++c) {
        const double dx = qa.d[t * (cols / 32) + c / 32];
        const double term = wr[c] * qa.q[t * cols + c] * dx;
        ref += term;
        mag += std::abs(term);
        exact += wr[c] * x[t * cols + c];
        qbound += std::abs(wr[c]) * dx / 2;
      }
      const double got = y[t * rows + r];
      const double tol = (static_cast<double>(cols) / 16 + 2) * u * mag * 2;
      ASSERT_LE(std::abs(got - ref), tol) << "row " << r << " token " << t;
      ASSERT_LE(std::abs(got - exact), tol + qbound) << "row " << r << " token " << t;
    }
  }
}

TEST(PackedMatmul, MatchesReference) {
  for (WeightType type : kPackedTypes) {
    SCOPED_TRACE(toString(type));
    expectMatchesReference(type, 37, 96, 1, 11);   // decode, a partial row group
    expectMatchesReference(type, 48, 576, 13, 12);  // prefill tiles and a remainder
  }
}

// Bit-identical results on every level, for any batch split and thread count, with a row count
// that leaves a partial group of 16 and a token count that leaves partial tiles.
TEST(PackedMatmul, LevelsBatchesAndThreadsAgree) {
  const int64_t rows = 101, total = 19;
  ThreadPool reference(1);
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  for (WeightType type : kPackedTypes) {
    SCOPED_TRACE(toString(type));
    const int64_t cols = colsFor(type, 576);
    const auto bytes = testref::randomWeights(type, rows, cols, 21);
    const PackedWeights packed(WeightMatrix{bytes.data(), type, rows, cols});
    const auto x = testref::randomFloats(static_cast<size_t>(total * cols), 22, -4, 4);
    QuantizedActivations all;
    quantizeActivations(reference, x.data(), total, cols, all);
    std::vector<float> full(static_cast<size_t>(total * rows));
    detail::kernelSet(Isa::Scalar).packedGroups(packed, all, full.data(), 0, packed.groups());
    for (Isa isa : supportedIsas()) {
      for (ThreadPool& pool : pools) {
        for (int64_t batch : {1, 3, 8, 19}) {
          for (int64_t t0 = 0; t0 < total; t0 += batch) {
            const int64_t n = std::min(batch, total - t0);
            QuantizedActivations qa;
            quantizeActivations(pool, x.data() + t0 * cols, n, cols, qa);
            std::vector<float> y(static_cast<size_t>(n * rows), -7.0f);
            // Through the kernel table of this level, split over the pool's threads.
            const auto& set = detail::kernelSet(isa);
            const int64_t groups = packed.groups();
            pool.parallelFor(pool.size(), [&](int64_t c, int) {
              const int64_t g0 = groups * c / pool.size(), g1 = groups * (c + 1) / pool.size();
              set.packedGroups(packed, qa, y.data(), g0, g1);
            });
            ASSERT_EQ(0, std::memcmp(y.data(), full.data() + t0 * rows, sizeof(float) * n * rows))
                << toString(isa) << ", threads " << pool.size() << ", batch " << batch
                << ", token " << t0;
          }
        }
      }
    }
  }
}

// The packed form takes exactly the bytes of the stored form (rows padded to a multiple of 16).
TEST(PackedMatmul, PackedBytesEqualGgmlBytes) {
  for (WeightType type : kPackedTypes) {
    SCOPED_TRACE(toString(type));
    EXPECT_TRUE(PackedWeights::packable(type));
    EXPECT_EQ(PackedWeights::groupCellBytes(type), 16 * blockBytes(type));
    EXPECT_EQ(PackedWeights::cellElems(type), blockElems(type));
    const int64_t rows = 21, cols = colsFor(type, 64);
    const auto bytes = testref::randomWeights(type, rows, cols, 5);
    const PackedWeights packed(WeightMatrix{bytes.data(), type, rows, cols});
    EXPECT_EQ(packed.bytes(), 32 * rowBytes(type, cols));
  }
}

// Blocks at the extremes of every field (all-ones and all-zero bytes, the largest and most
// negative scales) against activations at +-127: the integer sums reach their documented bounds
// (Q6_K's J up to 2 * 128 * 16 * 32 * 127), where an int16 or float overflow on any level would
// show. Every level must match the double reference to within the float rounding and agree to
// the bit.
TEST(PackedMatmul, ExtremeBlocksStayExact) {
  ThreadPool pool(1);
  std::mt19937 rng(9);
  const uint8_t pick[] = {0x00, 0xFF, 0x80, 0x7F};
  for (WeightType type : kPackedTypes) {
    SCOPED_TRACE(toString(type));
    const int64_t rows = 19, cols = colsFor(type, 64), nTokens = 5;
    auto bytes = testref::randomWeights(type, rows, cols, 31);
    const size_t bb = blockBytes(type);
    const testref::HalfFields f = testref::halfFields(type);
    for (size_t at = 0; at < bytes.size(); at += bb) {
      // One extreme byte pattern per block, keeping the fp16 scales finite.
      const uint8_t v = pick[rng() % 4];
      for (size_t i = 0; i < bb; ++i) {
        const auto ii = static_cast<int>(i);
        const bool isHalf = ii == f.d || ii == f.d + 1 || (f.m >= 0 && (ii == f.m || ii == f.m + 1));
        if (!isHalf) bytes[at + i] = (rng() % 4 == 0) ? pick[rng() % 4] : v;
      }
    }
    const WeightMatrix w{bytes.data(), type, rows, cols};
    const PackedWeights packed(w);
    std::vector<float> x(static_cast<size_t>(nTokens * cols));
    for (size_t i = 0; i < x.size(); ++i) x[i] = (i % 3 == 0 || rng() % 2) ? 1.0f : -1.0f;
    QuantizedActivations qa;
    quantizeActivations(pool, x.data(), nTokens, cols, qa);
    std::vector<float> ref(static_cast<size_t>(nTokens * rows));
    detail::kernelSet(Isa::Scalar).packedGroups(packed, qa, ref.data(), 0, packed.groups());
    for (int64_t r = 0; r < rows; ++r) {
      const auto wr = testref::refRow(type, bytes.data(), cols, r);
      for (int64_t t = 0; t < nTokens; ++t) {
        double exact = 0, mag = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const double term = wr[c] * qa.q[t * cols + c] * qa.d[t * (cols / 32) + c / 32];
          exact += term;
          mag += std::abs(term);
        }
        const double tol = (static_cast<double>(cols) / 16 + 2) * std::ldexp(1.0, -24) * mag * 2;
        ASSERT_LE(std::abs(ref[t * rows + r] - exact), tol) << "row " << r << " token " << t;
      }
    }
    for (Isa isa : supportedIsas()) {
      std::vector<float> y(ref.size(), -3.0f);
      detail::kernelSet(isa).packedGroups(packed, qa, y.data(), 0, packed.groups());
      ASSERT_EQ(0, std::memcmp(y.data(), ref.data(), sizeof(float) * y.size())) << toString(isa);
    }
  }
}

TEST(PackedMatmul, RejectsWhatItCannotRun) {
  std::vector<float> f(64, 0.0f);
  EXPECT_FALSE(PackedWeights::packable(WeightType::F32));
  EXPECT_THROW(PackedWeights(WeightMatrix{f.data(), WeightType::F32, 2, 32}),
               std::invalid_argument);
  const auto bytes = testref::randomWeights(WeightType::Q4_0, 16, 64, 3);
  const PackedWeights packed(WeightMatrix{bytes.data(), WeightType::Q4_0, 16, 64});
  ThreadPool pool(1);
  QuantizedActivations qa;
  quantizeActivations(pool, f.data(), 1, 32, qa);
  std::vector<float> y(16);
  EXPECT_THROW(matmul(pool, packed, qa, y.data()), std::invalid_argument);
  // K-quants need whole 256-column super-blocks.
  std::vector<uint8_t> k(4 * 144 * 3);
  EXPECT_THROW(PackedWeights(WeightMatrix{k.data(), WeightType::Q4_K, 4, 640}),
               std::invalid_argument);
}

}  // namespace
}  // namespace cortex::kernels
