// The hybrid KV cache: how layers are grouped by window, the sizes that follow, windowed groups
// giving blocks back as a sequence grows (exact tables, the pool's count, the block arithmetic),
// prefix hits that need each window's blocks, events of the first group only, and fork/copy on
// write across groups. The random interleavings (with hits and forks) are in
// test_prefix_cache.cpp's property test, run with and without windows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include "kv/kv_cache.h"
#include "kv_test_util.h"

namespace cortex::kv {
namespace {

using testing::errcOf;
using testing::Ids;
using Tokens = std::vector<int32_t>;

// Gemma 3's pattern: every sixth layer global, the others windowed.
std::vector<int32_t> gemmaWindows(int32_t layers, int32_t window) {
  std::vector<int32_t> w(static_cast<size_t>(layers), window);
  for (int32_t l = 5; l < layers; l += 6) w[static_cast<size_t>(l)] = 0;
  return w;
}

// Two layers: 0 windowed (window tokens), 1 global; blocks of 4 tokens.
KVCacheConfig twoLayers(int32_t window, int32_t blocks) {
  KVCacheConfig c;
  c.numLayers = 2;
  c.numKVHeads = 1;
  c.headDim = 2;
  c.blockSizeTokens = 4;
  c.numBlocks = blocks;
  c.dtype = KVDType::F32;
  c.layerWindows = {window, 0};
  return c;
}

Tokens iota(int32_t n, int32_t from = 100) {
  Tokens t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = from + i;
  return t;
}

TEST(KVGroups, GemmaLayersGroupByWindowInThrees) {
  KVCacheConfig c;
  c.numLayers = 18;
  c.layerWindows = gemmaWindows(18, 512);
  const KVGroups g = kvGroups(c);
  // 3 global layers and 15 windowed ones: gcd 3, one global group then five windowed.
  ASSERT_EQ(g.layersPerGroup, 3);
  ASSERT_EQ(g.groups.size(), 6u);
  EXPECT_EQ(g.groups[0].window, 0);
  EXPECT_EQ(g.groups[0].layers, (std::vector<int32_t>{5, 11, 17}));
  EXPECT_EQ(g.groups[1].layers, (std::vector<int32_t>{0, 1, 2}));
  EXPECT_EQ(g.groups[2].layers, (std::vector<int32_t>{3, 4, 6}));
  for (size_t i = 1; i < 6; ++i) EXPECT_EQ(g.groups[i].window, 512);
  EXPECT_EQ(g.places[11].group, 0);
  EXPECT_EQ(g.places[11].slot, 1);
  EXPECT_EQ(g.places[6].group, 2);
  EXPECT_EQ(g.places[6].slot, 2);
}

TEST(KVGroups, UnevenCountsGiveGroupsOfTheirGcdAndOffMeansOneGroup) {
  KVCacheConfig c;
  c.numLayers = 26;  // Gemma 3 1B: 4 global, 22 windowed -> groups of 2
  c.layerWindows = gemmaWindows(26, 512);
  EXPECT_EQ(kvGroups(c).layersPerGroup, 2);
  EXPECT_EQ(kvGroups(c).groups.size(), 13u);
  c.numLayers = 6;  // 1 global, 5 windowed -> groups of 1
  c.layerWindows = gemmaWindows(6, 8);
  EXPECT_EQ(kvGroups(c).layersPerGroup, 1);
  EXPECT_EQ(kvGroups(c).groups.size(), 6u);
  c.layerWindows = {4, 8, 4, 8, 0, 0};  // two windows and global: pairs
  const KVGroups two = kvGroups(c);
  ASSERT_EQ(two.groups.size(), 3u);
  EXPECT_EQ(two.groups[0].window, 0);
  EXPECT_EQ(two.groups[1].window, 4);
  EXPECT_EQ(two.groups[2].window, 8);
  c.hybrid = false;
  EXPECT_EQ(kvGroups(c).groups.size(), 1u);
  EXPECT_EQ(kvGroups(c).layersPerGroup, 6);
  c.hybrid = true;
  c.layerWindows.clear();
  EXPECT_EQ(kvGroups(c).groups.size(), 1u);
  c.layerWindows = {0, 0};
  EXPECT_EQ(errcOf([&] { kvGroups(c); }), KVErrc::InvalidArgument);  // 2 entries, 6 layers
  c.layerWindows = {0, 0, 0, 0, 0, -1};
  EXPECT_EQ(errcOf([&] { kvGroups(c); }), KVErrc::InvalidArgument);
}

TEST(KVGroups, SizesFollowTheGroups) {
  KVCacheConfig c;
  c.numLayers = 18;
  c.numKVHeads = 1;
  c.headDim = 256;
  c.blockSizeTokens = 16;
  c.layerWindows = gemmaWindows(18, 512);
  // A block: 3 layers x (K + V) x 256 dims x 2 bytes x 16 tokens.
  EXPECT_EQ(bytesPerBlock(c), 3u * 2 * 256 * 2 * 16);
  // 4096 tokens in steps of 512: the global group holds 256 blocks; a windowed one the window and
  // a step, 511 + 512 positions, at most ceil(1022 / 16) + 1 = 65 blocks.
  EXPECT_EQ(blocksForSequence(c, 4096, 512), 256 + 5 * 65);
  // Decoding (steps of 1): 512 positions, at most 33 blocks.
  EXPECT_EQ(blocksForSequence(c, 4096, 1), 256 + 5 * 33);
  // Short sequences: every group holds every position.
  EXPECT_EQ(blocksForSequence(c, 100, 512), 6 * 7);
  c.hybrid = false;
  EXPECT_EQ(bytesPerBlock(c), 18u * 2 * 256 * 2 * 16);
  EXPECT_EQ(blocksForSequence(c, 4096, 512), 256);
}

TEST(HybridKV, WindowedGroupGivesBackTheBlocksItsWindowLeftBehind) {
  KVCache k(twoLayers(6, 32));  // window 6: the query at T reads T-5..T
  ASSERT_EQ(k.numGroups(), 2);
  const int32_t g0 = k.arena().groupOf(1);  // the global layer's group
  const int32_t gw = k.arena().groupOf(0);
  EXPECT_EQ(g0, 0);
  EXPECT_EQ(gw, 1);
  k.allocateFor(1, 8);  // positions 0..7: blocks 0 and 1 in both groups
  EXPECT_EQ(k.usedBlocks(), 4);
  // Appending position 8: its query reads 3..8, so nothing is given back yet.
  k.appendTokens(1, 1);
  EXPECT_EQ(k.blockTable(1, gw)[0] != kNoBlock, true);
  // Position 9 reads 4..9: block 0 (positions 0..3) is behind the window, and given back.
  const int32_t freeBefore = k.freeBlocks();
  EXPECT_EQ(k.blocksNeededToAppend(1, 1), 0);
  k.appendTokens(1, 1);
  EXPECT_EQ(k.freeBlocks(), freeBefore + 1);
  EXPECT_EQ(k.blockTable(1, gw)[0], kNoBlock);
  EXPECT_NE(k.blockTable(1, g0)[0], kNoBlock);  // the global group keeps everything
  EXPECT_EQ(errcOf([&] { k.slotFor(1, 3, gw); }), KVErrc::InvalidArgument);
  EXPECT_NO_THROW(k.slotFor(1, 4, gw));
  EXPECT_NO_THROW(k.slotFor(1, 3, g0));
  k.checkInvariants();
  // Growing to 40 positions one at a time: the windowed group never holds more than 3 blocks
  // (6 positions span at most 2 full blocks and the one being written).
  for (int32_t t = 10; t < 40; ++t) {
    k.appendTokens(1, 1);
    const Ids w = k.blockTable(1, gw);
    int32_t held = 0;
    for (BlockId b : w) held += b != kNoBlock ? 1 : 0;
    EXPECT_LE(held, 3) << "at " << t;
    // Given back exactly the blocks wholly before the last query's window start t - 5.
    for (int32_t i = 0; i < static_cast<int32_t>(w.size()); ++i) {
      EXPECT_EQ(w[static_cast<size_t>(i)] == kNoBlock, (i + 1) * 4 <= t - 5) << t << " " << i;
    }
    k.checkInvariants();
  }
  EXPECT_EQ(k.blockTable(1, g0).size(), 10u);
  k.freeFor(1);
  EXPECT_EQ(k.freeBlocks(), 32);
  EXPECT_EQ(k.stats().liveTokens, 0);
  k.checkInvariants();
}

TEST(HybridKV, AnAppendMayUseTheBlocksItsWindowGivesBack) {
  // 6 blocks: 3 per group hold 12 positions; the window (4) then frees one block per block grown.
  KVCache k(twoLayers(4, 6));
  k.allocateFor(1, 12);
  ASSERT_EQ(k.freeBlocks(), 0);
  // Position 12 needs a new block in each group; the windowed group gives back blocks 0 and 1
  // (its query at 12 reads 9..12), so the append needs nothing free.
  EXPECT_EQ(k.blocksNeededToAppend(1, 1), 0);
  EXPECT_TRUE(k.tryAppendTokens(1, 1));
  EXPECT_EQ(k.freeBlocks(), 0);
  const Ids w = k.blockTable(1, 1);
  EXPECT_EQ(w, (Ids{kNoBlock, kNoBlock, w[2], w[3]}));
  k.checkInvariants();
  k.appendTokens(1, 3);  // fills block 3 (room in both last blocks, nothing to give back)
  EXPECT_EQ(k.freeBlocks(), 0);
  // Position 16 needs a block in each group, and the window (13..16) gives back only block 2:
  // one short.
  EXPECT_EQ(k.blocksNeededToAppend(1, 1), 1);
  EXPECT_FALSE(k.tryAppendTokens(1, 1));
  EXPECT_EQ(k.usedTokens(1), 16);
  EXPECT_NE(k.blockTable(1, 1)[2], kNoBlock);  // a refused append changes nothing
  k.checkInvariants();
}

TEST(HybridKV, ViewsReadTheWindowInPlace) {
  KVCache k(twoLayers(6, 32));
  k.allocateFor(1, 1);
  for (int32_t pos = 0; pos < 30; ++pos) {
    if (pos > 0) k.appendTokens(1, 1);
    for (int32_t layer = 0; layer < 2; ++layer) {
      const TokenSlot slot = k.slotFor(1, pos, k.arena().groupOf(layer));
      const float kv[2] = {static_cast<float>(pos), static_cast<float>(layer)};
      k.writeKV(slot, layer, kv, kv);
    }
  }
  for (int32_t layer = 0; layer < 2; ++layer) {
    const PagedKVView view = k.getKView(1, layer);
    EXPECT_EQ(view.numTokens, 30);
    for (int32_t p = layer == 0 ? 30 - 5 : 0; p < 30; ++p) {
      float row[2];
      std::memcpy(row, view.row(p, 0), sizeof row);
      EXPECT_EQ(row[0], static_cast<float>(p));
      EXPECT_EQ(row[1], static_cast<float>(layer));
    }
  }
}

TEST(HybridKV, ResolveStepGivesEveryGroupItsSlotsAndTable) {
  KVCache k(twoLayers(6, 32));
  k.allocateFor(1, 10);
  k.appendTokens(1, 2);  // positions 10, 11; block 0 given back by the window (10 - 5 = 5)
  std::vector<TokenSlot> slots;
  std::vector<BlockId> tables;
  std::vector<int32_t> starts;
  const StepSequence step[] = {{1, 10, 2}};
  k.resolveStep(step, slots, tables, starts);
  ASSERT_EQ(slots.size(), 4u);  // 2 positions x 2 groups, position-major
  ASSERT_EQ(starts, (std::vector<int32_t>{0}));
  ASSERT_EQ(tables.size(), 6u);  // 3 blocks per group
  for (int32_t g = 0; g < 2; ++g) {
    const Ids table = k.blockTable(1, g);
    EXPECT_EQ(Ids(tables.begin() + 3 * g, tables.begin() + 3 * g + 3), table);
    for (int32_t i = 0; i < 2; ++i) {
      const TokenSlot s = slots[static_cast<size_t>(i * 2 + g)];
      EXPECT_EQ(s.block, table[2]);
      EXPECT_EQ(s.offset, 2 + i);
    }
  }
  EXPECT_EQ(tables[3], kNoBlock);
  // A step that would write a position behind the window is refused.
  const StepSequence old[] = {{1, 2, 1}};
  EXPECT_EQ(errcOf([&] { k.resolveStep(old, slots, tables, starts); }), KVErrc::InvalidArgument);
  EXPECT_TRUE(slots.empty());
}

TEST(HybridKV, APrefixHitTakesOnlyTheWindowBeforeItsEnd) {
  KVCache k(twoLayers(6, 64));
  const Tokens a = iota(24);
  k.allocateFor(1, 24);
  k.cacheComputedBlocks(1, a);
  k.freeFor(1);
  // All six blocks of both groups are cached.
  EXPECT_EQ(k.cachedPrefixTokens(a), 24);
  const Tokens b = iota(30);
  // Hits leave the queue (6 global + 2 windowed), plus 2 fresh blocks per group for 24..29.
  EXPECT_EQ(k.blocksNeededToAllocate(b, 30), 6 + 2 + 2 * 2);
  EXPECT_EQ(k.tryAllocateWithPrefix(2, b, 30), 24);
  // The windowed group took only what the query at 24 reads (19..24): blocks 4 and 5.
  const Ids w = k.blockTable(2, 1);
  EXPECT_EQ(w, (Ids{kNoBlock, kNoBlock, kNoBlock, kNoBlock, w[4], w[5], w[6], w[7]}));
  EXPECT_NE(w[4], kNoBlock);
  k.checkInvariants();
}

// A sequence of 24 tokens grown a block at a time (its windowed group giving back blocks 0..2 on
// the way), with its blocks registered only at the end (hashed = false) or after each block (as
// the engine does: hashed = true, so the given-back blocks stay cached).
void growAndFree(KVCache& k, const Tokens& tokens, bool hashEachBlock) {
  k.allocateFor(9, 4);
  if (hashEachBlock) k.cacheComputedBlocks(9, std::span(tokens).first(4));
  for (size_t t = 4; t < 24; t += 4) {
    k.appendTokens(9, 4);
    if (hashEachBlock) k.cacheComputedBlocks(9, std::span(tokens).first(t + 4));
  }
  k.cacheComputedBlocks(9, tokens);
  if (k.numGroups() > 1) {
    const Ids w = k.blockTable(9, 1);
    EXPECT_EQ(w, (Ids{kNoBlock, kNoBlock, kNoBlock, w[3], w[4], w[5]}));
  }
  k.freeFor(9);
  k.checkInvariants();
}

Tokens sharing(const Tokens& a, size_t n) {
  Tokens t(a.begin(), a.begin() + static_cast<long>(n));
  t.push_back(1);
  t.push_back(2);
  return t;
}

TEST(HybridKV, AHitShortensUntilEveryWindowIsWhole) {
  const Tokens a = iota(24);
  KVCache k(twoLayers(6, 64));
  growAndFree(k, a, false);
  // Sharing 21 tokens: the global group hits 5 blocks and the window before 20 (15..19, blocks
  // 3 and 4) is cached.
  EXPECT_EQ(k.cachedPrefixTokens(sharing(a, 21)), 20);
  // Sharing 18: the global group holds 4 blocks, but the window before 16 needs windowed block
  // 2, never registered; before 8 it needs block 1, before 4 block 0: no hit at all.
  EXPECT_EQ(k.cachedPrefixTokens(sharing(a, 18)), 0);

  KVCache engineLike(twoLayers(6, 64));
  growAndFree(engineLike, a, true);
  EXPECT_EQ(engineLike.cachedPrefixTokens(sharing(a, 18)), 16);
  ASSERT_EQ(engineLike.tryAllocateWithPrefix(1, sharing(a, 18), 20), 16);
  EXPECT_EQ(engineLike.blockTable(1, 1)[1], kNoBlock);  // 16 - 5 = 11: blocks 2 and 3 needed
  EXPECT_NE(engineLike.blockTable(1, 1)[2], kNoBlock);
  engineLike.checkInvariants();
  // Without windows the same history hits every block it computed.
  KVCacheConfig plainConfig = twoLayers(6, 64);
  plainConfig.hybrid = false;
  KVCache plain(plainConfig);
  growAndFree(plain, a, false);
  EXPECT_EQ(plain.cachedPrefixTokens(sharing(a, 18)), 16);
}

TEST(HybridKV, EventsReportTheFirstGroupOnly) {
  KVCache k(twoLayers(6, 12));
  k.recordEvents(true);
  const Tokens a = iota(12);
  k.allocateFor(1, 12);
  k.cacheComputedBlocks(1, a);
  std::vector<KVEvent> events;
  k.takeEvents(events);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].kind, KVEvent::Kind::BlockStored);
  EXPECT_EQ(events[0].blockHashes, k.blockHashes(a));
  k.freeFor(1);
  // 6 cached blocks (3 per group). Taking all 12 blocks evicts them; only the 3 hashes of the
  // first group are reported.
  k.allocateFor(2, 24);
  events.clear();
  k.takeEvents(events);
  std::vector<uint64_t> removed;
  for (const KVEvent& e : events) {
    ASSERT_EQ(e.kind, KVEvent::Kind::BlockRemoved);
    removed.insert(removed.end(), e.blockHashes.begin(), e.blockHashes.end());
  }
  std::sort(removed.begin(), removed.end());
  std::vector<uint64_t> expect = k.blockHashes(a);
  std::sort(expect.begin(), expect.end());
  EXPECT_EQ(removed, expect);
}

TEST(HybridKV, ForkSharesEveryGroupAndCopiesOnWrite) {
  KVCache k(twoLayers(6, 32));
  k.allocateFor(1, 14);
  for (int32_t pos = 0; pos < 14; ++pos) {
    for (int32_t layer = 0; layer < 2; ++layer) {
      const float kv[2] = {static_cast<float>(pos), 0};
      k.writeKV(k.slotFor(1, pos, k.arena().groupOf(layer)), layer, kv, kv);
    }
  }
  k.appendTokens(1, 1);  // gives back windowed block 0 (the query at 14 reads 9..14)
  const float last[2] = {14, 0};
  for (int32_t layer = 0; layer < 2; ++layer) {
    k.writeKV(k.slotFor(1, 14, k.arena().groupOf(layer)), layer, last, last);
  }
  const int32_t used = k.usedBlocks();
  k.fork(1, 2);
  EXPECT_EQ(k.usedBlocks(), used);
  EXPECT_EQ(k.blockTable(2, 1)[0], kNoBlock);
  // Each child's first append copies the shared, partly filled last block of both groups.
  EXPECT_EQ(k.blocksNeededToAppend(2, 1), 2);
  k.appendTokens(2, 1);
  EXPECT_EQ(k.usedBlocks(), used + 2);
  for (int32_t layer = 0; layer < 2; ++layer) {
    const PagedKVView v = k.getKView(2, layer);
    for (int32_t p = 10; p < 15; ++p) {
      float row[2];
      std::memcpy(row, v.row(p, 0), sizeof row);
      EXPECT_EQ(row[0], static_cast<float>(p)) << layer << " " << p;
    }
  }
  EXPECT_NE(k.blockTable(2, 0)[3], k.blockTable(1, 0)[3]);
  EXPECT_EQ(k.blockTable(2, 0)[2], k.blockTable(1, 0)[2]);
  k.checkInvariants();
  k.freeFor(1);
  k.freeFor(2);
  EXPECT_EQ(k.freeBlocks(), 32);
  k.checkInvariants();
}

TEST(HybridKV, MaxSequenceTokensCountsWhatTheWindowsKeep) {
  KVCacheConfig c = twoLayers(6, 20);
  KVCache k(c);
  // Steps of 1: the windowed group holds at most 6 positions, ceil(5 / 4) + 1 = 3 blocks; the
  // global group the other 17: 68 tokens.
  EXPECT_EQ(k.maxSequenceTokens(1), 68);
  EXPECT_EQ(blocksForSequence(c, 68, 1), 20);
  EXPECT_EQ(blocksForSequence(c, 69, 1), 21);
  c.hybrid = false;
  KVCache plain(c);
  EXPECT_EQ(plain.maxSequenceTokens(1), 80);  // 20 blocks of both layers
  // Only windows: any length fits.
  c.hybrid = true;
  c.layerWindows = {6, 6};
  KVCache windows(c);
  EXPECT_EQ(windows.maxSequenceTokens(1), INT32_MAX);
}

TEST(HybridKV, DumpShowsGroupsAndGivenBackEntries) {
  KVCache k(twoLayers(6, 32));
  k.allocateFor(1, 12);
  k.appendTokens(1, 1);
  std::ostringstream os;
  k.dumpCacheStats(os);
  EXPECT_NE(os.str().find("Groups: 2 x 1 layers (global, window 6)"), std::string::npos) << os.str();
  // Block 0 of the windowed group went back to the pool and was the global group's next block.
  EXPECT_NE(os.str().find("seq 1: 13 tokens, blocks [0 1 2 3] [- 4 5 6]"), std::string::npos)
      << os.str();
}

}  // namespace
}  // namespace cortex::kv
