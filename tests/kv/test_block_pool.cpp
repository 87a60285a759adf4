// BlockPool on tiny pools: exact ids, ref counts and free-list order.
#include "kv/block_pool.h"

#include <gtest/gtest.h>

#include "kv_test_util.h"

#include <algorithm>
#include <iterator>
#include <map>
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
  std::vector<uint64_t> evicted;
  EXPECT_EQ(pool.allocateOne(&evicted), 3);
  EXPECT_EQ(evicted, (std::vector<uint64_t>{103}));
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
  std::vector<uint64_t> removed;
  EXPECT_EQ(pool.evictAllCached(&removed), 2);
  std::sort(removed.begin(), removed.end());
  EXPECT_EQ(removed, (std::vector<uint64_t>{11, 12}));
  EXPECT_EQ(pool.cachedBlocks(), 0);
  EXPECT_EQ(pool.hashedBlocks(), 1);
  EXPECT_EQ(pool.findCached(10), 0);
  pool.checkInvariants();
}

// The open-addressing table under many inserts and deletes that collide: every hash stays
// findable after the backward-shift deletes around it.
TEST(BlockPool, HashTableSurvivesChurn) {
  constexpr int32_t kBlocks = 64;
  BlockPool pool(kBlocks);
  std::mt19937_64 rng(7);
  std::map<uint64_t, BlockId> reference;
  for (int round = 0; round < 4000; ++round) {
    if (pool.freeBlocks() > 0 && (rng() % 3 != 0 || reference.empty())) {
      std::vector<uint64_t> evicted;
      const BlockId b = pool.allocateOne(&evicted);
      for (uint64_t h : evicted) reference.erase(h);
      // Keys that share their low bits, so probes collide.
      const uint64_t h = (rng() % 512) << 40;
      if (pool.setHash(b, h)) {
        EXPECT_EQ(reference.count(h), 0u);
        reference[h] = b;
      }
      if (rng() % 2 == 0) pool.free(b);  // cached (or empty when unhashed)
    } else {
      auto it = reference.begin();
      std::advance(it, static_cast<long>(rng() % reference.size()));
      const BlockId b = it->second;
      if (pool.refCount(b) > 0) {
        pool.clearHash(b);
        pool.free(b);
        reference.erase(it);
      } else {
        pool.touch(b);
      }
    }
    for (const auto& [h, b] : reference) ASSERT_EQ(pool.findCached(h), b);
    if (round % 97 == 0) pool.checkInvariants();
  }
  pool.checkInvariants();
}

TEST(BlockPool, RejectsEmptyPool) {
  EXPECT_EQ(errcOf([] { BlockPool p(0); }), KVErrc::InvalidArgument);
}

}  // namespace
}  // namespace cortex::kv
