// BlockPool on tiny pools: exact ids, ref counts and free-list order.
#include "kv/block_pool.h"

#include <gtest/gtest.h>

#include "kv_test_util.h"

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

TEST(BlockPool, AllocatesFromHeadAndFreesToTail) {
  BlockPool pool(4);
  Ids a(2);
  pool.allocate(a);
  EXPECT_EQ(a, (Ids{0, 1}));
  EXPECT_EQ(pool.refCount(0), 1);
  EXPECT_EQ(pool.refCount(2), 0);
  EXPECT_EQ(pool.freeListOrder(), (Ids{2, 3}));
  pool.free(0);
  EXPECT_EQ(pool.freeListOrder(), (Ids{2, 3, 0}));
  EXPECT_EQ(pool.allocateOne(), 2);
  EXPECT_EQ(pool.freeListOrder(), (Ids{3, 0}));
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
  EXPECT_EQ(pool.freeListOrder(), (Ids{1, 0}));
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
  EXPECT_EQ(pool.freeListOrder(), (Ids{2, 3, 0}));
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

TEST(BlockPool, DumpBlockMapShowsFreeUsedShared) {
  BlockPool pool(5);
  Ids a(3);
  pool.allocate(a);
  pool.addRef(1);
  pool.free(2);
  std::ostringstream os;
  pool.dumpBlockMap(os);
  EXPECT_NE(os.str().find("XS..."), std::string::npos) << os.str();
  EXPECT_NE(os.str().find("5 blocks: 2 used, 1 shared, 3 free"), std::string::npos) << os.str();
}

TEST(BlockPool, RejectsEmptyPool) {
  EXPECT_EQ(errcOf([] { BlockPool p(0); }), KVErrc::InvalidArgument);
}

}  // namespace
}  // namespace cortex::kv
