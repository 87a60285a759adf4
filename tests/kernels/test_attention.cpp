// pagedAttention against a dense double reference, over scattered block tables.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <utility>
#include <random>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "common/half.h"
#include "kernels/attention.h"
#include "kernels/kernel_set.h"
#include "kernels/thread_pool.h"
#include "reference.h"

namespace cortex::kernels {
namespace {

using kv::KVDType;
using kv::PagedKVView;

// K or V of one layer of one sequence: an arena with twice the blocks needed, of which a shuffled
// subset forms the block table, so logical neighbours are never physical neighbours.
struct PagedTensor {
  std::vector<std::byte> arena;
  std::vector<kv::BlockId> table;
  kv::BlockId spare = 0;  // a physical block no table entry uses
  PagedKVView view;

  PagedTensor(bool headMajor, KVDType dtype, int32_t tokens, int32_t heads, int32_t dim,
              int32_t blockSize, uint32_t seed) {
    const int32_t nBlocks = (tokens + blockSize - 1) / blockSize;
    const int32_t physical = 2 * nBlocks + 1;
    std::vector<kv::BlockId> ids(physical);
    std::iota(ids.begin(), ids.end(), 0);
    std::mt19937 rng(seed);
    std::shuffle(ids.begin(), ids.end(), rng);
    table.assign(ids.begin(), ids.begin() + nBlocks);
    spare = ids[static_cast<size_t>(nBlocks)];
    const size_t eb = kv::dtypeBytes(dtype);
    // A row: dim elements, then (Q8) its float scale.
    const int64_t row = dtype == KVDType::Q8 ? dim + 4 : dim;
    arena.resize(static_cast<size_t>(physical) * heads * blockSize * row * eb);
    view.base = arena.data();
    view.blockTable = table.data();
    view.numBlocks = nBlocks;
    view.numTokens = tokens;
    view.blockSizeTokens = blockSize;
    view.numKVHeads = heads;
    view.headDim = dim;
    view.tokenStride = row;
    if (headMajor) {  // [head][block][token][row]
      view.blockStride = static_cast<int64_t>(blockSize) * row;
      view.headStride = static_cast<int64_t>(physical) * blockSize * row;
    } else {  // [block][head][token][row]
      view.headStride = static_cast<int64_t>(blockSize) * row;
      view.blockStride = static_cast<int64_t>(heads) * blockSize * row;
    }
    view.dtype = dtype;
    std::uniform_real_distribution<float> val(-1, 1);
    for (int32_t t = 0; t < tokens; ++t) {
      for (int32_t h = 0; h < heads; ++h) {
        if (dtype == KVDType::Q8) {  // random int8 values in [-127, 127] and a random scale
          std::uniform_int_distribution<int> q(-127, 127);
          for (int32_t d = 0; d < dim; ++d) {
            arena[static_cast<size_t>(offset(t, h, d))] =
                static_cast<std::byte>(static_cast<int8_t>(q(rng)));
          }
          const float scale = std::uniform_real_distribution<float>(0.001f, 1.0f / 127)(rng);
          std::memcpy(arena.data() + offset(t, h, dim), &scale, 4);
          continue;
        }
        for (int32_t d = 0; d < dim; ++d) {
          const float f = val(rng);
          std::byte* p = arena.data() + offset(t, h, d) * eb;
          if (dtype == KVDType::F32) {
            std::memcpy(p, &f, 4);
          } else {
            const uint16_t b = dtype == KVDType::F16 ? floatToHalf(f) : floatToBf16(f);
            std::memcpy(p, &b, 2);
          }
        }
      }
    }
  }

  // Element offset from the documented formula, computed independently of view.row().
  int64_t offset(int32_t t, int32_t h, int32_t d) const {
    return table[t / view.blockSizeTokens] * view.blockStride + h * view.headStride +
           (t % view.blockSizeTokens) * view.tokenStride + d;
  }

  double at(int32_t t, int32_t h, int32_t d) const {
    const auto* p = reinterpret_cast<const uint8_t*>(arena.data());
    const int64_t o = offset(t, h, d);
    switch (view.dtype) {
      case KVDType::F32: {
        float f;
        std::memcpy(&f, p + 4 * o, 4);
        return f;
      }
      case KVDType::F16: return testref::f16(testref::u16(p + 2 * o));
      case KVDType::BF16: return testref::bf16(testref::u16(p + 2 * o));
      case KVDType::Q8: {
        float scale;
        std::memcpy(&scale, p + offset(t, h, view.headDim), 4);
        return static_cast<double>(static_cast<int8_t>(p[o])) * scale;
      }
    }
    return 0;
  }
};

struct Shape {
  int32_t nHeads, nKVHeads, headDim, tokens, blockSize;
};

// Dense causal GQA attention in double; with window > 0 a query at position p sees keys
// [max(0, p - window + 1), p] and the sinks [0, sink).
std::vector<double> reference(const std::vector<float>& q, int32_t nQ, int32_t firstPos,
                              const Shape& s, const PagedTensor& K, const PagedTensor& V,
                              double scale, int32_t window = 0, int32_t sink = 0) {
  const int32_t D = s.headDim, group = s.nHeads / s.nKVHeads;
  std::vector<double> out(static_cast<size_t>(nQ) * s.nHeads * D, 0);
  for (int32_t i = 0; i < nQ; ++i) {
    const int32_t n = firstPos + i + 1;
    const int32_t lo = window > 0 ? std::max(0, n - window) : 0;
    const auto sees = [&](int32_t j) { return j >= lo || (window > 0 && j < sink); };
    for (int32_t h = 0; h < s.nHeads; ++h) {
      const int32_t kvh = h / group;
      const float* qv = q.data() + (static_cast<size_t>(i) * s.nHeads + h) * D;
      std::vector<double> sc(n, -1e300);
      double mx = -1e300;
      for (int32_t j = 0; j < n; ++j) {
        if (!sees(j)) continue;
        double dot = 0;
        for (int32_t d = 0; d < D; ++d) dot += qv[d] * K.at(j, kvh, d);
        sc[j] = dot * scale;
        mx = std::max(mx, sc[j]);
      }
      double sum = 0;
      for (auto& v : sc) sum += (v = std::exp(v - mx));
      double* o = out.data() + (static_cast<size_t>(i) * s.nHeads + h) * D;
      for (int32_t j = 0; j < n; ++j) {
        if (!sees(j)) continue;
        for (int32_t d = 0; d < D; ++d) o[d] += sc[j] / sum * V.at(j, kvh, d);
      }
    }
  }
  return out;
}

const Shape kShapes[] = {
    {6, 2, 64, 45, 16},   // GQA group 3, partial last block
    {4, 4, 128, 33, 8},   // no GQA, headDim over one 64-dim pass
    {3, 1, 16, 20, 4},    // multi-query, tiny blocks
    {9, 3, 64, 70, 16},   // the default model's head layout
    {8, 1, 32, 150, 16},  // group of 8: split into sub-groups of heads per work item
    {2, 1, 24, 19, 16},   // head dim not a multiple of 16 (the 16-lane path falls back)
    {3, 1, 64, 300, 16},  // two chunks of keys: merged per query, split over threads in decode
};

// Tolerance: outputs are convex combinations of V values (|V| <= 1). Scores carry float32 dot
// errors <= (D/8 + 4) * 2^-24 * sum|q k| * scale (< 1e-6 here), which perturb the softmax
// weights relatively by about as much; exp() adds an ulp or two; the weighted sum in key order
// adds n * 2^-24 relative. All together stay well under 1e-5 absolute for n <= 70.
TEST(Attention, MatchesDenseReference) {
  ThreadPool pool(2);
  for (const Shape& s : kShapes) {
    for (KVDType dt : {KVDType::F32, KVDType::F16, KVDType::BF16, KVDType::Q8}) {
      for (bool headMajor : {false, true}) {
        SCOPED_TRACE(testing::Message() << "heads " << s.nHeads << "/" << s.nKVHeads << " D "
                                        << s.headDim << " dtype " << kv::toString(dt)
                                        << (headMajor ? " head-major" : " layer-major"));
        const PagedTensor K(headMajor, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 11);
        const PagedTensor V(headMajor, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 12);
        const float scale = 1.0f / std::sqrt(static_cast<float>(s.headDim));
        std::vector<float> scratch(pagedAttentionScratchFloats(pool, s.tokens));
        // Whole prompt, a later chunk, and one decode step.
        const int32_t cases[3][2] = {{0, s.tokens}, {s.tokens / 2, s.tokens - s.tokens / 2},
                                     {s.tokens - 1, 1}};
        for (const auto& c : cases) {
          const int32_t firstPos = c[0], nQ = c[1];
          const auto q = testref::randomFloats(static_cast<size_t>(nQ) * s.nHeads * s.headDim,
                                               13 + static_cast<uint32_t>(firstPos), -2, 2);
          std::vector<float> out(q.size()), outScalar(q.size());
          pagedAttention(pool, q.data(), nQ, firstPos, s.nHeads, K.view, V.view, scale,
                         out.data(), scratch.data());
          const auto ref = reference(q, nQ, firstPos, s, K, V, scale);
          for (size_t e = 0; e < out.size(); ++e) {
            ASSERT_NEAR(out[e], ref[e], 1e-5) << "first " << firstPos << " element " << e;
          }
          for (Isa isa : supportedIsas()) {
            detail::kernelSet(isa).pagedAttention(pool, q.data(), nQ, firstPos, s.nHeads, K.view,
                                                  V.view, scale, outScalar.data(),
                                                  scratch.data(), 0, 0);
            ASSERT_EQ(std::memcmp(out.data(), outScalar.data(), 4 * out.size()), 0)
                << "the " << toString(isa) << " level differs";
          }
        }
      }
    }
  }
}

// A token's output must be bit-identical whether it is computed in a prefill of the whole prompt,
// in chunks of 3 or 17 tokens, or alone (a decode step, whose key chunks run on several threads
// past 256 keys), on pools of 1, 2 or 3 threads, on every level.
TEST(Attention, BatchAndThreadInvariant) {
  ThreadPool reference(2);
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(2), ThreadPool(3)};
  const Shape shapes[] = {
      {9, 3, 64, 70, 16}, {8, 1, 32, 90, 16}, {4, 4, 16, 40, 4}, {3, 1, 64, 300, 16}};
  for (int c = 0; c < 4 * 4; ++c) {
    const Shape& s = shapes[c / 4];
    const KVDType dt = std::array{KVDType::F32, KVDType::F16, KVDType::BF16, KVDType::Q8}[c % 4];
    SCOPED_TRACE(testing::Message() << kv::toString(dt) << " heads " << s.nHeads);
    const PagedTensor K(false, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 21);
    const PagedTensor V(false, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 22);
    const int64_t rowFloats = static_cast<int64_t>(s.nHeads) * s.headDim;
    const auto q = testref::randomFloats(static_cast<size_t>(s.tokens * rowFloats), 23, -2, 2);
    std::vector<float> fullScratch(pagedAttentionScratchFloats(reference, s.tokens));
    std::vector<float> full(q.size());
    pagedAttention(reference, q.data(), s.tokens, 0, s.nHeads, K.view, V.view, 0.125f,
                   full.data(), fullScratch.data());
    for (ThreadPool& pool : pools) {
      // Sized for this pool: a pool with more threads needs more.
      std::vector<float> scratch(pagedAttentionScratchFloats(pool, s.tokens));
      for (int32_t batch : {1, 3, 17}) {
        std::vector<float> out(static_cast<size_t>(batch * rowFloats)), outScalar(out.size());
        for (int32_t t0 = 0; t0 < s.tokens; t0 += batch) {
          const int32_t n = std::min(batch, s.tokens - t0);
          pagedAttention(pool, q.data() + t0 * rowFloats, n, t0, s.nHeads, K.view, V.view, 0.125f,
                         out.data(), scratch.data());
          ASSERT_EQ(std::memcmp(out.data(), full.data() + t0 * rowFloats, 4 * n * rowFloats), 0)
              << "threads " << pool.size() << " batch " << batch << " at " << t0;
          for (Isa isa : supportedIsas()) {
            detail::kernelSet(isa).pagedAttention(pool, q.data() + t0 * rowFloats, n, t0,
                                                  s.nHeads, K.view, V.view, 0.125f,
                                                  outScalar.data(), scratch.data(), 0, 0);
            ASSERT_EQ(std::memcmp(outScalar.data(), full.data() + t0 * rowFloats,
                                  4 * n * rowFloats),
                      0)
                << toString(isa) << " level, threads " << pool.size() << " batch " << batch
                << " at " << t0;
          }
        }
      }
    }
  }
}

// A sliding window: against the reference; every level, batch split and thread count gives the
// bits of the whole-prompt call; and keys before the window are never read (their blocks are
// poisoned with NaN, which would reach the output through any score or value read).
TEST(Attention, SlidingWindowMatchesReferenceAndNeverReadsOutside) {
  ThreadPool reference2(2);
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(3)};
  const Shape shapes[] = {{3, 1, 64, 300, 16}, {6, 2, 64, 45, 16}, {4, 4, 16, 530, 8}};
  for (const Shape& s : shapes) {
    for (int32_t window : {1, 5, 16, 100, 260, 1000}) {
      SCOPED_TRACE(testing::Message() << "tokens " << s.tokens << " window " << window);
      PagedTensor K(false, KVDType::F16, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 31);
      PagedTensor V(false, KVDType::F16, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 32);
      const int64_t rowFloats = static_cast<int64_t>(s.nHeads) * s.headDim;
      const auto q = testref::randomFloats(static_cast<size_t>(s.tokens * rowFloats), 33, -2, 2);
      std::vector<float> scratch(pagedAttentionScratchFloats(pools[1], s.tokens));
      std::vector<float> full(q.size());
      pagedAttention(reference2, q.data(), s.tokens, 0, s.nHeads, K.view, V.view, 0.125f,
                     full.data(), scratch.data(), window);
      const auto ref = reference(q, s.tokens, 0, s, K, V, 0.125, window);
      for (size_t e = 0; e < full.size(); ++e) ASSERT_NEAR(full[e], ref[e], 1e-5) << e;
      for (ThreadPool& pool : pools) {
        for (int32_t batch : {1, 7}) {
          std::vector<float> out(static_cast<size_t>(batch * rowFloats));
          for (int32_t t0 = 0; t0 < s.tokens; t0 += batch) {
            const int32_t n = std::min(batch, s.tokens - t0);
            for (Isa isa : supportedIsas()) {
              detail::kernelSet(isa).pagedAttention(pool, q.data() + t0 * rowFloats, n, t0,
                                                    s.nHeads, K.view, V.view, 0.125f, out.data(),
                                                    scratch.data(), window, 0);
              ASSERT_EQ(std::memcmp(out.data(), full.data() + t0 * rowFloats, 4 * n * rowFloats), 0)
                  << toString(isa) << " threads " << pool.size() << " batch " << batch << " at " << t0;
            }
          }
        }
      }
      // Poison every block wholly before the last token's window, then decode the last token.
      const int32_t last = s.tokens - 1;
      const int32_t lo = std::max(0, last - window + 1);
      for (int32_t t = 0; t < (lo / s.blockSize) * s.blockSize; ++t) {
        for (int32_t h = 0; h < s.nKVHeads; ++h) {
          for (int32_t d = 0; d < s.headDim; ++d) {
            const uint16_t nan = 0x7e00;
            std::memcpy(K.arena.data() + 2 * K.offset(t, h, d), &nan, 2);
            std::memcpy(V.arena.data() + 2 * V.offset(t, h, d), &nan, 2);
          }
        }
      }
      std::vector<float> out(static_cast<size_t>(rowFloats));
      for (ThreadPool& pool : pools) {
        pagedAttention(pool, q.data() + last * rowFloats, 1, last, s.nHeads, K.view, V.view,
                       0.125f, out.data(), scratch.data(), window);
        ASSERT_EQ(std::memcmp(out.data(), full.data() + last * rowFloats, 4 * rowFloats), 0);
      }
    }
  }
}

// A copy of a tensor whose logical blocks [b0, b1) are gone. With noBlock their table entries are
// kv::kNoBlock and the copy of the arena starts right after unreadable pages, which hold block -1
// of every head in the layer-major layout, so there any read of a gone block faults. Otherwise the
// entries name a spare block of NaN (Q8: NaN row scales), which a read carries to the output.
class GappedCopy {
 public:
  GappedCopy(const PagedTensor& t, int32_t b0, int32_t b1, bool noBlock)
      : table_(t.table), view_(t.view) {
    const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t eb = kv::dtypeBytes(t.view.dtype);
    guard_ = (static_cast<size_t>(t.view.blockStride) * eb + page - 1) / page * page;
    bytes_ = guard_ + t.arena.size();
    void* map = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) throw std::runtime_error("mmap failed");
    map_ = static_cast<std::byte*>(map);
    std::byte* arena = map_ + guard_;
    std::memcpy(arena, t.arena.data(), t.arena.size());
    const PagedKVView& v = t.view;
    for (int32_t h = 0; h < v.numKVHeads && !noBlock; ++h) {
      for (int32_t tok = 0; tok < v.blockSizeTokens; ++tok) {
        const int64_t row = t.spare * v.blockStride + h * v.headStride + tok * v.tokenStride;
        std::byte* p = arena + row * static_cast<int64_t>(eb);
        switch (v.dtype) {
          case KVDType::F32:
            for (int32_t d = 0; d < v.headDim; ++d) {
              const float nan = std::numeric_limits<float>::quiet_NaN();
              std::memcpy(p + 4 * d, &nan, 4);
            }
            break;
          case KVDType::F16:
          case KVDType::BF16:
            for (int32_t d = 0; d < v.headDim; ++d) {
              const uint16_t nan = v.dtype == KVDType::F16 ? 0x7e00 : 0x7fc0;
              std::memcpy(p + 2 * d, &nan, 2);
            }
            break;
          case KVDType::Q8: {
            const float nan = std::numeric_limits<float>::quiet_NaN();
            std::memcpy(p + v.headDim, &nan, 4);
            break;
          }
        }
      }
    }
    if (mprotect(map_, guard_, PROT_NONE) != 0) throw std::runtime_error("mprotect failed");
    for (int32_t b = b0; b < b1; ++b) {
      table_[static_cast<size_t>(b)] = noBlock ? kv::kNoBlock : t.spare;
    }
    view_.base = arena;
    view_.blockTable = table_.data();
  }
  ~GappedCopy() { munmap(map_, bytes_); }
  GappedCopy(const GappedCopy&) = delete;
  GappedCopy& operator=(const GappedCopy&) = delete;

  const PagedKVView& view() const { return view_; }

 private:
  std::vector<kv::BlockId> table_;
  PagedKVView view_;
  std::byte* map_ = nullptr;
  size_t guard_ = 0, bytes_ = 0;
};

struct SinkCase {
  Shape shape;
  int32_t window, sink;
};

// The blocks wholly between the sinks and the window of a query at position p: [b0, b1).
void gapBlocks(int32_t p, int32_t window, int32_t sink, int32_t blockSize, int32_t& b0,
               int32_t& b1) {
  const int32_t lo = std::max(0, p - window + 1);
  b0 = (sink + blockSize - 1) / blockSize;
  b1 = lo > sink ? std::max(b0, lo / blockSize) : b0;
}

// Attention sinks with a sliding window: against the reference (the keys [0, sink) and the window);
// and the keys between them are never read: a call whose queries all skip some blocks gets a view
// where those blocks are kv::kNoBlock over unreadable memory (layer-major) or NaN (head-major), and
// still gives the whole-prompt call's bits on every level and thread count (one query over several
// chunks takes the parallel decode path on 3 threads).
TEST(Attention, SinksMatchReferenceAndNeverReadTheGap) {
  ThreadPool reference2(2);
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(3)};
  const SinkCase cases[] = {
      {{3, 1, 64, 300, 16}, 100, 4},  // a gap inside chunk 0 (sinks [0, 4), window from 51 at 150)
      {{3, 1, 64, 300, 16}, 100, 5},  // tile 104..107: 104 has no gap, 105 has one
      {{3, 1, 64, 300, 16}, 50, 20},  // sinks end inside a block; tile 68..71 is mixed
      {{3, 1, 64, 400, 16}, 260, 30}, // a window over two chunks; tile 288..291 is mixed
      {{4, 4, 16, 700, 8}, 64, 300},  // two sink chunks, the second partial, ending inside a block
      {{4, 4, 16, 700, 8}, 200, 256}, // the sinks are chunk 0
      {{6, 2, 64, 45, 16}, 5, 3},
      {{6, 2, 64, 45, 16}, 1, 1},     // the query itself and key 0; tile 0..3 is mixed
      {{8, 1, 32, 150, 16}, 40, 7},   // a group of 8 heads (sub-groups); tile 44..47 is mixed
  };
  int index = 0;
  for (const SinkCase& c : cases) {
    const Shape& s = c.shape;
    const bool headMajor = index % 2 == 1;
    const KVDType dt = index % 3 == 2 ? KVDType::Q8 : KVDType::F16;
    ++index;
    SCOPED_TRACE(testing::Message() << "tokens " << s.tokens << " window " << c.window << " sinks "
                                    << c.sink << " " << kv::toString(dt)
                                    << (headMajor ? " head-major" : " layer-major"));
    const PagedTensor K(headMajor, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 41);
    const PagedTensor V(headMajor, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 42);
    const int64_t rowFloats = static_cast<int64_t>(s.nHeads) * s.headDim;
    const auto q = testref::randomFloats(static_cast<size_t>(s.tokens * rowFloats), 43, -2, 2);
    std::vector<float> scratch(pagedAttentionScratchFloats(pools[1], s.tokens));
    std::vector<float> full(q.size());
    pagedAttention(reference2, q.data(), s.tokens, 0, s.nHeads, K.view, V.view, 0.125f,
                   full.data(), scratch.data(), c.window, c.sink);
    const auto ref = reference(q, s.tokens, 0, s, K, V, 0.125, c.window, c.sink);
    for (size_t e = 0; e < full.size(); ++e) ASSERT_NEAR(full[e], ref[e], 1e-5) << e;

    // Calls ending at the last token and two thirds in, of 1 and 6 queries, without the blocks
    // their first query skips.
    int gapped = 0;
    for (int32_t last : {s.tokens - 1, s.tokens * 2 / 3}) {
      for (int32_t nQ : {1, 6}) {
        const int32_t first = last - nQ + 1;
        int32_t b0, b1;
        gapBlocks(first, c.window, c.sink, s.blockSize, b0, b1);
        gapped += b1 > b0;
        const GappedCopy gk(K, b0, b1, !headMajor), gv(V, b0, b1, !headMajor);
        std::vector<float> out(static_cast<size_t>(nQ * rowFloats));
        for (ThreadPool& pool : pools) {
          for (Isa isa : supportedIsas()) {
            detail::kernelSet(isa).pagedAttention(pool, q.data() + first * rowFloats, nQ, first,
                                                  s.nHeads, gk.view(), gv.view(), 0.125f,
                                                  out.data(), scratch.data(), c.window, c.sink);
            ASSERT_EQ(std::memcmp(out.data(), full.data() + first * rowFloats, 4 * out.size()), 0)
                << toString(isa) << " threads " << pool.size() << " queries " << first << ".."
                << last << " without blocks " << b0 << ".." << b1;
          }
        }
      }
    }
    EXPECT_GT(gapped, 0);
  }
}

// With sinks, a token's output is still bit-identical whether computed in a prefill of the whole
// prompt, in batches of 4 or 17 tokens starting anywhere, or alone, on 1 or 3 threads, on every
// level.
TEST(Attention, SinksBatchAndThreadInvariant) {
  ThreadPool reference2(2);
  ThreadPool pools[] = {ThreadPool(1), ThreadPool(3)};
  const SinkCase cases[] = {
      {{3, 1, 64, 300, 16}, 100, 20}, {{4, 4, 16, 700, 8}, 64, 300}, {{9, 3, 64, 70, 16}, 20, 6}};
  for (const SinkCase& c : cases) {
    const Shape& s = c.shape;
    // The sink ranges do not depend on the format (BatchAndThreadInvariant covers all four).
    for (KVDType dt : {KVDType::F16, KVDType::Q8}) {
      SCOPED_TRACE(testing::Message() << "tokens " << s.tokens << " window " << c.window
                                      << " sinks " << c.sink << " " << kv::toString(dt));
      const PagedTensor K(false, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 51);
      const PagedTensor V(false, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 52);
      const int64_t rowFloats = static_cast<int64_t>(s.nHeads) * s.headDim;
      const auto q = testref::randomFloats(static_cast<size_t>(s.tokens * rowFloats), 53, -2, 2);
      std::vector<float> scratch(pagedAttentionScratchFloats(pools[1], s.tokens));
      std::vector<float> full(q.size());
      pagedAttention(reference2, q.data(), s.tokens, 0, s.nHeads, K.view, V.view, 0.125f,
                     full.data(), scratch.data(), c.window, c.sink);
      for (ThreadPool& pool : pools) {
        // Batches of `batch` tokens after a first one of `lead` tokens.
        for (const auto& [batch, lead] : {std::pair{1, 1}, std::pair{4, 2}, std::pair{17, 9}}) {
          std::vector<float> out(static_cast<size_t>(batch * rowFloats));
          for (int32_t t0 = 0; t0 < s.tokens;) {
            const int32_t n = std::min(t0 == 0 ? lead : batch, s.tokens - t0);
            for (Isa isa : supportedIsas()) {
              detail::kernelSet(isa).pagedAttention(pool, q.data() + t0 * rowFloats, n, t0,
                                                    s.nHeads, K.view, V.view, 0.125f, out.data(),
                                                    scratch.data(), c.window, c.sink);
              ASSERT_EQ(std::memcmp(out.data(), full.data() + t0 * rowFloats, 4 * n * rowFloats),
                        0)
                  << toString(isa) << " threads " << pool.size() << " batch " << batch << " at "
                  << t0;
            }
            t0 += n;
          }
        }
      }
    }
  }
}

// A query whose window starts at or before the end of the sinks reads [0, p] in full attention's
// chunks: its bits are those of window 0, whatever the batch, level or thread count. Sinks without
// a window change nothing.
TEST(Attention, SinksWithoutAGapGiveFullAttentionBits) {
  ThreadPool reference2(2), three(3);
  const Shape s{3, 1, 64, 600, 16};
  for (KVDType dt : {KVDType::F16, KVDType::Q8}) {
    const PagedTensor K(false, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 61);
    const PagedTensor V(false, dt, s.tokens, s.nKVHeads, s.headDim, s.blockSize, 62);
    const int64_t rowFloats = static_cast<int64_t>(s.nHeads) * s.headDim;
    const auto q = testref::randomFloats(static_cast<size_t>(s.tokens * rowFloats), 63, -2, 2);
    std::vector<float> scratch(pagedAttentionScratchFloats(three, s.tokens));
    std::vector<float> dense(q.size()), out(q.size());
    pagedAttention(reference2, q.data(), s.tokens, 0, s.nHeads, K.view, V.view, 0.125f,
                   dense.data(), scratch.data());
    pagedAttention(reference2, q.data(), s.tokens, 0, s.nHeads, K.view, V.view, 0.125f,
                   out.data(), scratch.data(), 0, 50);
    ASSERT_EQ(std::memcmp(out.data(), dense.data(), 4 * out.size()), 0) << "sinks, no window";
    // (window, sinks): no gap up to position 349, then a gap; no gap up to 399 with two sink
    // chunks.
    for (const auto& [window, sink] : {std::pair{200, 150}, std::pair{100, 300}}) {
      SCOPED_TRACE(testing::Message() << kv::toString(dt) << " window " << window << " sinks "
                                      << sink);
      pagedAttention(reference2, q.data(), s.tokens, 0, s.nHeads, K.view, V.view, 0.125f,
                     out.data(), scratch.data(), window, sink);
      const int32_t lastNoGap = sink + window - 1;
      for (int32_t p = 0; p < s.tokens; ++p) {
        const int cmp = std::memcmp(out.data() + p * rowFloats, dense.data() + p * rowFloats,
                                    4 * rowFloats);
        if (p <= lastNoGap) {
          ASSERT_EQ(cmp, 0) << "position " << p;
        } else if (p == lastNoGap + 1 || p == s.tokens - 1) {
          EXPECT_NE(cmp, 0) << "position " << p << " has a gap";
        }
      }
      // Alone (a decode step over two chunks: parallel on 3 threads) and in a batch from 255.
      for (const auto& [first, nQ] :
           {std::pair{lastNoGap, 1}, std::pair{300, 1}, std::pair{255, 9}}) {
        for (ThreadPool* pool : {&reference2, &three}) {
          for (Isa isa : supportedIsas()) {
            detail::kernelSet(isa).pagedAttention(*pool, q.data() + first * rowFloats, nQ, first,
                                                  s.nHeads, K.view, V.view, 0.125f, out.data(),
                                                  scratch.data(), window, sink);
            ASSERT_EQ(std::memcmp(out.data(), dense.data() + first * rowFloats,
                                  4 * static_cast<size_t>(nQ * rowFloats)),
                      0)
                << toString(isa) << " threads " << pool->size() << " at " << first;
          }
        }
      }
    }
  }
}

TEST(Attention, ScratchGrowsWithThePoolAndTheKeys) {
  ThreadPool one(1), three(3);
  EXPECT_GT(pagedAttentionScratchFloats(one, 1), 0u);
  EXPECT_GE(pagedAttentionScratchFloats(three, 100), pagedAttentionScratchFloats(one, 100));
  EXPECT_GE(pagedAttentionScratchFloats(three, 100), pagedAttentionScratchFloats(three, 50));
}

TEST(Attention, RejectsInconsistentShapes) {
  ThreadPool pool(2);
  const PagedTensor K(false, KVDType::F32, 10, 2, 16, 4, 1);
  std::vector<float> q(3 * 16), out(q.size()), scratch(pagedAttentionScratchFloats(pool, 16));
  // 3 query heads are not a multiple of 2 KV heads.
  EXPECT_THROW(
      pagedAttention(pool, q.data(), 1, 0, 3, K.view, K.view, 1, out.data(), scratch.data()),
      std::invalid_argument);
  // Positions beyond the view.
  EXPECT_THROW(
      pagedAttention(pool, q.data(), 1, 10, 2, K.view, K.view, 1, out.data(), scratch.data()),
      std::invalid_argument);
  // Negative window or sinks.
  EXPECT_THROW(pagedAttention(pool, q.data(), 1, 0, 2, K.view, K.view, 1, out.data(),
                              scratch.data(), -1),
               std::invalid_argument);
  EXPECT_THROW(pagedAttention(pool, q.data(), 1, 0, 2, K.view, K.view, 1, out.data(),
                              scratch.data(), 4, -1),
               std::invalid_argument);
}

}  // namespace
}  // namespace cortex::kernels
