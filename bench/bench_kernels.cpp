// Kernel throughput: matmul per weight type and shape (GB/s of weights read, GFLOP/s), a decode
// sweep over a whole SmolLM2-135M-shaped model (weights far larger than the caches, so the GB/s
// there is the memory-bound figure), and paged attention for one decode step. Each benchmark runs
// on its own pool of one thread per hardware thread, as the engine does by default.
#include <benchmark/benchmark.h>
#include <immintrin.h>

#include <cstring>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/attention.h"
#include "kernels/matmul.h"
#include "kernels/quant.h"
#include "kernels/thread_pool.h"

namespace {

using cortex::kernels::ThreadPool;
using cortex::kernels::WeightMatrix;
using cortex::kernels::WeightType;

// Random weights in the type's layout with sane scales (no NaN/inf/subnormal halves).
std::vector<uint8_t> randomWeights(WeightType type, int64_t rows, int64_t cols, uint32_t seed) {
  std::vector<uint8_t> bytes(rows * cortex::kernels::rowBytes(type, cols));
  std::mt19937 rng(seed);
  for (auto& b : bytes) b = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> dist(-1, 1);
  const auto setHalf = [&](size_t at, float v) {
    const uint16_t h = cortex::floatToHalf(v);
    std::memcpy(&bytes[at], &h, 2);
  };
  const size_t bb = cortex::kernels::blockBytes(type);
  for (size_t at = 0; at < bytes.size(); at += bb) {
    switch (type) {
      case WeightType::F32: {
        const float f = dist(rng);
        std::memcpy(&bytes[at], &f, 4);
        break;
      }
      case WeightType::F16: setHalf(at, dist(rng)); break;
      case WeightType::BF16: {
        const uint16_t h = cortex::floatToBf16(dist(rng));
        std::memcpy(&bytes[at], &h, 2);
        break;
      }
      case WeightType::Q4_1:
      case WeightType::Q5_1: setHalf(at + 2, -0.1f * std::abs(dist(rng))); [[fallthrough]];
      default: setHalf(at, 0.01f * dist(rng)); break;
      // K-quants: d (and dmin) where ggml puts them.
      case WeightType::Q4_K:
      case WeightType::Q5_K:
        setHalf(at, 0.001f * dist(rng));
        setHalf(at + 2, 0.001f * std::abs(dist(rng)));
        break;
      case WeightType::Q2_K:
        setHalf(at + 80, 0.001f * dist(rng));
        setHalf(at + 82, 0.001f * std::abs(dist(rng)));
        break;
      case WeightType::Q3_K: setHalf(at + 108, 0.001f * dist(rng)); break;
      case WeightType::Q6_K: setHalf(at + 208, 0.0001f * dist(rng)); break;
    }
  }
  return bytes;
}

void setCounters(benchmark::State& state, double weightBytes, double flops) {
  using benchmark::Counter;
  state.counters["GB/s"] = Counter(weightBytes / 1e9, Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = Counter(flops / 1e9, Counter::kIsIterationInvariantRate);
}

// Args: rows, cols, nTokens, type.
void BM_Matmul(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), n = state.range(2);
  const auto type = static_cast<WeightType>(state.range(3));
  const auto bytes = randomWeights(type, rows, cols, 1);
  const WeightMatrix w{bytes.data(), type, rows, cols};
  std::vector<float> x(static_cast<size_t>(n * cols)), y(static_cast<size_t>(n * rows));
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> dist(-1, 1);
  for (auto& v : x) v = dist(rng);
  ThreadPool pool(0);
  for (auto _ : state) {
    cortex::kernels::matmul(pool, w, x.data(), n, y.data());
    benchmark::DoNotOptimize(y.data());
  }
  state.SetLabel(cortex::kernels::toString(type));
  setCounters(state, static_cast<double>(bytes.size()), 2.0 * static_cast<double>(rows * cols * n));
}

void matmulArgs(benchmark::internal::Benchmark* b) {
  const int64_t shapes[4][2] = {{576, 576}, {1536, 576}, {576, 1536}, {49152, 576}};
  for (int type : {static_cast<int>(WeightType::Q4_1), static_cast<int>(WeightType::Q8_0),
                   static_cast<int>(WeightType::Q4_0), static_cast<int>(WeightType::F16),
                   static_cast<int>(WeightType::BF16), static_cast<int>(WeightType::F32)}) {
    for (const auto& s : shapes) {
      for (int64_t n : {1, 16, 128}) {
        const bool isDefault = (type == static_cast<int>(WeightType::Q4_1) && s[0] != 49152) ||
                               (type == static_cast<int>(WeightType::Q8_0) && s[0] == 49152);
        // Other types on the square shape only, to keep the run short.
        if (!isDefault && !(s[0] == 576 && s[1] == 576)) continue;
        b->Args({s[0], s[1], n, type});
      }
    }
  }
  b->ArgNames({"rows", "cols", "tok", "type"})->UseRealTime();
}
BENCHMARK(BM_Matmul)->Apply(matmulArgs);

// One matmul per quantized type on Gemma 3 270M's FFN shapes, on either path. Args: rows, cols,
// nTokens, type, path (0: float32 matmul, 1: int8; the int8 time includes quantizing the input,
// as the model does once per input). GB/s counts the stored (= packed) weight bytes.
void BM_MatmulType(benchmark::State& state) {
  const int64_t rows = state.range(0), cols = state.range(1), n = state.range(2);
  const auto type = static_cast<WeightType>(state.range(3));
  const bool int8 = state.range(4) != 0;
  const auto bytes = randomWeights(type, rows, cols, 1);
  const WeightMatrix w{bytes.data(), type, rows, cols};
  std::vector<float> x(static_cast<size_t>(n * cols)), y(static_cast<size_t>(n * rows));
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> dist(-1, 1);
  for (auto& v : x) v = dist(rng);
  ThreadPool pool(0);
  std::unique_ptr<cortex::kernels::PackedWeights> packed;
  if (int8) packed = std::make_unique<cortex::kernels::PackedWeights>(w);
  cortex::kernels::QuantizedActivations xq;
  for (auto _ : state) {
    if (int8) {
      cortex::kernels::quantizeActivations(pool, x.data(), n, cols, xq);
      cortex::kernels::matmul(pool, *packed, xq, y.data());
    } else {
      cortex::kernels::matmul(pool, w, x.data(), n, y.data());
    }
    benchmark::DoNotOptimize(y.data());
  }
  state.SetLabel(std::string(cortex::kernels::toString(type)) + (int8 ? " int8" : " f32"));
  setCounters(state, static_cast<double>(bytes.size()), 2.0 * static_cast<double>(rows * cols * n));
}

void matmulTypeArgs(benchmark::internal::Benchmark* b) {
  const WeightType types[] = {WeightType::Q8_0, WeightType::Q4_0, WeightType::Q4_1,
                              WeightType::Q5_0, WeightType::Q5_1, WeightType::Q2_K,
                              WeightType::Q3_K, WeightType::Q4_K, WeightType::Q5_K,
                              WeightType::Q6_K};
  // ffn_down (640 x 2048, every type) and ffn_up (2048 x 640: not a whole number of 256-column
  // super-blocks, so no K-quant; Gemma's files use Q5_0 there).
  const int64_t shapes[2][2] = {{640, 2048}, {2048, 640}};
  for (int path : {1, 0}) {
    for (const auto& s : shapes) {
      for (WeightType type : types) {
        if (s[1] % cortex::kernels::blockElems(type) != 0) continue;
        for (int64_t n : {1, 64}) b->Args({s[0], s[1], n, static_cast<int64_t>(type), path});
      }
    }
  }
  b->ArgNames({"rows", "cols", "tok", "type", "int8"})->UseRealTime();
}
BENCHMARK(BM_MatmulType)->Apply(matmulTypeArgs);

// One decode step's matmuls over a SmolLM2-135M-shaped model: 30 layers of Q4_1 q,k,v,o,gate,up,
// down plus the Q8_0 output table, ~97 MB, so every byte comes from DRAM. Args: nTokens, path
// (0: float32 matmul, 1: int8, each input quantized once per matmul as the model does).
void BM_ModelSweep(benchmark::State& state) {
  const int64_t n = state.range(0);
  const bool int8 = state.range(1) != 0;
  struct M {
    std::vector<uint8_t> bytes;
    WeightMatrix w;
    std::unique_ptr<cortex::kernels::PackedWeights> packed;
  };
  std::vector<M> mats;
  const int64_t layerShapes[7][2] = {{576, 576},  {192, 576},  {192, 576}, {576, 576},
                                     {1536, 576}, {1536, 576}, {576, 1536}};
  for (int layer = 0; layer < 30; ++layer) {
    for (const auto& s : layerShapes) {
      mats.push_back({randomWeights(WeightType::Q4_1, s[0], s[1], static_cast<uint32_t>(layer)), {}, {}});
      mats.back().w = {mats.back().bytes.data(), WeightType::Q4_1, s[0], s[1]};
    }
  }
  mats.push_back({randomWeights(WeightType::Q8_0, 49152, 576, 99), {}, {}});
  mats.back().w = {mats.back().bytes.data(), WeightType::Q8_0, 49152, 576};
  double bytes = 0, flops = 0;
  for (const auto& m : mats) {
    bytes += static_cast<double>(m.bytes.size());
    flops += 2.0 * static_cast<double>(m.w.rows * m.w.cols * n);
  }
  if (int8) {
    for (auto& m : mats) m.packed = std::make_unique<cortex::kernels::PackedWeights>(m.w);
  }
  std::vector<float> x(static_cast<size_t>(n * 1536), 0.5f), y(static_cast<size_t>(n * 49152));
  cortex::kernels::QuantizedActivations xq;
  ThreadPool pool(0);
  for (auto _ : state) {
    for (const auto& m : mats) {
      if (int8) {
        cortex::kernels::quantizeActivations(pool, x.data(), n, m.w.cols, xq);
        cortex::kernels::matmul(pool, *m.packed, xq, y.data());
      } else {
        cortex::kernels::matmul(pool, m.w, x.data(), n, y.data());
      }
    }
    benchmark::DoNotOptimize(y.data());
  }
  state.SetLabel(int8 ? "int8" : "f32");
  setCounters(state, bytes, flops);
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_ModelSweep)
    ->ArgsProduct({{1, 16, 64, 128}, {0, 1}})
    ->ArgNames({"tok", "int8"})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Attention (9 query heads, 3 KV heads, head dim 64, f16 K/V) over a context of state.range(0)
// tokens in 16-token blocks, for state.range(1) query tokens at its end: 1 is a decode step,
// the context length a whole prefill. GB/s counts the K/V bytes; GFLOP/s the causal QK and PV.
void BM_Attention(benchmark::State& state) {
  const auto ctx = static_cast<int32_t>(state.range(0));
  const auto nq = static_cast<int32_t>(state.range(1));
  const int32_t heads = 9, kvHeads = 3, dim = 64, bs = 16;
  const int32_t nBlocks = (ctx + bs - 1) / bs;
  std::vector<uint16_t> arena(static_cast<size_t>(nBlocks) * kvHeads * bs * dim * 2);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1, 1);
  for (auto& h : arena) h = cortex::floatToHalf(dist(rng));
  std::vector<int32_t> table(nBlocks);
  for (int32_t i = 0; i < nBlocks; ++i) table[i] = (i * 7) % nBlocks;  // scattered if coprime
  cortex::kv::PagedKVView k;
  k.base = reinterpret_cast<const std::byte*>(arena.data());
  k.blockTable = table.data();
  k.numBlocks = nBlocks;
  k.numTokens = ctx;
  k.blockSizeTokens = bs;
  k.numKVHeads = kvHeads;
  k.headDim = dim;
  k.blockStride = 2LL * kvHeads * bs * dim;  // K and V blocks interleaved
  k.headStride = static_cast<int64_t>(bs) * dim;
  k.tokenStride = dim;
  k.dtype = cortex::kv::KVDType::F16;
  auto v = k;
  v.base = k.base + static_cast<size_t>(kvHeads) * bs * dim * 2;
  std::vector<float> q(static_cast<size_t>(nq) * heads * dim), out(q.size());
  for (auto& x : q) x = dist(rng);
  ThreadPool pool(0);
  std::vector<float> scratch(cortex::kernels::pagedAttentionScratchFloats(pool, ctx));
  for (auto _ : state) {
    cortex::kernels::pagedAttention(pool, q.data(), nq, ctx - nq, heads, k, v, 0.125f, out.data(),
                                    scratch.data());
    benchmark::DoNotOptimize(out.data());
  }
  // Key positions attended, summed over the query tokens.
  const double pairs = static_cast<double>(nq) * (ctx - nq) + nq * (nq + 1) / 2.0;
  setCounters(state, 4.0 * ctx * kvHeads * dim, 4.0 * pairs * heads * dim);
}
BENCHMARK(BM_Attention)
    ->Args({128, 1})
    ->Args({1024, 1})
    ->Args({4096, 1})
    ->Args({512, 512})
    ->ArgNames({"ctx", "queries"})
    ->UseRealTime();

// The machine's limits, for the fraction of them the kernels reach (docs/PERF.md), on the pool's
// threads as the kernels run: streaming read bandwidth (1 GiB, far beyond the caches) and the
// peak rate of the integer dot product the int8 matmul is built on (independent vpdpbusd chains,
// 64 multiply-adds each on 512-bit registers; 8 x 32-bit lanes x 4 with AVX-VNNI).
void BM_LimitReadBandwidth(benchmark::State& state) {
  const size_t n = (size_t{1} << 30) / sizeof(uint64_t);
  std::vector<uint64_t> a(n, 1);
  ThreadPool pool(0);
  std::vector<uint64_t> sink(static_cast<size_t>(pool.size()));
  for (auto _ : state) {
    pool.parallelFor(pool.size(), [&](int64_t c, int) {
      const size_t b = n * static_cast<size_t>(c) / static_cast<size_t>(pool.size());
      const size_t e = n * static_cast<size_t>(c + 1) / static_cast<size_t>(pool.size());
      uint64_t x0 = 0, x1 = 0, x2 = 0, x3 = 0;
      for (size_t i = b; i + 4 <= e; i += 4) {
        x0 ^= a[i];
        x1 ^= a[i + 1];
        x2 ^= a[i + 2];
        x3 ^= a[i + 3];
      }
      sink[static_cast<size_t>(c)] = x0 ^ x1 ^ x2 ^ x3;
    });
    benchmark::DoNotOptimize(sink.data());
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(n * sizeof(uint64_t)) / 1e9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_LimitReadBandwidth)->UseRealTime()->Unit(benchmark::kMillisecond);

#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
void BM_LimitInt8Dot(benchmark::State& state) {
  constexpr int64_t kIters = 1 << 22;
  ThreadPool pool(0);
  std::vector<int32_t> sink(static_cast<size_t>(pool.size()));
  for (auto _ : state) {
    pool.parallelFor(pool.size(), [&](int64_t c, int) {
#if defined(__AVX512VNNI__)
      __m512i acc[8];
      for (auto& v : acc) v = _mm512_setzero_si512();
      const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(static_cast<char>(c + 1));
      for (int64_t i = 0; i < kIters; ++i) {
        for (auto& v : acc) v = _mm512_dpbusd_epi32(v, a, b);
      }
      __m512i s = acc[0];
      for (int k = 1; k < 8; ++k) s = _mm512_add_epi32(s, acc[k]);
      int32_t out[16];
      _mm512_storeu_si512(out, s);
      sink[static_cast<size_t>(c)] = out[0];
#else
      __m256i acc[8];
      for (auto& v : acc) v = _mm256_setzero_si256();
      const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(static_cast<char>(c + 1));
      for (int64_t i = 0; i < kIters; ++i) {
        for (auto& v : acc) v = _mm256_dpbusd_avx_epi32(v, a, b);
      }
      int32_t out[8];
      __m256i s = acc[0];
      for (int k = 1; k < 8; ++k) s = _mm256_add_epi32(s, acc[k]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), s);
      sink[static_cast<size_t>(c)] = out[0];
#endif
    });
    benchmark::DoNotOptimize(sink.data());
  }
#if defined(__AVX512VNNI__)
  constexpr double kMacs = 64;
#else
  constexpr double kMacs = 32;
#endif
  state.counters["GMAC/s"] =
      benchmark::Counter(static_cast<double>(pool.size()) * kIters * 8 * kMacs / 1e9,
                         benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_LimitInt8Dot)->UseRealTime()->Unit(benchmark::kMillisecond);
#endif

}  // namespace

BENCHMARK_MAIN();
