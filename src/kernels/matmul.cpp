// The float matmul of one instruction-set level (compiled once per level, see CMakeLists.txt).
#include <algorithm>
#include <vector>

#include "kernels/ggml_blocks.h"
#include "kernels/kernel_set.h"
#include "kernels/matmul.h"
#include "kernels/parallel_ranges.h"
#include "kernels/simd.h"
#include "kernels/thread_pool.h"

namespace cortex::kernels::detail::CS_ISA_NS {
namespace {

// Runs body(r0, r1) over row ranges covering [0, rows), in parallel when the product is big.
template <class Body>
void forRowChunks(ThreadPool& pool, int64_t rows, int64_t unit, int64_t macs, Body&& body) {
  forRanges(pool, rows, unit, macs >= kParallelMinMacs, body);
}

#if !CS_KERNELS_AVX2
template <class Dec>
void scalarRows(const WeightMatrix& W, const float* X, int64_t nTokens, float* Y, int64_t r0,
                int64_t r1) {
  float w[Dec::kElems];
  for (int64_t r = r0; r < r1; ++r) {
    const std::byte* row = W.rowPtr(r);
    for (int64_t t = 0; t < nTokens; ++t) {
      const float* x = X + t * W.cols;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      const std::byte* p = row;
      for (int64_t c = 0; c < W.cols; c += Dec::kElems, p += Dec::kBytes) {
        Dec::scalar(p, w);
        for (int i = 0; i < Dec::kElems; ++i) acc[i & 7] = std::fma(w[i], x[c + i], acc[i & 7]);
      }
      Y[t * W.rows + r] = hsum8(acc);
    }
  }
}

template <class Dec>
void matmulScalarT(ThreadPool& pool, const WeightMatrix& W, const float* X, int64_t nTokens,
                   float* Y) {
  forRowChunks(pool, W.rows, 1, W.rows * W.cols * nTokens, [&](int64_t r0, int64_t r1) {
    scalarRows<Dec>(W, X, nTokens, Y, r0, r1);
  });
}
#endif

#if CS_KERNELS_AVX2

constexpr int kDirectRows = 4;     // rows interleaved by the decode kernel (hides FMA latency)
constexpr int kTileRows = 3;       // prefill micro-tile: 3 rows x 4 tokens = 12 accumulators
constexpr int kTileTokens = 4;
constexpr int64_t kTokenChunk = 32;  // tokens whose activations stay in L2 per dequantized rows
// Token counts below this use the direct kernel (dequantize, then FMA straight from registers);
// above, rows are dequantized once to an L1 buffer and reused by every token tile.
constexpr int64_t kPrefillMinTokens = 4;

// Decode kernel: R rows against one token, weights dequantized in registers.
template <class Dec, int R>
void directRows(const std::byte* row0, size_t rb, int64_t nBlocks, const float* x, float* y,
                int64_t yStride) {
  constexpr int NV = Dec::kElems / 8;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  const std::byte* p = row0;
  for (int64_t b = 0; b < nBlocks; ++b, p += Dec::kBytes, x += Dec::kElems) {
    for (int r = 0; r < R; ++r) {
      // note: the next row group sits R rows further; pulling it in now hides DRAM latency.
      _mm_prefetch(reinterpret_cast<const char*>(p + (r + R) * rb), _MM_HINT_T0);
      __m256 w[NV];
      Dec::avx2(p + r * rb, w);
      for (int k = 0; k < NV; ++k) acc[r] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + 8 * k), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r * yStride] = hsum8(acc[r]);
}

template <class Dec>
void directRange(const WeightMatrix& W, const float* X, int64_t nTokens, float* Y, int64_t r0,
                 int64_t r1) {
  const size_t rb = rowBytes(W.type, W.cols);
  const int64_t nBlocks = W.cols / Dec::kElems;
  int64_t r = r0;
  for (; r + kDirectRows <= r1; r += kDirectRows) {
    for (int64_t t = 0; t < nTokens; ++t) {
      directRows<Dec, kDirectRows>(W.rowPtr(r), rb, nBlocks, X + t * W.cols, Y + t * W.rows + r, 1);
    }
  }
  for (; r < r1; ++r) {
    for (int64_t t = 0; t < nTokens; ++t) {
      directRows<Dec, 1>(W.rowPtr(r), rb, nBlocks, X + t * W.cols, Y + t * W.rows + r, 1);
    }
  }
}

// Prefill micro-kernel: R dequantized rows (w, stride cols) x T tokens.
template <int R, int T>
void tile(const float* w, const float* x, int64_t cols, float* y, int64_t yStride) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t c = 0; c < cols; c += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w + r * cols + c);
    for (int t = 0; t < T; ++t) {
      const __m256 xv = _mm256_loadu_ps(x + t * cols + c);
      for (int r = 0; r < R; ++r) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) y[t * yStride + r] = hsum8(acc[r][t]);
}

template <int R>
void tileTokens(const float* w, const float* x, int64_t cols, int64_t nt, float* y,
                int64_t yStride) {
  int64_t t = 0;
  for (; t + kTileTokens <= nt; t += kTileTokens) {
    tile<R, kTileTokens>(w, x + t * cols, cols, y + t * yStride, yStride);
  }
  switch (nt - t) {
    case 1: tile<R, 1>(w, x + t * cols, cols, y + t * yStride, yStride); break;
    case 2: tile<R, 2>(w, x + t * cols, cols, y + t * yStride, yStride); break;
    case 3: tile<R, 3>(w, x + t * cols, cols, y + t * yStride, yStride); break;
    default: break;
  }
}

template <class Dec>
void prefillRange(const WeightMatrix& W, const float* X, int64_t nTokens, float* Y, int64_t r0,
                  int64_t r1) {
  constexpr int NV = Dec::kElems / 8;
  const int64_t cols = W.cols;
  // note: grows once per thread to the widest matrix; nothing is allocated in steady state.
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < kTileRows * cols) {
    buf.resize(static_cast<size_t>(kTileRows * cols));
  }
  float* wbuf = buf.data();
  for (int64_t t0 = 0; t0 < nTokens; t0 += kTokenChunk) {
    const int64_t nt = std::min(kTokenChunk, nTokens - t0);
    for (int64_t r = r0; r < r1; r += kTileRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kTileRows, r1 - r));
      for (int i = 0; i < nr; ++i) {
        const std::byte* p = W.rowPtr(r + i);
        float* out = wbuf + i * cols;
        for (int64_t c = 0; c < cols; c += Dec::kElems, p += Dec::kBytes) {
          __m256 w[NV];
          Dec::avx2(p, w);
          for (int k = 0; k < NV; ++k) _mm256_storeu_ps(out + c + 8 * k, w[k]);
        }
      }
      const float* x = X + t0 * cols;
      float* y = Y + t0 * W.rows + r;
      switch (nr) {
        case 3: tileTokens<3>(wbuf, x, cols, nt, y, W.rows); break;
        case 2: tileTokens<2>(wbuf, x, cols, nt, y, W.rows); break;
        default: tileTokens<1>(wbuf, x, cols, nt, y, W.rows); break;
      }
    }
  }
}

template <class Dec>
void matmulAvx2T(ThreadPool& pool, const WeightMatrix& W, const float* X, int64_t nTokens,
                 float* Y) {
  forRowChunks(pool, W.rows, 12, W.rows * W.cols * nTokens, [&](int64_t r0, int64_t r1) {
    if (nTokens < kPrefillMinTokens) {
      directRange<Dec>(W, X, nTokens, Y, r0, r1);
    } else {
      prefillRange<Dec>(W, X, nTokens, Y, r0, r1);
    }
  });
}
#endif

template <class Dec>
void run(ThreadPool& pool, const WeightMatrix& W, const float* X, int64_t nTokens, float* Y) {
#if CS_KERNELS_AVX2
  matmulAvx2T<Dec>(pool, W, X, nTokens, Y);
#else
  matmulScalarT<Dec>(pool, W, X, nTokens, Y);
#endif
}

}  // namespace

void matmulFloat(ThreadPool& pool, const WeightMatrix& W, const float* X, int64_t nTokens,
                 float* Y) {
  switch (W.type) {
    case WeightType::F32: return run<DecF32>(pool, W, X, nTokens, Y);
    case WeightType::F16: return run<DecF16>(pool, W, X, nTokens, Y);
    case WeightType::BF16: return run<DecBF16>(pool, W, X, nTokens, Y);
    case WeightType::Q8_0: return run<DecQ8_0>(pool, W, X, nTokens, Y);
    case WeightType::Q4_0: return run<DecQ4_0>(pool, W, X, nTokens, Y);
    case WeightType::Q4_1: return run<DecQ4_1>(pool, W, X, nTokens, Y);
    case WeightType::Q5_0: return run<DecQ5_0>(pool, W, X, nTokens, Y);
    case WeightType::Q5_1: return run<DecQ5_1>(pool, W, X, nTokens, Y);
    case WeightType::Q2_K: return run<DecQ2_K>(pool, W, X, nTokens, Y);
    case WeightType::Q3_K: return run<DecQ3_K>(pool, W, X, nTokens, Y);
    case WeightType::Q4_K: return run<DecQ4_K>(pool, W, X, nTokens, Y);
    case WeightType::Q5_K: return run<DecQ5_K>(pool, W, X, nTokens, Y);
    case WeightType::Q6_K: return run<DecQ6_K>(pool, W, X, nTokens, Y);
  }
}

}  // namespace cortex::kernels::detail::CS_ISA_NS
