// KVCache on tiny configurations: exact block tables, copy on write, errors, views, stats.
#include "kv/kv_cache.h"

#include <gtest/gtest.h>

#include "kv_test_util.h"

#include <cmath>
#include <cstring>
#include <sstream>

#include "common/half.h"

namespace cortex::kv {
namespace {

using testing::errcOf;
using testing::Ids;

KVCacheConfig tiny(int32_t blocks, int32_t blockSize = 4) {
  KVCacheConfig c;
  c.numLayers = 2;
  c.numKVHeads = 2;
  c.headDim = 4;
  c.blockSizeTokens = blockSize;
  c.numBlocks = blocks;
  c.dtype = KVDType::F32;
  return c;
}

TEST(KVCache, ConfigIsValidated) {
  KVCacheConfig c = tiny(4);
  c.numLayers = 0;
  EXPECT_EQ(errcOf([&] { KVCache k(c); }), KVErrc::InvalidArgument);
  c = tiny(4);
  c.memoryBudgetBytes = 1024;  // both given
  EXPECT_EQ(errcOf([&] { KVCache k(c); }), KVErrc::InvalidArgument);
  c = tiny(0);
  c.memoryBudgetBytes = 10;  // smaller than one block
  EXPECT_EQ(errcOf([&] { KVCache k(c); }), KVErrc::InvalidArgument);
}

TEST(KVCache, ByteBudgetGivesWholeBlocks) {
  KVCacheConfig c = tiny(0);
  // One block: 2 (K,V) * 2 layers * 2 heads * 4 tokens * 4 dims * 4 bytes = 512 bytes.
  c.memoryBudgetBytes = 512 * 10 + 100;
  KVCache k(c);
  EXPECT_EQ(k.bytesPerBlock(), 512u);
  EXPECT_EQ(k.numBlocks(), 10);
  EXPECT_EQ(k.getTotalFree(), 5120u);
  EXPECT_EQ(k.getTotalAllocated(), 0u);
  c.dtype = KVDType::F16;
  KVCache h(c);
  EXPECT_EQ(h.bytesPerBlock(), 256u);
  EXPECT_EQ(h.numBlocks(), 20);
}

TEST(KVCache, AllocateAppendFreeExactBlocks) {
  KVCache k(tiny(6));
  k.allocateFor(10, 5);  // 2 blocks: 0, 1
  EXPECT_EQ(k.blockTable(10), (Ids{0, 1}));
  EXPECT_EQ(k.usedTokens(10), 5);
  EXPECT_EQ(k.getTokenOffsetInBlock(10), 1);
  EXPECT_EQ(k.appendToken(10), 5);  // fits in block 1
  EXPECT_EQ(k.appendToken(10), 6);
  EXPECT_EQ(k.appendToken(10), 7);
  EXPECT_EQ(k.blockTable(10), (Ids{0, 1}));
  EXPECT_EQ(k.getTokenOffsetInBlock(10), 0);
  EXPECT_EQ(k.appendToken(10), 8);  // block 1 full: takes block 2
  EXPECT_EQ(k.blockTable(10), (Ids{0, 1, 2}));
  k.allocateFor(20, 1);
  EXPECT_EQ(k.blockTable(20), (Ids{3}));
  EXPECT_EQ(k.appendTokens(20, 9), 1);  // 10 tokens: 3 blocks
  EXPECT_EQ(k.blockTable(20), (Ids{3, 4, 5}));
  EXPECT_TRUE(k.isFull());
  EXPECT_EQ(k.getNumAllocatedSequences(), 2);
  k.checkInvariants();
  EXPECT_TRUE(k.freeFor(10));
  EXPECT_FALSE(k.freeFor(10));  // idempotent
  EXPECT_EQ(k.freeBlocks(), 3);
  k.allocateFor(30, 12);  // reuses the freed blocks in free-list order
  EXPECT_EQ(k.blockTable(30), (Ids{0, 1, 2}));
  k.checkInvariants();
}

TEST(KVCache, FailuresLeaveNoPartialState) {
  KVCache k(tiny(3));
  k.allocateFor(1, 8);  // blocks 0, 1
  EXPECT_EQ(errcOf([&] { k.allocateFor(2, 9); }), KVErrc::OutOfBlocks);
  EXPECT_FALSE(k.hasSequence(2));
  EXPECT_EQ(errcOf([&] { k.appendTokens(1, 5); }), KVErrc::OutOfBlocks);  // needs 2 blocks
  EXPECT_EQ(k.usedTokens(1), 8);
  EXPECT_EQ(k.freeBlocks(), 1);
  EXPECT_EQ(errcOf([&] { k.allocateFor(1, 1); }), KVErrc::SequenceExists);
  EXPECT_EQ(errcOf([&] { k.allocateFor(3, 0); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { k.appendTokens(1, 0); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { k.appendTokens(1, -3); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { k.appendToken(99); }), KVErrc::UnknownSequence);
  EXPECT_EQ(errcOf([&] { k.usedTokens(99); }), KVErrc::UnknownSequence);
  EXPECT_EQ(errcOf([&] { k.getKView(1, 2); }), KVErrc::LayerOutOfRange);
  EXPECT_EQ(errcOf([&] { k.getVView(1, -1); }), KVErrc::LayerOutOfRange);
  EXPECT_EQ(errcOf([&] { k.getKView(99, 0); }), KVErrc::UnknownSequence);
  EXPECT_EQ(errcOf([&] { k.slotFor(1, 8); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { k.fork(99, 5); }), KVErrc::UnknownSequence);
  EXPECT_EQ(errcOf([&] { k.fork(1, 1); }), KVErrc::SequenceExists);
  k.checkInvariants();
  EXPECT_EQ(k.appendTokens(1, 4), 8);  // the exact fit still works
  k.checkInvariants();
}

TEST(KVCache, ForkSharesBlocksAndCopiesThePartialLastOnWrite) {
  KVCache k(tiny(8));
  k.allocateFor(1, 6);  // blocks 0 (full), 1 (2 of 4)
  for (int32_t pos = 0; pos < 6; ++pos) {
    std::vector<float> kv(8, static_cast<float>(pos));
    k.writeKV(k.slotFor(1, pos), 0, kv.data(), kv.data());
  }
  k.fork(1, 2);
  EXPECT_EQ(k.blockTable(2), (Ids{0, 1}));
  EXPECT_EQ(k.usedBlocks(), 2);
  EXPECT_EQ(k.stats().sharedBlocks, 2);
  k.checkInvariants();
  // Appending to the fork copies block 1 into a fresh block (2) first.
  EXPECT_EQ(k.blocksNeededToAppend(2, 1), 1);
  EXPECT_EQ(k.appendToken(2), 6);
  EXPECT_EQ(k.blockTable(2), (Ids{0, 2}));
  EXPECT_EQ(k.blockTable(1), (Ids{0, 1}));
  EXPECT_EQ(k.stats().sharedBlocks, 1);
  // The source now owns block 1 alone and appends in place.
  EXPECT_EQ(k.blocksNeededToAppend(1, 1), 0);
  EXPECT_EQ(k.appendToken(1), 6);
  EXPECT_EQ(k.blockTable(1), (Ids{0, 1}));
  k.checkInvariants();
  // The copied rows came along.
  std::vector<float> out(2 * 7 * 4);
  gather(k.getKView(2, 0), out.data());
  for (int32_t pos = 0; pos < 6; ++pos) EXPECT_EQ(out[pos * 4], static_cast<float>(pos));
  // Freeing one side keeps the shared full block for the other.
  k.freeFor(1);
  EXPECT_EQ(k.blockTable(2), (Ids{0, 2}));
  EXPECT_EQ(k.usedBlocks(), 2);
  k.checkInvariants();
}

TEST(KVCache, ForkAtBlockBoundaryNeedsNoCopy) {
  KVCache k(tiny(4));
  k.allocateFor(1, 4);
  k.fork(1, 2);
  EXPECT_EQ(k.blocksNeededToAppend(2, 1), 1);  // a fresh block, no copy
  k.appendToken(2);
  EXPECT_EQ(k.blockTable(2), (Ids{0, 1}));
  EXPECT_EQ(k.blockTable(1), (Ids{0}));
  k.checkInvariants();
}

TEST(KVCache, CopyOnWriteIsAllOrNothing) {
  KVCache k(tiny(2));
  k.allocateFor(1, 6);  // both blocks
  k.fork(1, 2);
  EXPECT_EQ(errcOf([&] { k.appendToken(2); }), KVErrc::OutOfBlocks);
  EXPECT_EQ(k.blockTable(2), (Ids{0, 1}));
  EXPECT_EQ(k.usedTokens(2), 6);
  k.checkInvariants();
}

TEST(KVCache, StatsCountEachPhysicalSlotOnce) {
  KVCache k(tiny(8));
  k.allocateFor(1, 5);  // 2 blocks, 5 of 8 slots
  KVCacheStats st = k.stats();
  EXPECT_EQ(st.liveTokens, 5);
  EXPECT_EQ(st.allocatedTokenSlots, 8);
  EXPECT_DOUBLE_EQ(k.getFragmentation(), 3.0 / 8.0);
  EXPECT_DOUBLE_EQ(k.getUtilization(), 5.0 / 8.0);
  k.fork(1, 2);  // shares both blocks: nothing new allocated
  st = k.stats();
  EXPECT_EQ(st.liveTokens, 5);
  EXPECT_EQ(st.allocatedTokenSlots, 8);
  EXPECT_EQ(k.getTotalAllocated(), 2 * k.bytesPerBlock());
  EXPECT_EQ(k.getTotalAllocated() + k.getTotalFree(), 8 * k.bytesPerBlock());
  k.appendToken(2);  // copy of the 1-token tail + the new token
  st = k.stats();
  EXPECT_EQ(st.liveTokens, 7);
  EXPECT_EQ(st.allocatedTokenSlots, 12);
}

TEST(KVCache, DumpsShowStatsAndBlockTables) {
  KVCache k(tiny(4));
  k.allocateFor(3, 5);
  k.fork(3, 4);
  std::ostringstream os;
  k.dumpCacheStats(os);
  const std::string s = os.str();
  EXPECT_NE(s.find("Total blocks: 4"), std::string::npos) << s;
  EXPECT_NE(s.find("Used blocks: 2 (2 shared)"), std::string::npos) << s;
  EXPECT_NE(s.find("seq 3: 5 tokens, blocks [0* 1*]"), std::string::npos) << s;
  std::ostringstream map;
  k.dumpBlockMap(map);
  EXPECT_NE(map.str().find("SS.."), std::string::npos) << map.str();
}

// Writes through slots and reads back through views, for both layouts and all dtypes.
class RoundTrip : public ::testing::TestWithParam<std::tuple<KVLayout, KVDType>> {};

TEST_P(RoundTrip, SlotsInViewsOut) {
  KVCacheConfig c;
  c.numLayers = 3;
  c.numKVHeads = 2;
  c.headDim = 8;
  c.blockSizeTokens = 4;
  c.numBlocks = 16;
  c.layout = std::get<0>(GetParam());
  c.dtype = std::get<1>(GetParam());
  KVCache k(c);
  k.warmup();
  // Interleave two sequences so their blocks are not consecutive.
  auto value = [](SeqId s, int32_t layer, int32_t pos, int32_t head, int32_t d, bool isV) {
    // Small integers and halves: exact in f16 and bf16.
    return static_cast<float>((static_cast<int>(s) * 7 + layer * 5 + pos * 3 + head * 2 + d) % 64) *
               (isV ? -0.5f : 0.5f);
  };
  const SeqId seqs[2] = {11, 22};
  for (SeqId s : seqs) k.allocateFor(s, 1);
  for (int32_t pos = 0; pos < 11; ++pos) {
    for (SeqId s : seqs) {
      if (pos > 0) k.appendToken(s);
      const TokenSlot slot = k.slotFor(s, pos);
      for (int32_t layer = 0; layer < c.numLayers; ++layer) {
        std::vector<float> kr(16), vr(16);
        for (int32_t h = 0; h < 2; ++h) {
          for (int32_t d = 0; d < 8; ++d) {
            kr[h * 8 + d] = value(s, layer, pos, h, d, false);
            vr[h * 8 + d] = value(s, layer, pos, h, d, true);
          }
        }
        k.writeKV(slot, layer, kr.data(), vr.data());
      }
    }
  }
  EXPECT_EQ(k.blockTable(11), (Ids{0, 2, 4}));
  EXPECT_EQ(k.blockTable(22), (Ids{1, 3, 5}));
  for (SeqId s : seqs) {
    for (int32_t layer = 0; layer < c.numLayers; ++layer) {
      const PagedKVView kv = k.getKView(s, layer);
      const PagedKVView vv = k.getVView(s, layer);
      ASSERT_EQ(kv.numTokens, 11);
      ASSERT_EQ(kv.numBlocks, 3);
      std::vector<float> kOut(2 * 11 * 8), vOut(2 * 11 * 8);
      gather(kv, kOut.data());
      gather(vv, vOut.data());
      for (int32_t h = 0; h < 2; ++h) {
        for (int32_t pos = 0; pos < 11; ++pos) {
          // Exact for the float formats; Q8 within half its step (max |x| / 127 / 2) of each.
          float tol = 0;
          for (int32_t d = 0; d < 8 && c.dtype == KVDType::Q8; ++d) {
            tol = std::max(tol, std::fabs(value(s, layer, pos, h, d, false)) / 127 / 2 * 1.0001f);
          }
          for (int32_t d = 0; d < 8; ++d) {
            const size_t i = static_cast<size_t>((h * 11 + pos) * 8 + d);
            ASSERT_NEAR(kOut[i], value(s, layer, pos, h, d, false), tol);
            ASSERT_NEAR(vOut[i], value(s, layer, pos, h, d, true), tol);
          }
        }
      }
      // The raw row address agrees with the view's.
      const TokenSlot slot = k.slotFor(s, 6);
      EXPECT_EQ(k.kRow(slot, layer, 1), kv.row(6, 1));
      EXPECT_EQ(k.vRow(slot, layer, 1), vv.row(6, 1));
    }
  }
  k.checkInvariants();
}

INSTANTIATE_TEST_SUITE_P(AllLayoutsAndDtypes, RoundTrip,
                         ::testing::Combine(::testing::Values(KVLayout::LayerMajor,
                                                              KVLayout::HeadMajor),
                                            ::testing::Values(KVDType::F32, KVDType::F16,
                                                              KVDType::BF16, KVDType::Q8)));

// Q8 rows as kv_config.h defines them: scale = max |x| / 127 in float32 after the row's values,
// q = round-half-even(x / scale), read back as float(q) * scale; an all-zero row has scale 0.
TEST(KVCache, Q8RowsStoreInt8AndAScale) {
  KVCacheConfig c;
  c.numLayers = 1;
  c.numKVHeads = 2;
  c.headDim = 8;
  c.blockSizeTokens = 4;
  c.numBlocks = 2;
  c.dtype = KVDType::Q8;
  KVCache k(c);
  EXPECT_EQ(k.bytesPerBlock(), 2u * 2 * (8 + 4) * 4);  // K and V, 2 heads, 12-byte rows, 4 tokens
  k.allocateFor(1, 2);
  const float row[16] = {2.54f, -1.27f, 0.01f, 0.0f, -2.54f, 0.635f, 1.905f, 0.03f,
                         0, 0, 0, 0, 0, 0, 0, 0};  // head 1 all zeros
  k.writeKV(k.slotFor(1, 1), 0, row, row);
  const std::byte* r = k.kRow(k.slotFor(1, 1), 0, 0);
  const float scale = 2.54f / 127.0f;
  for (int d = 0; d < 8; ++d) {
    const int expect = static_cast<int>(std::nearbyint(row[d] / scale));
    EXPECT_EQ(static_cast<int8_t>(r[d]), expect) << d;
  }
  float stored;
  std::memcpy(&stored, r + 8, 4);
  EXPECT_EQ(stored, scale);
  EXPECT_EQ(static_cast<int8_t>(r[0]), 127);
  EXPECT_EQ(static_cast<int8_t>(r[4]), -127);
  std::memcpy(&stored, k.kRow(k.slotFor(1, 1), 0, 1) + 8, 4);
  EXPECT_EQ(stored, 0.0f);
  std::vector<float> out(2 * 2 * 8);
  gather(k.getKView(1, 0), out.data());
  // Head 0, position 1: within half a step of the original.
  for (int d = 0; d < 8; ++d) EXPECT_NEAR(out[8 + d], row[d], scale / 2 * 1.0001f) << d;
  for (int d = 0; d < 8; ++d) EXPECT_EQ(out[2 * 8 + 8 + d], 0.0f);
}

TEST(KVCache, StorageDtypesRoundToNearest) {
  // f16 keeps 11 significant bits, bf16 8: check the conversion on non-representable values.
  const float x = 1.0f + 1.0f / 4096.0f;  // between f16 neighbours 1 and 1+2^-10
  EXPECT_EQ(halfToFloat(floatToHalf(x)), 1.0f);
  EXPECT_EQ(halfToFloat(floatToHalf(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(halfToFloat(floatToHalf(1e6f))));
  EXPECT_EQ(halfToFloat(floatToHalf(5.9604645e-08f)), 5.9604645e-08f);  // smallest subnormal
  EXPECT_EQ(bf16ToFloat(floatToBf16(1.0f + 1.0f / 256.0f)), 1.0f);  // ties to even
  EXPECT_EQ(bf16ToFloat(floatToBf16(-3.0f)), -3.0f);
  EXPECT_TRUE(std::isnan(bf16ToFloat(floatToBf16(NAN))));
}

}  // namespace
}  // namespace cortex::kv
