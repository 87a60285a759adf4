// Windowed sequences (attention sinks + a sliding window): a sequence keeps its sink blocks and
// its window's blocks and gives the rest back as it grows, so its blocks stay bounded however
// long it runs; shiftWindow moves its window back next to the sinks and reports exactly the
// blocks whose keys must be re-rotated; hashing and prefix hits stop where the window would first
// skip a position; a random mix of appends and shifts never breaks an invariant.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "kv/kv_cache.h"
#include "kv_test_util.h"

namespace cortex::kv {
namespace {

using testing::errcOf;

KVCacheConfig config(int32_t blocks, bool swa = false) {
  KVCacheConfig c;
  c.numLayers = 3;
  c.numKVHeads = 2;
  c.headDim = 8;
  c.blockSizeTokens = 4;
  c.numBlocks = blocks;
  c.dtype = KVDType::F32;
  if (swa) c.layerWindows = {6, 0, 6};
  return c;
}

std::vector<int32_t> tokens(int32_t n, int32_t salt = 0) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = (i * 7 + salt) % 50;
  return t;
}

TEST(KVWindow, KeepsSinksAndWindowAndStaysBounded) {
  KVCache cache(config(64));
  const SeqWindow win{10, 3};  // sinks: block 0; window: 10 positions
  cache.allocateFor(1, 1, win);
  const int64_t bound = blocksForWindowedSequence(cache.config(), win, 1);
  for (int32_t t = 1; t < 400; ++t) {
    cache.appendToken(1);
    cache.checkInvariants();
    ASSERT_LE(cache.usedBlocks(), bound) << "at " << t;
  }
  const std::vector<BlockId> table = cache.blockTable(1);
  ASSERT_EQ(table.size(), 100u);
  EXPECT_NE(table[0], kNoBlock) << "the sink block stays";
  // The query at 400 reads [391, 400]: blocks 97.. stay, 1..96 are gone.
  for (size_t i = 1; i < 97; ++i) EXPECT_EQ(table[i], kNoBlock) << i;
  for (size_t i = 97; i < 100; ++i) EXPECT_NE(table[i], kNoBlock) << i;
  EXPECT_EQ(errcOf([&] { (void)cache.slotFor(1, 50); }), KVErrc::InvalidArgument)
      << "a position in the gap is gone";
  EXPECT_NO_THROW((void)cache.slotFor(1, 2)) << "a sink stays";
}

TEST(KVWindow, ShiftMovesTheWindowNextToTheSinks) {
  KVCache cache(config(64));
  cache.allocateFor(1, 37, SeqWindow{10, 3});
  cache.appendTokens(1, 3);  // 40 positions; the query at 40 reads [0, 3) and [31, 40]
  const std::vector<BlockId> before = cache.blockTable(1);
  const KVCache::WindowShift shift = cache.shiftWindow(1);
  cache.checkInvariants();
  // Blocks 1..6 go (wholly before 31), so positions move back by 6 blocks: 40 -> 16.
  EXPECT_EQ(shift.tokens, 24);
  EXPECT_EQ(cache.usedTokens(1), 16);
  const std::vector<BlockId> after = cache.blockTable(1);
  ASSERT_EQ(after.size(), 4u);
  EXPECT_EQ(after[0], before[0]);
  EXPECT_EQ(after[1], before[7]);
  EXPECT_EQ(after[2], before[8]);
  EXPECT_EQ(after[3], before[9]);
  // The moved blocks are the window's, full.
  ASSERT_EQ(shift.moved.size(), 3u);
  EXPECT_EQ(shift.moved[0].block, before[7]);
  EXPECT_EQ(shift.moved[0].rows, 4);
  EXPECT_EQ(shift.moved[2].block, before[9]);
  EXPECT_EQ(cache.stats().usedBlocks, 4);
  // Nothing more to move until the window leaves another block behind.
  EXPECT_EQ(cache.shiftWindow(1).tokens, 0);
  cache.appendTokens(1, 4);
  EXPECT_EQ(cache.shiftWindow(1).tokens, 4);
  cache.checkInvariants();
}

TEST(KVWindow, ShiftInAHybridCacheMovesEveryGroupAlike) {
  KVCache cache(config(64, /*swa=*/true));
  ASSERT_EQ(cache.numGroups(), 3);  // global, and two sliding groups of one layer
  cache.allocateFor(1, 40, SeqWindow{12, 2});
  cache.checkInvariants();
  const KVCache::WindowShift shift = cache.shiftWindow(1);
  cache.checkInvariants();
  // Global group: the query at 40 reads [29, 40] -> block 7 on; sliding groups (6): [35, 40] ->
  // block 8 on. All lose 6 entries after their kept ones (1 sink block, 0).
  EXPECT_EQ(shift.tokens, 24);
  EXPECT_EQ(cache.usedTokens(1), 16);
  const std::vector<BlockId> global = cache.blockTable(1, 0), sliding = cache.blockTable(1, 1);
  EXPECT_NE(global[0], kNoBlock);
  EXPECT_NE(global[1], kNoBlock);
  EXPECT_NE(global[2], kNoBlock);
  EXPECT_EQ(sliding[0], kNoBlock);
  EXPECT_EQ(sliding[1], kNoBlock);
  EXPECT_NE(sliding[2], kNoBlock);
  EXPECT_EQ(shift.moved.size(), 3u + 2u + 2u);  // global blocks 7..9, sliding 8..9 twice
}

TEST(KVWindow, HashesAndHitsStopWhereTheWindowFirstSkips) {
  KVCache cache(config(64));
  const SeqWindow win{10, 3};  // nothing is skipped before position 13: blocks 0..2 hash
  const std::vector<int32_t> t = tokens(40);
  cache.allocateFor(1, 40, win);
  cache.cacheComputedBlocks(1, t);
  EXPECT_EQ(cache.stats().cachedBlocks + cache.blockHashes(t).size(), 10u);
  cache.freeFor(1);
  cache.checkInvariants();
  EXPECT_EQ(cache.cachedPrefixTokens(t), 12) << "3 full-attention blocks were cached";
  EXPECT_EQ(cache.tryAllocateWithPrefix(2, t, 40), 12);
  EXPECT_EQ(cache.tryAllocateWithPrefix(3, t, 40, win), 12);
  cache.checkInvariants();
  // A window starting before its blocks' end cannot move them: they are shared.
  EXPECT_EQ(errcOf([&] { (void)cache.shiftWindow(2); }), KVErrc::InvalidArgument);
  KVCache other(config(64));
  other.allocateFor(4, 20, win);
  other.cacheComputedBlocks(4, tokens(20));
  // The query at 20 reads [11, 20]: block 2 (8..11) moves, and it is hashed.
  EXPECT_EQ(errcOf([&] { (void)other.shiftWindow(4); }), KVErrc::InvalidArgument);
  other.checkInvariants();
  EXPECT_EQ(other.usedTokens(4), 20) << "a refused shift changes nothing";
}

TEST(KVWindow, RejectsBadWindows) {
  KVCache cache(config(16));
  EXPECT_EQ(errcOf([&] { cache.allocateFor(1, 4, SeqWindow{0, 4}); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { cache.allocateFor(1, 4, SeqWindow{-1, 0}); }), KVErrc::InvalidArgument);
  cache.allocateFor(1, 4);
  EXPECT_EQ(errcOf([&] { (void)cache.shiftWindow(1); }), KVErrc::InvalidArgument);
  EXPECT_FALSE(cache.hasSequence(2));
  cache.checkInvariants();
}

TEST(KVWindow, RandomAppendsAndShiftsKeepTheInvariants) {
  for (const bool swa : {false, true}) {
    std::mt19937 rng(swa ? 7 : 3);
    KVCache cache(config(400, swa));
    std::vector<SeqWindow> wins;
    for (SeqId s = 1; s <= 6; ++s) {
      const SeqWindow w{static_cast<int32_t>(rng() % 30 + 1), static_cast<int32_t>(rng() % 9)};
      wins.push_back(w);
      cache.allocateFor(s, static_cast<int32_t>(rng() % 20 + 1), w);
    }
    for (int iter = 0; iter < 3000; ++iter) {
      const SeqId s = rng() % 6 + 1;
      if (rng() % 8 == 0 && cache.usedTokens(s) > 60) {
        const int32_t before = cache.usedTokens(s);
        const KVCache::WindowShift sh = cache.shiftWindow(s);
        ASSERT_EQ(cache.usedTokens(s), before - sh.tokens);
      } else {
        cache.appendTokens(s, static_cast<int32_t>(rng() % 12 + 1));
      }
      cache.checkInvariants();
    }
    for (SeqId s = 1; s <= 6; ++s) {
      const std::vector<BlockId> table = cache.blockTable(s);
      EXPECT_LE(table.size() - static_cast<size_t>(std::count(table.begin(), table.end(), kNoBlock)),
                static_cast<size_t>(blocksForWindowedSequence(cache.config(), wins[s - 1], 12)));
      cache.freeFor(s);
    }
    cache.checkInvariants();
    EXPECT_EQ(cache.usedBlocks(), 0);
  }
}

}  // namespace
}  // namespace cortex::kv
