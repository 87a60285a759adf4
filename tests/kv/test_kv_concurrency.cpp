// Several threads allocate, append, fork, read views and free on one cache at once (run under
// TSan in CI). Each thread owns its sequence ids, writes K/V only to slots it reserved, and checks
// that what it reads back is its own.
#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "kv/kv_cache.h"

namespace cortex::kv {
namespace {

// The prefix-cache tests' cache: one layer, one head, two f32 dims per row, blocks of 4 tokens.
// A family's prompt is family * 100 + i at position i, and the value stored at a position is
// family * 1000 + pos, so whatever a thread reads says which prefix computed it.
KVCacheConfig familyCacheConfig(int32_t numBlocks) {
  KVCacheConfig c;
  c.numLayers = 1;
  c.numKVHeads = 1;
  c.headDim = 2;
  c.blockSizeTokens = 4;
  c.numBlocks = numBlocks;
  c.dtype = KVDType::F32;
  return c;
}

float familyValue(int family, int32_t pos) { return static_cast<float>(family * 1000 + pos); }

std::vector<int32_t> familyTokens(int family, int32_t n) {
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) tokens[static_cast<size_t>(i)] = family * 100 + i;
  return tokens;
}

TEST(KVConcurrency, ThreadsShareOnePoolSafely) {
  KVCacheConfig c;
  c.numLayers = 2;
  c.numKVHeads = 2;
  c.headDim = 4;
  c.blockSizeTokens = 4;
  c.numBlocks = 64;
  c.dtype = KVDType::F32;
  KVCache cache(c);
  constexpr int kThreads = 4;
  constexpr int kRounds = 300;
  std::atomic<int> outOfBlocks{0};
  std::atomic<int> mismatches{0};
  std::atomic<bool> stop{false};

  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<uint32_t>(tid));
    for (int round = 0; round < kRounds; ++round) {
      const SeqId s = static_cast<SeqId>(tid) * 1000000 + static_cast<SeqId>(round) * 2;
      const float tag = static_cast<float>(tid * 1000 + round % 1000);
      try {
        cache.allocateFor(s, 1 + static_cast<int32_t>(rng() % 6));
        const int32_t appends = static_cast<int32_t>(rng() % 12);
        for (int32_t i = 0; i < appends; ++i) cache.appendToken(s);
        const int32_t n = cache.usedTokens(s);
        std::vector<float> row(8, tag);
        for (int32_t pos = 0; pos < n; ++pos) {
          const TokenSlot slot = cache.slotFor(s, pos);
          for (int32_t layer = 0; layer < 2; ++layer) cache.writeKV(slot, layer, row.data(), row.data());
        }
        if (rng() % 2 == 0) {
          cache.fork(s, s + 1);
          cache.appendToken(s + 1);  // copy on write of a partial last block, maybe
          cache.freeFor(s + 1);
        }
        std::vector<float> out(static_cast<size_t>(2 * n * 4));
        gather(cache.getKView(s, 1), out.data());
        for (float v : out) mismatches += v == tag ? 0 : 1;
        (void)cache.stats();
      } catch (const KVError& e) {
        if (e.code() != KVErrc::OutOfBlocks) throw;
        ++outOfBlocks;
      }
      cache.freeFor(s);
      cache.freeFor(s + 1);
    }
  };
  // A monitor thread reads statistics and dumps while the workers run.
  std::thread monitor([&] {
    while (!stop.load()) {
      (void)cache.getFragmentation();
      (void)cache.getTotalAllocated();
      cache.checkInvariants();
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
  stop = true;
  monitor.join();
  EXPECT_EQ(mismatches.load(), 0);
  cache.checkInvariants();
  EXPECT_EQ(cache.freeBlocks(), c.numBlocks);
  EXPECT_EQ(cache.getNumAllocatedSequences(), 0);
}

// Threads admit prompts from three shared families on the prefix cache: a hit may land on blocks
// another thread computed (and published with cacheComputedBlocks after writing them) and still
// holds, or on cached blocks nobody holds; every value read must be the one its position's prefix
// gives.
TEST(KVConcurrency, ThreadsHitEachOthersCachedPrefixes) {
  KVCache cache(familyCacheConfig(48));
  std::atomic<int64_t> hits{0};
  std::atomic<int> mismatches{0};
  std::atomic<bool> stop{false};
  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<uint32_t>(tid + 10));
    for (int round = 0; round < 300; ++round) {
      const SeqId s = static_cast<SeqId>(tid) * 1000000 + static_cast<SeqId>(round) * 2;
      const int family = static_cast<int>(rng() % 3);
      const auto n = static_cast<int32_t>(1 + rng() % 24);
      const std::vector<int32_t> tokens = familyTokens(family, n);
      const int32_t cached = cache.tryAllocateWithPrefix(s, tokens, n);
      if (cached < 0) continue;
      hits += cached;
      for (int32_t pos = cached; pos < n; ++pos) {
        const float v[2] = {familyValue(family, pos), 0};
        cache.writeKV(cache.slotFor(s, pos), 0, v, v);
      }
      cache.cacheComputedBlocks(s, tokens);
      if (rng() % 2 == 0) {
        cache.fork(s, s + 1);
        cache.appendToken(s + 1);  // copy on write of a shared partial block, outside the lock
        std::vector<float> out(static_cast<size_t>(2 * (n + 1)));
        gather(cache.getKView(s + 1, 0), out.data());
        for (int32_t pos = 0; pos < n; ++pos) {
          mismatches += out[static_cast<size_t>(2 * pos)] == familyValue(family, pos) ? 0 : 1;
        }
        cache.freeFor(s + 1);
      }
      std::vector<float> out(static_cast<size_t>(2 * n));
      gather(cache.getKView(s, 0), out.data());
      for (int32_t pos = 0; pos < n; ++pos) {
        mismatches += out[static_cast<size_t>(2 * pos)] == familyValue(family, pos) ? 0 : 1;
      }
      cache.freeFor(s);
    }
  };
  std::thread monitor([&] {
    while (!stop.load()) {
      (void)cache.stats();
      cache.checkInvariants();
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
  stop = true;
  monitor.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_GT(hits.load(), 0);
  cache.checkInvariants();
  EXPECT_EQ(cache.stats().usedBlocks, 0);
}

// Sessions beside the traffic: one thread saves the families' cached prefixes while three others
// allocate, hit, evict and free, and loads each saved session into a second cache and into this
// one. A saved block is held while copied, so what a session holds must be exactly the values its
// tokens computed, whatever was evicted meanwhile; loading into the busy cache must keep every hit
// right.
TEST(KVConcurrency, SessionsSaveAndLoadBesideTraffic) {
  const KVCacheConfig c = familyCacheConfig(40);
  KVCache cache(c);
  std::atomic<int> mismatches{0};
  std::atomic<bool> sessionsDone{false};
  // The traffic runs until the session thread has done its rounds (so they always overlap).
  auto worker = [&](int tid) {
    std::mt19937 rng(static_cast<uint32_t>(tid + 20));
    for (int round = 0; round < 1000000 && !sessionsDone.load(); ++round) {
      const SeqId s = static_cast<SeqId>(tid) * 10000000 + static_cast<SeqId>(round);
      const int family = static_cast<int>(rng() % 3);
      const auto n = static_cast<int32_t>(1 + rng() % 24);
      const std::vector<int32_t> tokens = familyTokens(family, n);
      const int32_t cached = cache.tryAllocateWithPrefix(s, tokens, n);
      if (cached < 0) continue;
      for (int32_t pos = cached; pos < n; ++pos) {
        const float v[2] = {familyValue(family, pos), 0};
        cache.writeKV(cache.slotFor(s, pos), 0, v, v);
      }
      cache.cacheComputedBlocks(s, tokens);
      std::vector<float> out(static_cast<size_t>(2 * n));
      gather(cache.getKView(s, 0), out.data());
      for (int32_t pos = 0; pos < n; ++pos) {
        mismatches += out[static_cast<size_t>(2 * pos)] == familyValue(family, pos) ? 0 : 1;
      }
      cache.freeFor(s);
    }
  };
  int saved = 0;
  std::thread sessions([&] {
    KVCacheConfig other = c;
    other.numBlocks = 64;
    KVCache copy(other);
    // Until 50 sessions held something (the workers may start after this thread).
    for (int round = 0; saved < 50 && round < 1000000; ++round) {
      const int family = round % 3;
      std::stringstream file;
      const int32_t n = cache.saveSession(familyTokens(family, 24), "", file);
      if (n == 0) continue;
      ++saved;
      const std::string bytes = file.str();
      std::stringstream in(bytes);
      copy.resetPrefixCache();
      const KVCache::LoadedSession s = copy.loadSession(in);
      const SeqId id = 7;
      if (copy.tryAllocateWithPrefix(id, s.tokens, n + 1) != n) {
        ++mismatches;  // everything saved must hit
        continue;
      }
      std::vector<float> out(static_cast<size_t>(2 * (n + 1)));
      gather(copy.getKView(id, 0), out.data());
      for (int32_t pos = 0; pos < n; ++pos) {
        mismatches += out[static_cast<size_t>(2 * pos)] == familyValue(family, pos) ? 0 : 1;
      }
      copy.freeFor(id);
      std::stringstream again(bytes);
      try {
        cache.loadSession(again);  // into the busy cache: its hits must stay right
      } catch (const KVError& e) {
        if (e.code() != KVErrc::OutOfBlocks) throw;
      }
    }
    sessionsDone = true;
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) threads.emplace_back(worker, t);
  sessions.join();
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(saved, 50);
  cache.checkInvariants();
  EXPECT_EQ(cache.stats().usedBlocks, 0);
}

}  // namespace
}  // namespace cortex::kv
