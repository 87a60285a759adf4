// Resizing the pool while in use: BlockPool grow/shrink/relocate keep their invariants; a KVCache
// grown and shrunk under live sequences keeps every sequence's K/V and every table valid (blocks
// in use above the new size are moved), keeps cached prefixes below it, refuses what cannot be
// done with the cache unchanged, and a random mix of sequence operations and resizes never
// breaks an invariant or a stored value.
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "kv/kv_cache.h"
#include "kv_test_util.h"

namespace cortex::kv {
namespace {

using testing::errcOf;

TEST(PoolResize, GrowShrinkRelocate) {
  BlockPool p(4, 8);
  EXPECT_EQ(p.capacity(), 8);
  BlockId ids[4];
  p.allocate(ids);
  p.grow(8);
  EXPECT_EQ(p.totalBlocks(), 8);
  EXPECT_EQ(p.freeBlocks(), 4);
  EXPECT_EQ(p.allocateOne(), 4) << "new blocks are handed out in id order";
  p.checkInvariants();
  ASSERT_TRUE(p.setHash(4, 77));
  p.free(ids[0]);
  p.free(ids[1]);
  EXPECT_EQ(errcOf([&] { p.shrink(4); }), KVErrc::InvalidArgument) << "block 4 is in use";
  p.relocate(4, 0);
  EXPECT_EQ(p.findCached(77), 0);
  EXPECT_EQ(p.refCount(4), 0);
  EXPECT_EQ(p.refCount(0), 1);
  p.checkInvariants();
  p.shrink(4);
  EXPECT_EQ(p.totalBlocks(), 4);
  EXPECT_EQ(p.usedBlocks(), 3);
  p.checkInvariants();
  EXPECT_EQ(errcOf([&] { p.grow(9); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { p.shrink(0); }), KVErrc::InvalidArgument);
  // A cached block above the new size is evicted by shrink.
  p.grow(6);
  const BlockId b = p.allocateOne();
  ASSERT_GE(b, 4);
  ASSERT_TRUE(p.setHash(b, 99));
  p.free(b);
  std::vector<EvictedBlock> evicted;
  p.shrink(4, &evicted);
  ASSERT_EQ(evicted.size(), 1u);
  EXPECT_EQ(evicted[0].hash, 99u);
  EXPECT_EQ(p.findCached(99), kNoBlock);
  p.checkInvariants();
}

KVCacheConfig config(int32_t blocks, int32_t capacity, KVLayout layout, bool windowed = false) {
  KVCacheConfig c;
  c.numLayers = 3;
  c.numKVHeads = 2;
  c.headDim = 8;
  c.blockSizeTokens = 4;
  c.numBlocks = blocks;
  c.layout = layout;
  c.dtype = KVDType::F32;
  c.maxMemoryBytes = static_cast<uint64_t>(capacity) * bytesPerBlock(c);
  if (windowed) c.layerWindows = {6, 0, 6};
  return c;
}

float value(SeqId seq, int32_t pos, int32_t layer, int32_t head, int32_t d) {
  return static_cast<float>(seq * 10000 + pos * 100 + layer * 10 + head) + static_cast<float>(d) / 8;
}

void write(KVCache& k, SeqId seq, int32_t from, int32_t to) {
  for (int32_t pos = from; pos < to; ++pos) {
    for (int32_t layer = 0; layer < 3; ++layer) {
      float kv[16];
      for (int32_t h = 0; h < 2; ++h)
        for (int32_t d = 0; d < 8; ++d) kv[h * 8 + d] = value(seq, pos, layer, h, d);
      k.writeKV(k.slotFor(seq, pos, k.arena().groupOf(layer)), layer, kv, kv);
    }
  }
}

// Positions [from, to) of `seq` hold value(owner, ...) in K and V.
void expectValues(KVCache& k, SeqId seq, SeqId owner, int32_t from, int32_t to) {
  for (int32_t pos = from; pos < to; ++pos) {
    for (int32_t layer = 0; layer < 3; ++layer) {
      const TokenSlot slot = k.slotFor(seq, pos, k.arena().groupOf(layer));
      for (int32_t h = 0; h < 2; ++h) {
        const auto* kr = reinterpret_cast<const float*>(k.kRow(slot, layer, h));
        const auto* vr = reinterpret_cast<const float*>(k.vRow(slot, layer, h));
        for (int32_t d = 0; d < 8; ++d) {
          ASSERT_EQ(kr[d], value(owner, pos, layer, h, d)) << "seq " << seq << " pos " << pos;
          ASSERT_EQ(vr[d], value(owner, pos, layer, h, d));
        }
      }
    }
  }
}

class Resize : public ::testing::TestWithParam<KVLayout> {};

TEST_P(Resize, BlocksInUseMoveAndKeepTheirValues) {
  KVCache k(config(8, 32, GetParam()));
  EXPECT_EQ(k.capacityBlocks(), 32);
  const std::byte* base = k.arena().kBase;
  k.warmup();
  k.resize(32);
  EXPECT_EQ(k.numBlocks(), 32);
  EXPECT_EQ(k.arena().kBase, base) << "addresses never move";
  k.warmup();
  // Fill the pool with 4 sequences of 24 tokens (6 blocks each) and cache a prefix.
  std::vector<int32_t> tokens(24);
  for (int32_t i = 0; i < 24; ++i) tokens[static_cast<size_t>(i)] = 7 * i;
  for (SeqId s = 1; s <= 4; ++s) {
    k.allocateFor(s, 24);
    write(k, s, 0, 24);
  }
  k.cacheComputedBlocks(1, tokens);
  k.freeFor(2);
  k.freeFor(3);
  // 12 blocks in use (sequences 1 and 4), some above 16; 6 cached (sequence 1's are in use).
  EXPECT_EQ(errcOf([&] { k.resize(11); }), KVErrc::OutOfBlocks);
  EXPECT_EQ(k.numBlocks(), 32);
  const std::vector<BlockId> before = k.blockTable(4);
  const int32_t moved = k.resize(12);
  EXPECT_EQ(k.numBlocks(), 12);
  EXPECT_EQ(k.stats().usedBlocks, 12);
  EXPECT_GT(moved, 0);
  EXPECT_NE(k.blockTable(4), before);
  for (BlockId b : k.blockTable(4)) EXPECT_LT(b, 12);
  k.checkInvariants();
  expectValues(k, 1, 1, 0, 24);
  expectValues(k, 4, 4, 0, 24);
  EXPECT_EQ(k.cachedPrefixTokens(tokens), 24);
  k.freeFor(1);
  EXPECT_EQ(k.cachedPrefixTokens(tokens), 24) << "cached after its owner left";
  ASSERT_EQ(k.tryAllocateWithPrefix(9, tokens, 24), 20);
  expectValues(k, 9, 1, 0, 20);
  // Grow again: new blocks are usable.
  k.resize(20);
  k.allocateFor(10, 32);
  write(k, 10, 0, 32);
  expectValues(k, 10, 10, 0, 32);
  k.checkInvariants();
  EXPECT_EQ(errcOf([&] { k.resize(33); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { k.resize(0); }), KVErrc::InvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Layouts, Resize, ::testing::Values(KVLayout::LayerMajor, KVLayout::HeadMajor));

// Random sequence operations and resizes (plain and hybrid caches): invariants after each step,
// and every live position keeps the value written for it.
TEST(ResizeProperty, RandomOperationsAndResizes) {
  for (bool windowed : {false, true}) {
    std::mt19937 rng(windowed ? 7 : 3);
    KVCache k(config(16, 48, KVLayout::LayerMajor, windowed));
    struct Seq {
      int32_t tokens = 0;
      SeqId owner = 0;  // whose values its positions hold
    };
    std::map<SeqId, Seq> live;
    SeqId next = 1;
    for (int step = 0; step < 1500; ++step) {
      const int op = std::uniform_int_distribution<int>(0, 9)(rng);
      if (op <= 2) {  // new sequence
        const int32_t n = std::uniform_int_distribution<int32_t>(1, 12)(rng);
        if (k.tryAllocateFor(next, n)) {
          write(k, next, 0, n);
          live[next] = {n, next};
        }
        ++next;
      } else if (op <= 5 && !live.empty()) {  // append
        auto it = std::next(live.begin(), std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng));
        const int32_t n = std::uniform_int_distribution<int32_t>(1, 6)(rng);
        if (it->second.owner == it->first && k.tryAppendTokens(it->first, n)) {
          write(k, it->first, it->second.tokens, it->second.tokens + n);
          it->second.tokens += n;
        }
      } else if (op == 6 && !live.empty()) {  // free
        auto it = std::next(live.begin(), std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng));
        k.freeFor(it->first);
        live.erase(it);
      } else if (op == 7 && !live.empty()) {  // fork (read-only copy)
        auto it = live.begin();
        k.fork(it->first, next);
        live[next] = {it->second.tokens, it->second.owner};
        ++next;
      } else {  // resize to a random size the blocks in use allow
        const int32_t used = k.stats().usedBlocks;
        const int32_t n = std::uniform_int_distribution<int32_t>(std::max(1, used), 48)(rng);
        k.resize(n);
        ASSERT_EQ(k.numBlocks(), n);
      }
      k.checkInvariants();
      if (step % 50 == 0) {
        for (const auto& [seq, s] : live) {
          const int32_t from = windowed ? std::max(0, s.tokens - 6) : 0;
          expectValues(k, seq, s.owner, from, s.tokens);
        }
      }
    }
  }
}

}  // namespace
}  // namespace cortex::kv
