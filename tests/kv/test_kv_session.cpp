// KV sessions: a cached prefix saved from one cache and loaded into another hits with the same
// K/V (plain and hybrid caches); what is held while saving; and every kind of bad file refused
// with the cache unchanged.
#include <gtest/gtest.h>

#include <cstring>
#include <sstream>

#include "kv/kv_cache.h"
#include "kv_test_util.h"

namespace cortex::kv {
namespace {

using testing::errcOf;
using Tokens = std::vector<int32_t>;

KVCacheConfig config(bool windowed, KVDType dtype = KVDType::F32, uint64_t seed = 7) {
  KVCacheConfig c;
  c.numLayers = 3;
  c.numKVHeads = 2;
  c.headDim = 8;
  c.blockSizeTokens = 4;
  c.numBlocks = 64;
  c.dtype = dtype;
  c.prefixHashSeed = seed;
  if (windowed) c.layerWindows = {6, 0, 6};
  return c;
}

Tokens iota(int32_t n) {
  Tokens t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = 1000 + 3 * i;
  return t;
}

float value(int32_t pos, int32_t layer, int32_t head, int32_t d) {
  return static_cast<float>(pos * 100 + layer * 10 + head) + static_cast<float>(d) / 8;
}

// A sequence computed one block at a time (windows giving blocks back as it grows), its blocks
// registered as the engine does, then freed: its prefix is cached.
void computeAndFree(KVCache& k, const Tokens& t) {
  const int32_t B = k.blockSizeTokens();
  k.allocateFor(1, B);
  for (int32_t pos = 0; pos < static_cast<int32_t>(t.size()); ++pos) {
    if (pos >= B && pos % B == 0) k.appendTokens(1, B);
    for (int32_t layer = 0; layer < 3; ++layer) {
      float kv[16];
      for (int32_t h = 0; h < 2; ++h)
        for (int32_t d = 0; d < 8; ++d) kv[h * 8 + d] = value(pos, layer, h, d);
      k.writeKV(k.slotFor(1, pos, k.arena().groupOf(layer)), layer, kv, kv);
    }
    if ((pos + 1) % B == 0) k.cacheComputedBlocks(1, std::span(t).first(static_cast<size_t>(pos) + 1));
  }
  k.freeFor(1);
}

class Sessions : public ::testing::TestWithParam<bool> {};

TEST_P(Sessions, ASavedPrefixHitsInAnotherCacheWithTheSameKV) {
  const bool windowed = GetParam();
  KVCache a(config(windowed));
  const Tokens t = iota(40);
  computeAndFree(a, t);
  Tokens prompt = t;
  prompt.push_back(5);  // one more token to compute
  ASSERT_EQ(a.cachedPrefixTokens(prompt), 40);
  std::stringstream file;
  EXPECT_EQ(a.saveSession(prompt, "{\"note\": 1}", file), 40);
  a.checkInvariants();
  EXPECT_EQ(a.stats().usedBlocks, 0);  // the holds are given back

  KVCache b(config(windowed));
  const KVCache::LoadedSession s = b.loadSession(file);
  EXPECT_EQ(s.tokens, t);
  EXPECT_EQ(s.metadata, "{\"note\": 1}");
  // Global groups save every block; windowed ones only what the query after the prefix reads.
  EXPECT_EQ(s.blocksLoaded, windowed ? 10 + 2 * 2 : 10);
  b.checkInvariants();
  EXPECT_EQ(b.stats().usedBlocks, 0);
  EXPECT_EQ(b.stats().cachedBlocks, s.blocksLoaded);
  EXPECT_EQ(b.cachedPrefixTokens(prompt), 40);
  ASSERT_EQ(b.tryAllocateWithPrefix(2, prompt, 41), 40);
  for (int32_t layer = 0; layer < 3; ++layer) {
    const PagedKVView v = b.getKView(2, layer);
    const bool hasWindow = windowed && layer != 1;
    for (int32_t pos = hasWindow ? 41 - 6 : 0; pos < 40; ++pos) {
      for (int32_t h = 0; h < 2; ++h) {
        float row[8];
        std::memcpy(row, v.row(pos, h), sizeof row);
        for (int32_t d = 0; d < 8; ++d) ASSERT_EQ(row[d], value(pos, layer, h, d)) << pos;
      }
    }
  }
  b.checkInvariants();
  // Loading it again finds everything cached already.
  b.freeFor(2);
  file.clear();
  file.seekg(0);
  EXPECT_EQ(b.loadSession(file).blocksLoaded, 0);
  b.checkInvariants();
}

INSTANTIATE_TEST_SUITE_P(PlainAndHybrid, Sessions, ::testing::Bool());

TEST(KVSession, SavingHoldsBlocksInUseAndSavesOnlyWhatIsCached) {
  KVCache k(config(false, KVDType::Q8));
  const Tokens t = iota(12);
  k.allocateFor(1, 12);
  k.cacheComputedBlocks(1, std::span(t).first(8));  // blocks 0 and 1 registered, 2 not yet
  std::stringstream file;
  EXPECT_EQ(k.saveSession(t, "", file), 8);
  EXPECT_EQ(k.stats().usedBlocks, 3);  // the sequence still holds its blocks
  k.checkInvariants();
  std::stringstream empty;
  EXPECT_EQ(k.saveSession(iota(3), "", empty), 0);  // less than a block: nothing to save
  KVCache other(config(false, KVDType::Q8));
  EXPECT_EQ(other.loadSession(empty).tokens.size(), 0u);
  EXPECT_EQ(other.loadSession(file).blocksLoaded, 2);
  other.checkInvariants();
}

TEST(KVSession, BadFilesAreRefusedAndChangeNothing) {
  KVCache a(config(false));
  const Tokens t = iota(16);
  computeAndFree(a, t);
  std::stringstream saved;
  a.saveSession(t, "meta", saved);
  const std::string good = saved.str();

  KVCache b(config(false));
  computeAndFree(b, iota(8));  // something cached already, to see it is kept
  const int32_t cached = b.stats().cachedBlocks;
  auto load = [&](const std::string& bytes) {
    std::stringstream in(bytes);
    try {
      b.loadSession(in);
    } catch (const KVError& e) {
      EXPECT_EQ(b.stats().cachedBlocks, cached);
      EXPECT_EQ(b.stats().usedBlocks, 0);
      b.checkInvariants();
      return std::string(e.what());
    }
    return std::string("loaded");
  };
  EXPECT_NE(load("hello").find("not a CortexStream KV session"), std::string::npos);
  EXPECT_NE(load("").find("not a CortexStream KV session"), std::string::npos);
  EXPECT_NE(load(good.substr(0, good.size() / 2)).find("truncated"), std::string::npos);
  EXPECT_NE(load(good.substr(0, 20)).find("truncated"), std::string::npos);
  std::string flipped = good;
  flipped[good.size() / 2] = static_cast<char>(flipped[good.size() / 2] ^ 0x40);
  EXPECT_NE(load(flipped).find("checksum"), std::string::npos);
  std::string version = good;
  version[8] = 9;
  EXPECT_NE(load(version).find("version 9"), std::string::npos);
  // Another model (seed) or another KV format.
  KVCache otherModel(config(false, KVDType::F32, 8));
  std::stringstream in1(good);
  EXPECT_EQ(errcOf([&] { otherModel.loadSession(in1); }), KVErrc::InvalidArgument);
  KVCache otherFormat(config(false, KVDType::F16));
  std::stringstream in2(good);
  try {
    otherFormat.loadSession(in2);
    FAIL() << "loaded into another format";
  } catch (const KVError& e) {
    EXPECT_NE(std::string(e.what()).find("KV format f32"), std::string::npos) << e.what();
  }
  EXPECT_EQ(load(good), "loaded");
}

TEST(KVSession, APoolTooSmallRefusesTheWholeSession) {
  KVCache a(config(false));
  const Tokens t = iota(40);
  computeAndFree(a, t);
  std::stringstream file;
  a.saveSession(t, "", file);
  KVCacheConfig small = config(false);
  small.numBlocks = 6;
  KVCache b(small);
  b.allocateFor(3, 4);
  EXPECT_EQ(errcOf([&] { b.loadSession(file); }), KVErrc::OutOfBlocks);
  EXPECT_EQ(b.stats().usedBlocks, 1);
  EXPECT_EQ(b.stats().cachedBlocks, 0);
  b.checkInvariants();
}

TEST(KVSession, NeedsPrefixCaching) {
  KVCacheConfig c = config(false);
  c.prefixCaching = false;
  KVCache k(c);
  std::stringstream s;
  EXPECT_EQ(errcOf([&] { k.saveSession(iota(8), "", s); }), KVErrc::InvalidArgument);
  EXPECT_EQ(errcOf([&] { k.loadSession(s); }), KVErrc::InvalidArgument);
}

}  // namespace
}  // namespace cortex::kv
