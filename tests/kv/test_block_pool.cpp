// BlockPool on tiny pools: exact ids, ref counts and free-list order.
#include "kv/block_pool.h"

#include <gtest/gtest.h>

#include "kv_test_util.h"

#include <algorithm>
#include <iterator>
#include <list>
#include <optional>
#include <random>
#include <sstream>

#include "kv/kv_error.h"

namespace cortex::kv {
namespace {

using testing::errcOf;
using testing::Ids;

TEST(BlockPool, StartsAllFreeInIdOrder) {
  BlockPool pool(4);
  EXPECT_EQ(pool.totalBlocks(), 4);
  EXPECT_EQ(pool.freeBlocks(), 4);
  EXPECT_EQ(pool.usedBlocks(), 0);
  EXPECT_EQ(pool.freeListOrder(), (Ids{0, 1, 2, 3}));
  pool.checkInvariants();
}

TEST(BlockPool, AllocatesFromHeadAndReusesEmptyBlocksFirst) {
  BlockPool pool(4);
  Ids a(2);
  pool.allocate(a);
  EXPECT_EQ(a, (Ids{0, 1}));
  EXPECT_EQ(pool.refCount(0), 1);
  EXPECT_EQ(pool.refCount(2), 0);
  EXPECT_EQ(pool.freeListOrder(), (Ids{2, 3}));
  pool.free(0);  // unhashed: to the head
  EXPECT_EQ(pool.freeListOrder(), (Ids{0, 2, 3}));
  EXPECT_EQ(pool.allocateOne(), 0);
  EXPECT_EQ(pool.freeListOrder(), (Ids{2, 3}));
  pool.checkInvariants();
}

TEST(BlockPool, AllocateIsAllOrNothing) {
  BlockPool pool(3);
  Ids two(2);
  pool.allocate(two);
  Ids tooMany(2, kNoBlock);
  EXPECT_EQ(errcOf([&] { pool.allocate(tooMany); }), KVErrc::OutOfBlocks);
  EXPECT_EQ(tooMany, (Ids{kNoBlock, kNoBlock}));
  EXPECT_EQ(pool.freeBlocks(), 1);
  EXPECT_EQ(pool.freeListOrder(), (Ids{2}));
  Ids none;
  EXPECT_EQ(errcOf([&] { pool.allocate(none); }), KVErrc::InvalidArgument);
  pool.checkInvariants();
}

TEST(BlockPool, RefCountsKeepSharedBlocksOutOfTheFreeList) {
  BlockPool pool(2);
  const BlockId b = pool.allocateOne();
  pool.addRef(b);
  EXPECT_EQ(pool.refCount(b), 2);
  EXPECT_EQ(pool.sharedBlocks(), 1);
  pool.free(b);
  EXPECT_EQ(pool.refCount(b), 1);
  EXPECT_EQ(pool.sharedBlocks(), 0);
  EXPECT_EQ(pool.freeBlocks(), 1);
  pool.free(b);
  EXPECT_EQ(pool.freeBlocks(), 2);
  EXPECT_EQ(pool.freeListOrder(), (Ids{0, 1}));
  pool.checkInvariants();
}

TEST(BlockPool, BadFreesChangeNothing) {
  BlockPool pool(4);
  Ids a(2);
  pool.allocate(a);  // 0, 1
  EXPECT_EQ(errcOf([&] { pool.free(2); }), KVErrc::InvalidArgument);   // free block
  EXPECT_EQ(errcOf([&] { pool.free(9); }), KVErrc::InvalidArgument);   // out of range
  EXPECT_EQ(errcOf([&] { pool.free(Ids{0, 1, 0}); }), KVErrc::InvalidArgument);  // double
  EXPECT_EQ(pool.refCount(0), 1);
  EXPECT_EQ(pool.refCount(1), 1);
  EXPECT_EQ(pool.freeListOrder(), (Ids{2, 3}));
  EXPECT_EQ(errcOf([&] { pool.addRef(3); }), KVErrc::InvalidArgument);
  pool.checkInvariants();
  // A block listed twice with two references is freed once onto the list.
  pool.addRef(0);
  pool.free(Ids{0, 0});
  EXPECT_EQ(pool.freeListOrder(), (Ids{0, 2, 3}));
  pool.checkInvariants();
}

TEST(BlockPool, FragmentationIsTheOriginsRunMeasure) {
  BlockPool pool(8);
  EXPECT_DOUBLE_EQ(pool.fragmentation(), 0.0);  // one run of 8 free blocks
  Ids all(8);
  pool.allocate(all);
  EXPECT_DOUBLE_EQ(pool.fragmentation(), 0.0);  // nothing free
  pool.free(Ids{1, 3, 4, 6});                   // free runs: 1, 2, 1
  EXPECT_DOUBLE_EQ(pool.fragmentation(), 1.0 - 2.0 / 4.0);
}

TEST(BlockPool, DumpBlockMapShowsFreeCachedUsedShared) {
  BlockPool pool(6);
  Ids a(4);
  pool.allocate(a);
  pool.addRef(1);
  pool.free(2);
  ASSERT_TRUE(pool.setHash(3, 42));
  pool.free(3);
  std::ostringstream os;
  pool.dumpBlockMap(os);
  EXPECT_NE(os.str().find("XS.C.."), std::string::npos) << os.str();
  EXPECT_NE(os.str().find("6 blocks: 2 used, 1 shared, 1 cached, 3 free"), std::string::npos)
      << os.str();
}

TEST(BlockPool, CachedBlocksQueueInLruOrderAndAreEvictedFromTheHead) {
  BlockPool pool(4);
  Ids a(4);
  pool.allocate(a);
  for (BlockId b : a) ASSERT_TRUE(pool.setHash(b, 100 + static_cast<uint64_t>(b)));
  pool.free(Ids{3, 1});  // cached, to the tail in this order
  pool.free(Ids{0});
  EXPECT_EQ(pool.freeListOrder(), (Ids{3, 1, 0}));
  EXPECT_EQ(pool.cachedBlocks(), 3);
  EXPECT_EQ(pool.findCached(101), 1);
  // A hit leaves the middle of the queue.
  pool.touch(1);
  EXPECT_EQ(pool.refCount(1), 1);
  EXPECT_EQ(pool.freeListOrder(), (Ids{3, 0}));
  EXPECT_EQ(pool.cachedBlocks(), 2);
  pool.checkInvariants();
  // Allocation evicts the least recently freed cached block and reports its hash.
  std::vector<EvictedBlock> evicted;
  EXPECT_EQ(pool.allocateOne(&evicted), 3);
  EXPECT_EQ(evicted, (std::vector<EvictedBlock>{{3, 103}}));
  EXPECT_EQ(pool.findCached(103), kNoBlock);
  EXPECT_FALSE(pool.isHashed(3));
  EXPECT_EQ(pool.findCached(100), 0);
  pool.checkInvariants();
}

TEST(BlockPool, EmptyBlocksAreTakenBeforeCachedOnes) {
  BlockPool pool(3);
  Ids a(3);
  pool.allocate(a);
  ASSERT_TRUE(pool.setHash(0, 7));
  pool.free(Ids{0, 1, 2});
  EXPECT_EQ(pool.freeListOrder(), (Ids{2, 1, 0}));
  Ids two(2);
  pool.allocate(two);
  EXPECT_EQ(two, (Ids{2, 1}));
  EXPECT_EQ(pool.findCached(7), 0);  // survived
  pool.checkInvariants();
}

TEST(BlockPool, HashesAreUniqueAndTouchSharesBlocksInUse) {
  BlockPool pool(3);
  Ids a(2);
  pool.allocate(a);
  ASSERT_TRUE(pool.setHash(0, 5));
  EXPECT_FALSE(pool.setHash(1, 5));  // the same content twice: the first copy keeps the hash
  EXPECT_FALSE(pool.isHashed(1));
  EXPECT_EQ(errcOf([&] { pool.setHash(0, 6); }), KVErrc::InvalidArgument);  // already hashed
  EXPECT_EQ(errcOf([&] { pool.setHash(2, 6); }), KVErrc::InvalidArgument);  // free
  EXPECT_EQ(errcOf([&] { pool.touch(1); }), KVErrc::InvalidArgument);       // unhashed
  pool.touch(0);
  EXPECT_EQ(pool.refCount(0), 2);
  EXPECT_EQ(pool.sharedBlocks(), 1);
  pool.clearHash(0);
  EXPECT_EQ(pool.findCached(5), kNoBlock);
  pool.checkInvariants();
}

TEST(BlockPool, EvictAllCachedKeepsBlocksInUse) {
  BlockPool pool(4);
  Ids a(3);
  pool.allocate(a);
  for (BlockId b : a) ASSERT_TRUE(pool.setHash(b, 10 + static_cast<uint64_t>(b)));
  pool.free(Ids{1, 2});
  std::vector<EvictedBlock> removed;
  EXPECT_EQ(pool.evictAllCached(&removed), 2);
  std::vector<uint64_t> hashes;
  for (const EvictedBlock& e : removed) hashes.push_back(e.hash);
  std::sort(hashes.begin(), hashes.end());
  EXPECT_EQ(hashes, (std::vector<uint64_t>{11, 12}));
  EXPECT_EQ(pool.cachedBlocks(), 0);
  EXPECT_EQ(pool.hashedBlocks(), 1);
  EXPECT_EQ(pool.findCached(10), 0);
  pool.checkInvariants();
}

// Property test: random allocate / setHash / hit / free / evict sequences against a naive model of
// the documented policy (a list for the free queue, linear scans for lookups). Keys share their low
// bits, so the open-addressing table's probes collide and its backward-shift deletes are exercised.
TEST(BlockPool, PrefixCachingMatchesANaiveModel) {
  constexpr int32_t kBlocks = 48;
  struct Naive {
    std::vector<int32_t> refs = std::vector<int32_t>(kBlocks, 0);
    std::vector<std::optional<uint64_t>> hash = std::vector<std::optional<uint64_t>>(kBlocks);
    std::list<BlockId> queue;  // head first
    BlockId find(uint64_t h) const {
      for (BlockId b = 0; b < kBlocks; ++b) {
        if (hash[b] == h) return b;
      }
      return kNoBlock;
    }
  } model;
  for (BlockId b = 0; b < kBlocks; ++b) model.queue.push_back(b);
  BlockPool pool(kBlocks);
  std::mt19937_64 rng(7);
  auto uniform = [&](uint64_t n) { return static_cast<size_t>(rng() % n); };
  std::vector<BlockId> owned;  // one entry per reference this test holds
  int evictions = 0, hits = 0, duplicates = 0;
  for (int round = 0; round < 6000; ++round) {
    const size_t op = uniform(10);
    if (op < 3 && !model.queue.empty()) {  // allocate (may evict)
      std::vector<EvictedBlock> evicted;
      const BlockId b = pool.allocateOne(&evicted);
      const BlockId expect = model.queue.front();
      model.queue.pop_front();
      ASSERT_EQ(b, expect);
      if (model.hash[b]) {
        ASSERT_EQ(evicted, (std::vector<EvictedBlock>{{b, *model.hash[b]}}));
        model.hash[b].reset();
        ++evictions;
      } else {
        ASSERT_TRUE(evicted.empty());
      }
      model.refs[b] = 1;
      owned.push_back(b);
    } else if (op < 5 && !owned.empty()) {  // give a held, unhashed block a hash
      const BlockId b = owned[uniform(owned.size())];
      if (model.hash[b]) continue;
      const uint64_t h = uniform(256) << 40;
      const bool fresh = model.find(h) == kNoBlock;
      ASSERT_EQ(pool.setHash(b, h), fresh);
      if (fresh) {
        model.hash[b] = h;
      } else {
        ++duplicates;
      }
    } else if (op < 7) {  // look up a hash and hit it
      const uint64_t h = uniform(256) << 40;
      const BlockId b = pool.findCached(h);
      ASSERT_EQ(b, model.find(h));
      if (b == kNoBlock) continue;
      pool.touch(b);
      if (model.refs[b]++ == 0) model.queue.remove(b);
      owned.push_back(b);
      ++hits;
    } else if (op < 9 && !owned.empty()) {  // free a few references, in a random order
      std::shuffle(owned.begin(), owned.end(), rng);
      const size_t n = 1 + uniform(std::min<size_t>(owned.size(), 4));
      std::vector<BlockId> ids(owned.end() - static_cast<long>(n), owned.end());
      owned.resize(owned.size() - n);
      pool.free(ids);
      for (BlockId b : ids) {
        if (--model.refs[b] != 0 || std::find(model.queue.begin(), model.queue.end(), b) !=
                                        model.queue.end()) {
          continue;
        }
        if (model.hash[b]) {
          model.queue.push_back(b);
        } else {
          model.queue.push_front(b);
        }
      }
    } else if (uniform(20) == 0) {  // evict everything cached
      std::vector<EvictedBlock> removed;
      int32_t expect = 0;
      for (BlockId b : std::vector<BlockId>(model.queue.begin(), model.queue.end())) {
        if (!model.hash[b]) continue;
        model.hash[b].reset();
        model.queue.remove(b);
        model.queue.push_front(b);
        ++expect;
      }
      ASSERT_EQ(pool.evictAllCached(&removed), expect);
      ASSERT_EQ(removed.size(), static_cast<size_t>(expect));
    }
    ASSERT_EQ(pool.freeListOrder(), std::vector<BlockId>(model.queue.begin(), model.queue.end()))
        << "round " << round;
    int32_t cached = 0;
    for (BlockId b = 0; b < kBlocks; ++b) {
      ASSERT_EQ(pool.refCount(b), model.refs[b]);
      ASSERT_EQ(pool.isHashed(b), model.hash[b].has_value());
      cached += model.refs[b] == 0 && model.hash[b] ? 1 : 0;
    }
    ASSERT_EQ(pool.cachedBlocks(), cached);
    pool.checkInvariants();
  }
  EXPECT_GT(evictions, 15);
  EXPECT_GT(hits, 50);
  EXPECT_GT(duplicates, 10);
}

TEST(BlockPool, RejectsEmptyPool) {
  EXPECT_EQ(errcOf([] { BlockPool p(0); }), KVErrc::InvalidArgument);
}

}  // namespace
}  // namespace cortex::kv
