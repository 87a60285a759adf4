// Property test: long random sequences of allocate / append / fork / free against a simple
// reference model (each sequence is a list of token values), with checkInvariants() after every
// step and every sequence's K/V contents compared through its views.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "kv/kv_cache.h"

namespace cortex::kv {
namespace {

struct Model {
  std::map<SeqId, std::vector<float>> seqs;  // token values in position order
};

class KVProperty : public ::testing::TestWithParam<std::tuple<uint64_t, KVLayout, int32_t>> {};

TEST_P(KVProperty, RandomOperationsMatchTheReference) {
  const auto [seed, layout, blockSize] = GetParam();
  KVCacheConfig c;
  c.numLayers = 2;
  c.numKVHeads = 1;
  c.headDim = 2;
  c.blockSizeTokens = blockSize;
  c.numBlocks = 24;
  c.dtype = KVDType::F32;  // token values are integers: exact
  c.layout = layout;
  KVCache cache(c);
  Model model;
  std::mt19937_64 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  float nextValue = 1;
  SeqId nextId = 1;

  auto writeTokens = [&](SeqId s, int32_t first, int32_t n) {
    for (int32_t pos = first; pos < first + n; ++pos) {
      const float v = nextValue++;
      model.seqs[s].push_back(v);
      const TokenSlot slot = cache.slotFor(s, pos);
      for (int32_t layer = 0; layer < c.numLayers; ++layer) {
        const float k[2] = {v, static_cast<float>(layer)};
        const float vv[2] = {-v, static_cast<float>(layer)};
        cache.writeKV(slot, layer, k, vv);
      }
    }
  };
  auto snapshot = [&] {
    std::map<SeqId, std::vector<BlockId>> tables;
    for (const auto& [s, _] : model.seqs) tables[s] = cache.blockTable(s);
    return std::make_pair(tables, cache.freeBlocks());
  };
  auto pick = [&]() -> SeqId {
    auto it = model.seqs.begin();
    std::advance(it, uniform(0, static_cast<int>(model.seqs.size()) - 1));
    return it->first;
  };
  // Blocks an append needs, computed from the tables alone.
  auto expectedNeed = [&](SeqId s, int32_t n) {
    const int32_t t = static_cast<int32_t>(model.seqs[s].size());
    int32_t need = cache.blocksForTokens(t + n) - cache.blocksForTokens(t);
    if (t % blockSize != 0) {
      const BlockId last = cache.blockTable(s).back();
      int owners = 0;
      for (const auto& [o, _] : model.seqs) {
        for (BlockId b : cache.blockTable(o)) owners += b == last ? 1 : 0;
      }
      need += owners > 1 ? 1 : 0;
    }
    return need;
  };

  int outOfBlocks = 0;
  int forks = 0;
  for (int step = 0; step < 3000; ++step) {
    const int op = uniform(0, 9);
    if (op <= 1 || model.seqs.empty()) {  // allocate
      const int32_t n = uniform(1, 3 * blockSize);
      const SeqId s = nextId++;
      const bool fits = cache.blocksForTokens(n) <= cache.freeBlocks();
      const auto before = snapshot();
      try {
        cache.allocateFor(s, n);
        ASSERT_TRUE(fits);
        model.seqs[s];
        writeTokens(s, 0, n);
      } catch (const KVError& e) {
        ASSERT_EQ(e.code(), KVErrc::OutOfBlocks);
        ASSERT_FALSE(fits);
        ASSERT_EQ(snapshot(), before);
        ++outOfBlocks;
      }
    } else if (op <= 5) {  // append
      const SeqId s = pick();
      const int32_t n = uniform(0, 3) == 0 ? uniform(1, 2 * blockSize) : 1;
      const int32_t need = expectedNeed(s, n);
      ASSERT_EQ(cache.blocksNeededToAppend(s, n), need);
      const int32_t freeBefore = cache.freeBlocks();
      const auto before = snapshot();
      try {
        const int32_t first = cache.appendTokens(s, n);
        ASSERT_LE(need, freeBefore);
        ASSERT_EQ(first, static_cast<int32_t>(model.seqs[s].size()));
        ASSERT_EQ(cache.freeBlocks(), freeBefore - need);
        writeTokens(s, first, n);
      } catch (const KVError& e) {
        ASSERT_EQ(e.code(), KVErrc::OutOfBlocks);
        ASSERT_GT(need, freeBefore);
        ASSERT_EQ(snapshot(), before);
        ++outOfBlocks;
      }
    } else if (op <= 6) {  // fork
      const SeqId src = pick();
      const SeqId dst = nextId++;
      const int32_t freeBefore = cache.freeBlocks();
      cache.fork(src, dst);
      ASSERT_EQ(cache.freeBlocks(), freeBefore);
      model.seqs[dst] = model.seqs[src];
      ++forks;
    } else {  // free (sometimes an id that is gone)
      const SeqId s = uniform(0, 4) == 0 ? nextId + 100 : pick();
      const bool existed = model.seqs.erase(s) == 1;
      ASSERT_EQ(cache.freeFor(s), existed);
    }

    cache.checkInvariants();
    ASSERT_EQ(cache.getNumAllocatedSequences(), static_cast<int32_t>(model.seqs.size()));
    std::set<BlockId> distinct;
    for (const auto& [s, values] : model.seqs) {
      const int32_t n = static_cast<int32_t>(values.size());
      ASSERT_EQ(cache.usedTokens(s), n);
      ASSERT_EQ(cache.getTokenOffsetInBlock(s), n % blockSize);
      const std::vector<BlockId> table = cache.blockTable(s);
      distinct.insert(table.begin(), table.end());
      for (int32_t layer = 0; layer < c.numLayers; ++layer) {
        std::vector<float> k(static_cast<size_t>(n) * 2), v(static_cast<size_t>(n) * 2);
        gather(cache.getKView(s, layer), k.data());
        gather(cache.getVView(s, layer), v.data());
        for (int32_t p = 0; p < n; ++p) {
          ASSERT_EQ(k[p * 2], values[p]) << "seq " << s << " pos " << p << " step " << step;
          ASSERT_EQ(k[p * 2 + 1], static_cast<float>(layer));
          ASSERT_EQ(v[p * 2], -values[p]);
        }
      }
    }
    ASSERT_EQ(cache.usedBlocks(), static_cast<int32_t>(distinct.size()));
  }
  // The run must have exercised the interesting paths.
  EXPECT_GT(outOfBlocks, 0);
  EXPECT_GT(forks, 0);
  for (const auto& [s, _] : model.seqs) cache.freeFor(s);
  cache.checkInvariants();
  EXPECT_EQ(cache.freeBlocks(), c.numBlocks);
  EXPECT_EQ(cache.stats().liveTokens, 0);
}

INSTANTIATE_TEST_SUITE_P(Seeds, KVProperty,
                         ::testing::Combine(::testing::Values(1u, 2u, 3u),
                                            ::testing::Values(KVLayout::LayerMajor,
                                                              KVLayout::HeadMajor),
                                            ::testing::Values(1, 4, 16)));

}  // namespace
}  // namespace cortex::kv
