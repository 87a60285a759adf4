// Prefix caching in KVCache: exact hits, LRU eviction through whole sequences, the one-token rule,
// events, and a property test in which every position's K/V is a function of its token prefix, so
// any wrong hit, eviction of a block in use or broken copy on write shows up as wrong contents.
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <random>
#include <sstream>

#include "kv/kv_cache.h"
#include "kv_test_util.h"

namespace cortex::kv {
namespace {

using testing::errcOf;
using testing::Ids;
using Tokens = std::vector<int32_t>;

KVCacheConfig tiny(int32_t blocks, int32_t blockSize = 4) {
  KVCacheConfig c;
  c.numLayers = 2;
  c.numKVHeads = 1;
  c.headDim = 2;
  c.blockSizeTokens = blockSize;
  c.numBlocks = blocks;
  c.dtype = KVDType::F32;
  return c;
}

Tokens iota(int32_t n, int32_t from = 100) {
  Tokens t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = from + i;
  return t;
}

TEST(PrefixCache, FullComputedBlocksAreHitAfterTheirOwnerIsFreed) {
  KVCache k(tiny(8));
  const Tokens prompt = iota(10);  // blocks: [0,4) [4,8) and 2 tokens
  ASSERT_EQ(k.tryAllocateWithPrefix(1, prompt, 10), 0);
  EXPECT_EQ(k.cachedPrefixTokens(prompt), 0);  // nothing computed yet
  k.cacheComputedBlocks(1, prompt);
  EXPECT_EQ(k.cachedPrefixTokens(prompt), 8);
  const Ids table = k.blockTable(1);
  k.freeFor(1);
  EXPECT_EQ(k.stats().cachedBlocks, 2);
  EXPECT_EQ(k.stats().usedBlocks, 0);
  // The same prompt: the two full blocks are hit, the last two tokens computed.
  EXPECT_EQ(k.blocksNeededToAllocate(prompt, 10), 3);  // 2 cached hits leave the queue + 1 fresh
  ASSERT_EQ(k.tryAllocateWithPrefix(2, prompt, 10), 8);
  const Ids again = k.blockTable(2);
  EXPECT_EQ(again[0], table[0]);
  EXPECT_EQ(again[1], table[1]);
  EXPECT_EQ(k.stats().cachedBlocks, 0);
  // A running sequence's blocks are shared by a second hit.
  ASSERT_EQ(k.tryAllocateWithPrefix(3, prompt, 12), 8);
  EXPECT_EQ(k.stats().sharedBlocks, 2);
  k.checkInvariants();
}

TEST(PrefixCache, AtLeastOneTokenIsLeftToCompute) {
  KVCache k(tiny(8));
  const Tokens prompt = iota(8);  // exactly two blocks
  ASSERT_EQ(k.tryAllocateWithPrefix(1, prompt, 8), 0);
  k.cacheComputedBlocks(1, prompt);
  k.freeFor(1);
  EXPECT_EQ(k.cachedPrefixTokens(prompt), 8);
  // Two full blocks cached, but the last token must be computed for its logits: one block hit.
  EXPECT_EQ(k.tryAllocateWithPrefix(2, prompt, 8), 4);
  k.checkInvariants();
}

TEST(PrefixCache, DifferentTokensOrSeedsDoNotHit) {
  KVCache k(tiny(8));
  Tokens prompt = iota(9);
  ASSERT_EQ(k.tryAllocateWithPrefix(1, prompt, 9), 0);
  k.cacheComputedBlocks(1, prompt);
  Tokens other = prompt;
  other[5] = 7;  // second block differs
  EXPECT_EQ(k.cachedPrefixTokens(other), 4);
  other[0] = 7;  // first block differs: the chain breaks at once
  EXPECT_EQ(k.cachedPrefixTokens(other), 0);
  KVCacheConfig c = tiny(8);
  c.prefixHashSeed = 1;
  KVCache seeded(c);
  EXPECT_NE(seeded.blockHashes(prompt), k.blockHashes(prompt));
  c.prefixHashSeed = 0;
  c.dtype = KVDType::F16;
  EXPECT_NE(KVCache(c).blockHashes(prompt), k.blockHashes(prompt));
}

TEST(PrefixCache, EvictionTakesEmptyBlocksFirstThenTheLeastRecentlyFreedTail) {
  KVCache k(tiny(6));
  const Tokens a = iota(12, 100);
  const Tokens b = iota(12, 500);
  ASSERT_EQ(k.tryAllocateWithPrefix(1, a, 12), 0);
  k.cacheComputedBlocks(1, a);
  ASSERT_EQ(k.tryAllocateWithPrefix(2, b, 12), 0);
  k.cacheComputedBlocks(2, b);
  k.freeFor(1);  // a's blocks are cached first: a's tail, then its root, are evicted first
  k.freeFor(2);
  EXPECT_EQ(k.stats().cachedBlocks, 6);
  k.recordEvents(true);
  // Two fresh blocks: a's third block, then its second.
  ASSERT_EQ(k.tryAllocateWithPrefix(3, iota(8, 900), 8), 0);
  EXPECT_EQ(k.cachedPrefixTokens(a), 4);
  EXPECT_EQ(k.cachedPrefixTokens(b), 12);
  std::vector<KVEvent> events;
  k.takeEvents(events);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, KVEvent::Kind::BlockRemoved);
  const std::vector<uint64_t> ha = k.blockHashes(a);
  EXPECT_EQ(events[0].blockHashes, (std::vector<uint64_t>{ha[2], ha[1]}));
  k.checkInvariants();
}

TEST(PrefixCache, StoredEventsCarryHashesParentAndTokens) {
  KVCache k(tiny(8));
  k.recordEvents(true);
  const Tokens t = iota(9);
  ASSERT_EQ(k.tryAllocateWithPrefix(1, t, 9), 0);
  k.cacheComputedBlocks(1, std::span(t).first(5));  // one full block
  k.cacheComputedBlocks(1, t);                      // the second
  std::vector<KVEvent> events;
  k.takeEvents(events);
  const std::vector<uint64_t> h = k.blockHashes(t);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].kind, KVEvent::Kind::BlockStored);
  EXPECT_EQ(events[0].blockHashes, (std::vector<uint64_t>{h[0]}));
  EXPECT_FALSE(events[0].parentHash.has_value());
  EXPECT_EQ(events[0].tokenIds, iota(4));
  EXPECT_EQ(events[0].blockSizeTokens, 4);
  EXPECT_EQ(events[1].blockHashes, (std::vector<uint64_t>{h[1]}));
  EXPECT_EQ(events[1].parentHash, h[0]);
  EXPECT_EQ(events[1].tokenIds, iota(4, 104));
  k.freeFor(1);
  EXPECT_EQ(k.resetPrefixCache(), 2);
  events.clear();
  k.takeEvents(events);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, KVEvent::Kind::AllBlocksCleared);
  EXPECT_EQ(k.cachedPrefixTokens(t), 0);
  k.checkInvariants();
}

TEST(PrefixCache, TheSameContentComputedTwiceIsRegisteredOnce) {
  KVCache k(tiny(8));
  const Tokens t = iota(5);
  ASSERT_EQ(k.tryAllocateWithPrefix(1, t, 5), 0);
  ASSERT_EQ(k.tryAllocateWithPrefix(2, t, 5), 0);  // both admitted before either computed
  k.cacheComputedBlocks(1, t);
  k.cacheComputedBlocks(2, t);
  k.checkInvariants();
  k.freeFor(2);  // its copy is unhashed: an empty block again
  EXPECT_EQ(k.stats().cachedBlocks, 0);
  k.freeFor(1);
  EXPECT_EQ(k.stats().cachedBlocks, 1);
  EXPECT_EQ(k.cachedPrefixTokens(t), 4);
  k.checkInvariants();
}

TEST(PrefixCache, OffMeansNoHashesAndNoHits) {
  KVCacheConfig c = tiny(8);
  c.prefixCaching = false;
  KVCache k(c);
  const Tokens t = iota(9);
  ASSERT_EQ(k.tryAllocateWithPrefix(1, t, 9), 0);
  k.cacheComputedBlocks(1, t);
  k.freeFor(1);
  EXPECT_EQ(k.cachedPrefixTokens(t), 0);
  EXPECT_EQ(k.stats().cachedBlocks, 0);
}

TEST(PrefixCache, BlockMapShowsCachedBlocks) {
  KVCache k(tiny(4));
  const Tokens t = iota(9);
  ASSERT_EQ(k.tryAllocateWithPrefix(1, t, 9), 0);
  k.cacheComputedBlocks(1, t);
  k.freeFor(1);
  std::ostringstream os;
  k.dumpBlockMap(os);
  EXPECT_NE(os.str().find(" CC.."), std::string::npos) << os.str();
}

// --- property test ---------------------------------------------------------------------------

// The K value every position gets: a function of the token prefix up to it (as a model's K/V is),
// exact in float32.
float contentOf(const Tokens& tokens, size_t pos) {
  uint32_t h = 17;
  for (size_t i = 0; i <= pos; ++i) h = h * 31u + static_cast<uint32_t>(tokens[i]);
  return static_cast<float>(h % 1000003u);
}

// Seed, block size, and whether layers 0 and 2 have a sliding window (of 2B - 1 tokens, so window
// starts fall inside blocks; a window of 1 at B = 1) around the global layer 1: three groups of
// one layer, two of which give blocks back.
class PrefixCacheProperty
    : public ::testing::TestWithParam<std::tuple<uint64_t, int32_t, bool>> {};

TEST_P(PrefixCacheProperty, HitsAlwaysHoldTheRightContents) {
  const auto [seed, blockSize, windowed] = GetParam();
  const int32_t window = 2 * blockSize - 1;
  KVCacheConfig config = tiny(windowed ? 80 : 40, blockSize);
  config.numLayers = 3;
  if (windowed) config.layerWindows = {window, 0, window};
  KVCache cache(config);
  const int32_t numLayers = config.numLayers;
  ASSERT_EQ(cache.numGroups(), windowed ? 3 : 1);
  std::mt19937_64 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  // Prompts drawn from a few families that share long prefixes.
  std::vector<Tokens> families;
  for (int f = 0; f < 4; ++f) {
    Tokens t;
    for (int i = 0; i < 6 * blockSize; ++i) t.push_back(uniform(0, 3));
    families.push_back(t);
  }
  struct Seq {
    Tokens tokens;         // token ids of all positions
    int32_t computed = 0;  // positions whose K/V are written
  };
  std::map<SeqId, Seq> seqs;
  SeqId nextId = 1;
  int64_t hitTokens = 0;
  int forks = 0;

  auto compute = [&](SeqId id, Seq& s) {
    for (int32_t pos = s.computed; pos < static_cast<int32_t>(s.tokens.size()); ++pos) {
      const float v = contentOf(s.tokens, static_cast<size_t>(pos));
      for (int32_t layer = 0; layer < numLayers; ++layer) {
        const TokenSlot slot = cache.slotFor(id, pos, cache.arena().groupOf(layer));
        const float k[2] = {v, static_cast<float>(layer)};
        const float vv[2] = {-v, 0};
        cache.writeKV(slot, layer, k, vv);
      }
    }
    s.computed = static_cast<int32_t>(s.tokens.size());
    cache.cacheComputedBlocks(id, s.tokens);
  };
  auto pick = [&]() -> SeqId {
    auto it = seqs.begin();
    std::advance(it, uniform(0, static_cast<int>(seqs.size()) - 1));
    return it->first;
  };

  for (int step = 0; step < 1500; ++step) {
    const int op = uniform(0, 9);
    if (op <= 3 || seqs.empty()) {  // a new prompt: family prefix + own suffix
      Tokens t = families[static_cast<size_t>(uniform(0, 3))];
      t.resize(static_cast<size_t>(uniform(1, 6 * blockSize)));
      for (int i = uniform(0, blockSize); i > 0; --i) t.push_back(uniform(0, 3));
      const auto n = static_cast<int32_t>(t.size());
      const int32_t expectHit =
          std::min(cache.cachedPrefixTokens(t), (n - 1) / blockSize * blockSize);
      const int32_t need = cache.blocksNeededToAllocate(t, n);
      const int32_t freeBefore = cache.freeBlocks();
      const SeqId id = nextId++;
      const int32_t hit = cache.tryAllocateWithPrefix(id, t, n);
      if (hit < 0) {
        ASSERT_GT(need, freeBefore);
        ASSERT_FALSE(cache.hasSequence(id));
      } else {
        ASSERT_LE(need, freeBefore);
        ASSERT_EQ(hit, expectHit);
        ASSERT_EQ(cache.freeBlocks(), freeBefore - need);
        hitTokens += hit;
        Seq s{t, hit};
        compute(id, s);
        seqs[id] = s;
      }
    } else if (op <= 5) {  // decode a few tokens
      const SeqId id = pick();
      Seq& s = seqs[id];
      const int32_t n = uniform(1, blockSize + 1);
      // Net of what windows give back: exactly the change in free blocks.
      const int32_t need = cache.blocksNeededToAppend(id, n);
      const int32_t freeBefore = cache.freeBlocks();
      if (!cache.tryAppendTokens(id, n)) {
        ASSERT_GT(need, freeBefore);
        continue;
      }
      if (need > 0) {
        ASSERT_EQ(cache.freeBlocks(), freeBefore - need);
      } else {
        ASSERT_GE(cache.freeBlocks(), freeBefore);
      }
      for (int32_t i = 0; i < n; ++i) s.tokens.push_back(uniform(0, 3));
      compute(id, s);
    } else if (op == 6) {  // fork (n > 1): later appends copy the shared last block
      const SeqId src = pick();
      const SeqId dst = nextId++;
      cache.fork(src, dst);
      seqs[dst] = seqs[src];
      ++forks;
    } else if (op <= 8) {
      const SeqId id = pick();
      cache.freeFor(id);
      seqs.erase(id);
    } else if (uniform(0, 9) == 0) {
      cache.resetPrefixCache();
    }

    cache.checkInvariants();
    for (const auto& [id, s] : seqs) {
      const auto n = static_cast<int32_t>(s.tokens.size());
      ASSERT_EQ(cache.usedTokens(id), n);
      for (int32_t layer = 0; layer < numLayers; ++layer) {
        // What the next query (position n) reads: everything, or its window (n - W, n).
        const int32_t w = windowed && layer != 1 ? window : 0;
        const PagedKVView view = cache.getKView(id, layer);
        for (int32_t p = w == 0 ? 0 : std::max(0, n - w + 1); p < n; ++p) {
          float k = 0;
          std::memcpy(&k, view.row(p, 0), sizeof k);
          ASSERT_EQ(k, contentOf(s.tokens, static_cast<size_t>(p)))
              << "seq " << id << " layer " << layer << " pos " << p << " step " << step;
        }
      }
    }
  }
  EXPECT_GT(hitTokens, 0);
  EXPECT_GT(forks, 0);
  for (const auto& [id, s] : seqs) cache.freeFor(id);
  cache.checkInvariants();
  EXPECT_EQ(cache.freeBlocks(), cache.numBlocks());
  EXPECT_EQ(cache.stats().liveTokens, 0);
}

INSTANTIATE_TEST_SUITE_P(Seeds, PrefixCacheProperty,
                         ::testing::Combine(::testing::Values(1u, 2u, 3u, 4u),
                                            ::testing::Values(1, 4, 16),
                                            ::testing::Bool()));

}  // namespace
}  // namespace cortex::kv
