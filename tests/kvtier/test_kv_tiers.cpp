// The tier machinery without a model: block records (every refusal), blocks copied out of one
// cache and installed into another with the same bytes, and KVTiers over in-memory stores
// (write-through, loads that stop at the first block a tier cannot give, damaged records deleted,
// a slow tier left unread, a full write queue).
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <map>
#include <set>
#include <thread>

#include "kv/kv_cache.h"
#include "kvtier/block_record.h"
#include "kvtier/kv_tiers.h"

namespace cortex::kvtier {
namespace {

using Tokens = std::vector<int32_t>;

kv::KVCacheConfig config(bool windowed, uint64_t seed = 7) {
  kv::KVCacheConfig c;
  c.numLayers = 3;
  c.numKVHeads = 2;
  c.headDim = 8;
  c.blockSizeTokens = 4;
  c.numBlocks = 64;
  c.dtype = kv::KVDType::F32;
  c.prefixHashSeed = seed;
  if (windowed) c.layerWindows = {6, 0, 6};
  return c;
}

Tokens iota(int32_t n, int32_t base = 1000) {
  Tokens t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = base + 3 * i;
  return t;
}

float value(int32_t pos, int32_t layer, int32_t head, int32_t d) {
  return static_cast<float>(pos * 100 + layer * 10 + head) + static_cast<float>(d) / 8;
}

// Computes `t` as sequence `seq` one block at a time, registering full blocks as the engine does.
void compute(kv::KVCache& k, kv::SeqId seq, const Tokens& t) {
  const int32_t B = k.blockSizeTokens();
  k.allocateFor(seq, B);
  for (int32_t pos = 0; pos < static_cast<int32_t>(t.size()); ++pos) {
    if (pos >= B && pos % B == 0) k.appendTokens(seq, B);
    for (int32_t layer = 0; layer < 3; ++layer) {
      float kv[16];
      for (int32_t h = 0; h < 2; ++h)
        for (int32_t d = 0; d < 8; ++d) kv[h * 8 + d] = value(pos, layer, h, d);
      k.writeKV(k.slotFor(seq, pos, k.arena().groupOf(layer)), layer, kv, kv);
    }
    if ((pos + 1) % B == 0) {
      k.cacheComputedBlocks(seq, std::span(t).first(static_cast<size_t>(pos) + 1));
    }
  }
}

// Reads position pos of layer `layer` (K) in sequence `seq` and checks it holds value().
void expectKeys(kv::KVCache& k, kv::SeqId seq, int32_t from, int32_t to) {
  for (int32_t pos = from; pos < to; ++pos) {
    for (int32_t layer = 0; layer < 3; ++layer) {
      const kv::TokenSlot slot = k.slotFor(seq, pos, k.arena().groupOf(layer));
      for (int32_t h = 0; h < 2; ++h) {
        const auto* row = reinterpret_cast<const float*>(k.kRow(slot, layer, h));
        for (int32_t d = 0; d < 8; ++d) ASSERT_EQ(row[d], value(pos, layer, h, d)) << pos;
      }
    }
  }
}

// A tier in memory, with faults to order.
class MemoryStore final : public BlockStore {
 public:
  explicit MemoryStore(std::string name = "disk") : name_(std::move(name)) {}
  const char* name() const override { return name_.c_str(); }
  std::vector<uint8_t> contains(std::span<const uint64_t> keys) override {
    std::vector<uint8_t> out;
    for (uint64_t k : keys) out.push_back(down ? 0 : records.count(k) != 0 ? 1 : 0);
    return out;
  }
  Fetched get(uint64_t key) override {
    ++gets;
    Fetched f;
    if (down) {
      f.status = Fetched::Status::Failed;
      f.error = "down";
    } else if (auto it = records.find(key); it != records.end() && !hidden.count(key)) {
      f.status = Fetched::Status::Found;
      f.bytes = it->second;
    }
    return f;
  }
  bool put(uint64_t key, std::span<const std::byte> record, std::string& error) override {
    if (down) {
      error = "down";
      return false;
    }
    records.emplace(key, std::vector<std::byte>(record.begin(), record.end()));
    return true;
  }
  void remove(uint64_t key) override { records.erase(key); }
  bool up() const override { return !down; }
  bool probe() override {
    ++probes;
    return !down;
  }
  uint64_t bytesStored() const override { return 0; }

  std::string name_;
  std::map<uint64_t, std::vector<std::byte>> records;
  std::set<uint64_t> hidden;  // listed by contains, missing on get (deleted behind its back)
  std::atomic<bool> down{false};  // read by the worker's idle probes
  int gets = 0;
  std::atomic<int> probes{0};
};

TEST(BlockRecord, RoundTripAndEveryRefusal) {
  kv::KVCache::ExportedBlock b;
  b.key = 11;
  b.parent = 22;
  b.index = 3;
  b.group = 1;
  b.tokens = {5, 6, 7, 8};
  b.payload.resize(64);
  for (size_t i = 0; i < b.payload.size(); ++i) b.payload[i] = static_cast<std::byte>(i);
  const std::vector<std::byte> rec = encodeBlockRecord(99, b);
  ExpectedBlock e{99, 11, 22, 3, 1, b.tokens, 64};
  std::span<const std::byte> payload;
  ASSERT_EQ(checkBlockRecord(rec, e, payload), "");
  ASSERT_EQ(payload.size(), 64u);
  EXPECT_EQ(std::memcmp(payload.data(), b.payload.data(), 64), 0);

  auto refused = [&](std::vector<std::byte> r, ExpectedBlock x, const std::string& why) {
    std::span<const std::byte> p;
    const std::string got = checkBlockRecord(r, x, p);
    EXPECT_NE(got.find(why), std::string::npos) << got;
    EXPECT_TRUE(p.empty());
  };
  refused({}, e, "not a CortexStream");
  refused(std::vector<std::byte>(rec.begin(), rec.begin() + 20), e, "truncated");
  refused(std::vector<std::byte>(rec.begin(), rec.end() - 1), e, "truncated or damaged");
  auto flipped = rec;
  flipped[100] ^= std::byte{1};
  refused(flipped, e, "checksum");
  ExpectedBlock other = e;
  other.hashRoot = 98;
  refused(rec, other, "another model");
  other = e;
  other.key = 12;
  refused(rec, other, "another key");
  other = e;
  other.payloadBytes = 32;
  refused(rec, other, "payload size");
  const Tokens otherTokens = {5, 6, 7, 9};
  other = e;
  other.tokens = otherTokens;
  refused(rec, other, "other tokens");
  other = e;
  other.parent = 23;
  refused(rec, other, "other tokens");
}

class Tiers : public ::testing::TestWithParam<bool> {};

// Blocks copied out of one cache and installed into another give the same keys, for plain and
// hybrid caches; a pool too small takes the longest run of whole blocks that fits.
TEST_P(Tiers, ExportedBlocksInstallIntoAnotherCache) {
  kv::KVCache a(config(GetParam()));
  a.recordNewBlocks(true);
  const Tokens t = iota(20);
  compute(a, 1, t);
  std::vector<kv::KVCache::ExportedBlock> out;
  a.takeNewBlocks(out);
  const int32_t G = a.numGroups();
  ASSERT_EQ(out.size(), static_cast<size_t>(5 * G));
  out.clear();
  a.takeNewBlocks(out);
  EXPECT_TRUE(out.empty()) << "taken once";
  compute(a, 2, t);  // the same content again: hits nothing new (it was never looked up) ...
  a.takeNewBlocks(out);
  EXPECT_TRUE(out.empty()) << "... and registers no second copy";

  kv::KVCache b(config(GetParam()));
  std::vector<kv::KVCache::ExportedBlock> blocks;
  a.recordNewBlocks(false);
  a.recordNewBlocks(true);
  a.freeFor(1);
  a.freeFor(2);
  a.resetPrefixCache();
  compute(a, 3, t);
  a.takeNewBlocks(blocks);
  ASSERT_EQ(blocks.size(), static_cast<size_t>(5 * G));
  std::vector<kv::KVCache::TierBlock> tier;
  for (const auto& e : blocks) {
    EXPECT_EQ(e.key, b.tierKey(b.blockHashes(t)[static_cast<size_t>(e.index)], e.group));
    tier.push_back({e.index, e.group, e.payload.data()});
  }
  EXPECT_EQ(b.installTierBlocks(std::span(t).first(20), tier), 5);
  b.checkInvariants();
  EXPECT_EQ(b.cachedPrefixTokens(t), 20);
  ASSERT_EQ(b.tryAllocateWithPrefix(9, t, 21), 20);
  expectKeys(b, 9, GetParam() ? 15 : 0, 20);  // a window reads only its last positions

  // Four free blocks: whole logical blocks only (each needs every group).
  kv::KVCache small([&] {
    kv::KVCacheConfig c = config(GetParam());
    c.numBlocks = 4;
    return c;
  }());
  const int32_t fits = 4 / G;
  EXPECT_EQ(small.installTierBlocks(std::span(t).first(20), tier), fits);
  small.checkInvariants();
  EXPECT_EQ(small.cachedPrefixTokens(t), fits * 4);
}

INSTANTIATE_TEST_SUITE_P(PlainAndHybrid, Tiers, ::testing::Bool());

struct TierRig {
  kv::KVCache cache{config(false)};
  MemoryStore* disk = nullptr;
  MemoryStore* redis = nullptr;
  std::unique_ptr<KVTiers> tiers;
  std::vector<std::string> warnings;
  explicit TierRig(KVTiers::Options o = {}) {
    auto d = std::make_unique<MemoryStore>("disk");
    auto r = std::make_unique<MemoryStore>("redis");
    disk = d.get();
    redis = r.get();
    std::vector<std::unique_ptr<BlockStore>> stores;
    stores.push_back(std::move(d));
    stores.push_back(std::move(r));
    o.warn = [this](const std::string& w) { warnings.push_back(w); };
    tiers = std::make_unique<KVTiers>(cache, std::move(stores), std::move(o));
  }
  // Computes t as sequence 1, writes its blocks through to the tiers, then frees it and empties
  // the pool's prefix cache: only the tiers hold t's blocks.
  void computeStoreAndForget(const Tokens& t) {
    compute(cache, 1, t);
    tiers->storeNewBlocks();
    tiers->flush();
    cache.freeFor(1);
    cache.resetPrefixCache();
  }
  // Loads blocks [first, end) of t and installs them; returns the hits.
  std::vector<TierHit> load(const Tokens& t, int32_t first, int32_t end) {
    const KVTiers::Ticket ticket = tiers->startLoad(t, first, end);
    std::vector<TierHit> hits;
    while (!tiers->finishLoad(ticket, hits)) std::this_thread::yield();
    return hits;
  }
};

TEST(KVTiers, WriteThroughThenLoadBackAfterTheCacheForgot) {
  TierRig s;
  const Tokens t = iota(24);
  compute(s.cache, 1, t);
  s.tiers->storeNewBlocks();
  s.tiers->flush();
  EXPECT_EQ(s.disk->records.size(), 6u);
  EXPECT_EQ(s.redis->records.size(), 6u);
  s.cache.freeFor(1);
  s.cache.resetPrefixCache();
  ASSERT_EQ(s.cache.cachedPrefixTokens(t), 0);

  const std::vector<TierHit> hits = s.load(t, 0, 5);
  ASSERT_EQ(hits.size(), 1u);
  EXPECT_EQ(hits[0].tier, 0);
  EXPECT_EQ(hits[0].firstToken, 0);
  EXPECT_EQ(hits[0].tokens, 20);
  EXPECT_EQ(s.cache.cachedPrefixTokens(t), 20);
  ASSERT_EQ(s.cache.tryAllocateWithPrefix(2, t, 24), 20);
  expectKeys(s.cache, 2, 0, 20);
  s.cache.checkInvariants();
  const TiersStats st = s.tiers->stats();
  EXPECT_EQ(st.tiers[0].loadedBlocks, 5u);
  EXPECT_EQ(st.tiers[0].storedBlocks, 6u);
  EXPECT_EQ(st.tiers[1].storedBlocks, 6u);
  EXPECT_GT(st.tiers[0].readBytesPerSecond, 0);
}

TEST(KVTiers, TheNextTierServesWhatTheFirstLacksAndFailuresStopTheLoad) {
  TierRig s;
  const Tokens t = iota(24);
  s.computeStoreAndForget(t);
  const std::vector<uint64_t> chain = s.cache.blockHashes(t);

  // Disk lost blocks 2.. (deleted behind its back: listed, then missing); Redis has them.
  s.disk->hidden.insert(chain[2]);
  s.disk->records.erase(chain[3]);
  std::vector<TierHit> hits = s.load(t, 0, 5);
  ASSERT_EQ(hits.size(), 2u);
  EXPECT_EQ(hits[0].tier, 0);
  EXPECT_EQ(hits[0].tokens, 8);
  EXPECT_EQ(hits[1].tier, 1);
  EXPECT_EQ(hits[1].firstToken, 8);
  EXPECT_EQ(hits[1].tokens, 12);
  EXPECT_EQ(s.tiers->stats().tiers[0].lostRecords, 1u);
  s.cache.resetPrefixCache();

  // A damaged record is refused, deleted and counted; the load stops before it.
  s.disk->hidden.clear();
  s.disk->records[chain[1]][200] ^= std::byte{1};
  s.redis->records[chain[1]][200] ^= std::byte{1};
  hits = s.load(t, 0, 5);
  ASSERT_EQ(hits.size(), 1u);
  EXPECT_EQ(hits[0].tokens, 4);
  EXPECT_EQ(s.disk->records.count(chain[1]), 0u);
  EXPECT_EQ(s.redis->records.count(chain[1]), 0u);
  EXPECT_EQ(s.tiers->stats().tiers[0].badRecords, 1u);
  EXPECT_EQ(s.tiers->stats().tiers[1].badRecords, 1u);
  EXPECT_FALSE(s.warnings.empty());
  s.cache.resetPrefixCache();

  // Both tiers down: nothing loads, the request computes everything, writes fail and are counted.
  s.disk->down = true;
  s.redis->down = true;
  EXPECT_TRUE(s.load(t, 0, 5).empty());
  compute(s.cache, 2, iota(8, 5000));
  s.tiers->storeNewBlocks();
  s.tiers->flush();
  EXPECT_EQ(s.tiers->stats().tiers[0].storeErrors, 2u);
  EXPECT_FALSE(s.tiers->stats().tiers[0].up);
}

TEST(KVTiers, ASlowTierIsLeftUnreadAndAFullQueueDropsBlocks) {
  TierRig s;
  const Tokens t = iota(24);
  s.computeStoreAndForget(t);
  s.load(t, 0, 5);  // measures the read rate
  s.cache.resetPrefixCache();
  s.tiers->setRecomputeRate(1e15);  // computing is "faster" than any read
  // The disk's rate is known and too slow; Redis's is not known yet, so it is read (and measured).
  std::vector<TierHit> hits = s.load(t, 0, 5);
  ASSERT_EQ(hits.size(), 1u);
  EXPECT_EQ(hits[0].tier, 1);
  EXPECT_EQ(s.tiers->stats().tiers[0].skippedLoads, 1u);
  s.cache.resetPrefixCache();
  const int gets = s.disk->gets + s.redis->gets;
  EXPECT_TRUE(s.load(t, 0, 5).empty());
  EXPECT_EQ(s.disk->gets + s.redis->gets, gets) << "nothing was read";
  EXPECT_EQ(s.tiers->stats().tiers[1].skippedLoads, 1u);

  KVTiers::Options o;
  o.maxPendingStoreBytes = 1;  // no block fits
  TierRig tight(o);
  compute(tight.cache, 1, t);
  tight.tiers->storeNewBlocks();
  tight.tiers->flush();
  EXPECT_EQ(tight.tiers->stats().droppedStores, 6u);
  EXPECT_TRUE(tight.disk->records.empty());
}

TEST(KVTiers, ATierThatIsDownIsProbedWhileIdle) {
  TierRig s;
  s.redis->down = true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (s.redis->probes.load() == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_GT(s.redis->probes.load(), 0);
  EXPECT_EQ(s.disk->probes.load(), 0) << "a tier that is up is left alone";
}

TEST(KVTiers, ACancelledLoadIsForgotten) {
  TierRig s;
  const Tokens t = iota(24);
  const KVTiers::Ticket ticket = s.tiers->startLoad(t, 0, 5);
  s.tiers->cancelLoad(ticket);
  std::vector<TierHit> hits;
  EXPECT_TRUE(s.tiers->finishLoad(ticket, hits));
  EXPECT_TRUE(hits.empty());
  EXPECT_THROW(s.tiers->startLoad(t, 0, 7), std::invalid_argument);
}

}  // namespace
}  // namespace cortex::kvtier
