// The scheduling policy on tiny KV pools (one layer, one head, head size 1, blocks of 4 tokens),
// with a fake runner in place of a model: exact plans for hand-made situations, and a random
// property test against the invariants. No model file is involved.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

#include <map>
#include <random>

namespace cortex::engine {
namespace {

kv::KVCacheConfig tinyPool(int32_t numBlocks) {
  kv::KVCacheConfig c;
  c.numLayers = 1;
  c.numKVHeads = 1;
  c.headDim = 1;
  c.blockSizeTokens = 4;
  c.numBlocks = numBlocks;
  return c;
}

struct Chunk {
  kv::SeqId seq;
  int32_t first, n;
  bool completes;
  bool operator==(const Chunk&) const = default;
};

std::vector<Chunk> chunks(const StepPlan& p) {
  std::vector<Chunk> out;
  for (const auto& c : p.chunks) out.push_back({c.seq, c.firstPos, c.numTokens, c.completesContext});
  return out;
}

std::ostream& operator<<(std::ostream& os, const Chunk& c) {
  return os << "{" << c.seq << ", " << c.first << ", " << c.n << ", " << c.completes << "}";
}

// Plays the model: every chunk that completes a context yields one sampled token; a request
// finishes (and leaves) once it has generated its quota. With token ids (addTokens), computed
// blocks go into the prefix cache after each step, as the engine does after its forward pass.
struct FakeRunner {
  Scheduler& s;
  kv::KVCache& cache;
  std::map<kv::SeqId, int32_t> quota;  // tokens each request generates
  std::map<kv::SeqId, int32_t> generated;
  std::vector<kv::SeqId> finished;
  std::map<kv::SeqId, std::vector<int32_t>> tokens;  // context token ids (stable addresses)

  void add(kv::SeqId seq, int32_t prompt, int32_t outputTokens) {
    s.add(seq, prompt, prompt + outputTokens);
    quota[seq] = outputTokens;
  }
  void addTokens(kv::SeqId seq, std::vector<int32_t> prompt, int32_t outputTokens) {
    const auto n = static_cast<int32_t>(prompt.size());
    tokens[seq] = std::move(prompt);
    s.add(seq, n, n + outputTokens, &tokens[seq]);
    quota[seq] = outputTokens;
  }
  // A copy of running `parent` (whose context is complete) that generates `outputTokens`.
  void fork(kv::SeqId parent, kv::SeqId child, int32_t outputTokens) {
    tokens[child] = tokens[parent];
    s.addFork(parent, child, &tokens[child]);
    quota[child] = outputTokens;
  }
  StepPlan step() {
    StepPlan p = s.schedule();
    for (const auto& c : p.chunks) {
      auto t = tokens.find(c.seq);
      if (t != tokens.end()) {
        cache.cacheComputedBlocks(c.seq, std::span<const int32_t>(t->second)
                                             .first(static_cast<size_t>(c.firstPos + c.numTokens)));
      }
    }
    for (const auto& c : p.chunks) {
      if (!c.completesContext) continue;
      if (++generated[c.seq] == quota[c.seq]) {
        s.remove(c.seq);
        finished.push_back(c.seq);
      } else {
        auto t = tokens.find(c.seq);
        if (t != tokens.end()) t->second.push_back(static_cast<int32_t>(c.seq % 7));
        s.appendToken(c.seq);
      }
    }
    s.checkInvariants();
    return p;
  }
};

std::vector<int32_t> iota(int32_t n, int32_t from = 100) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = from + i;
  return t;
}

struct SchedulerTest : ::testing::Test {
  void make(int32_t numBlocks, int32_t budget, int32_t maxSeqs, double watermark = 0.0,
            SchedulePolicy policy = SchedulePolicy::Fcfs, int32_t maxOvertakes = 32) {
    cache = std::make_unique<kv::KVCache>(tinyPool(numBlocks));
    memory = std::make_unique<PagedBlockBudget>(*cache);
    SchedulerConfig c;
    c.maxBatchedTokens = budget;
    c.maxNumSeqs = maxSeqs;
    c.watermarkFraction = watermark;
    c.policy = policy;
    c.maxOvertakes = maxOvertakes;
    sched = std::make_unique<Scheduler>(c, *memory);
    runner = std::make_unique<FakeRunner>(FakeRunner{*sched, *cache, {}, {}, {}, {}});
  }
  std::unique_ptr<kv::KVCache> cache;
  std::unique_ptr<PagedBlockBudget> memory;
  std::unique_ptr<Scheduler> sched;
  std::unique_ptr<FakeRunner> runner;
};

TEST_F(SchedulerTest, DecodesFirstThenPrefillChunksUnderTheBudget) {
  make(64, 8, 8);
  runner->add(1, 3, 4);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 0, 3, true}}));
  runner->add(2, 20, 2);
  // Request 1 decodes (1 token), request 2's prompt gets the 7 tokens left of the budget.
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 3, 1, true}, {2, 0, 7, false}}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 4, 1, true}, {2, 7, 7, false}}));
  // Budget exhaustion: 8 tokens = 1 decode + 6 prompt tokens, which complete request 2's prompt.
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 5, 1, true}, {2, 14, 6, true}}));
  EXPECT_EQ(runner->finished, (std::vector<kv::SeqId>{1}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{2, 20, 1, true}}));
  EXPECT_EQ(runner->finished, (std::vector<kv::SeqId>{1, 2}));
  EXPECT_TRUE(runner->step().empty());
  EXPECT_EQ(cache->usedBlocks(), 0);
}

TEST_F(SchedulerTest, AdmitsInArrivalOrderWithoutOvertaking) {
  // 8 blocks. Request 1 takes 5, leaving 3. Request 2 needs 3 blocks plus the 1-block watermark:
  // it waits; request 3 (1 block) would fit, but must not overtake it.
  make(8, 64, 8);
  runner->add(1, 20, 8);
  runner->add(2, 12, 1);
  runner->add(3, 2, 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 0, 20, true}}));
  EXPECT_EQ(sched->numWaiting(), 2);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 20, 1, true}}));
  EXPECT_EQ(sched->numWaiting(), 2);
}

TEST_F(SchedulerTest, MaxNumSeqsCapsRunningRequests) {
  make(64, 64, 2);
  for (kv::SeqId id = 1; id <= 3; ++id) runner->add(id, 2, 3);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 0, 2, true}, {2, 0, 2, true}}));
  EXPECT_EQ(sched->numRunning(), 2);
  EXPECT_EQ(sched->numWaiting(), 1);
}

TEST_F(SchedulerTest, WatermarkHoldsBlocksBackWhileOthersRun) {
  // 100 blocks, watermark 10% = 10 blocks. With request 1 running on 1 block, request 2 needs
  // 90 blocks: 90 + 10 > 99 free, so it waits although 99 blocks are free.
  make(100, 1024, 8, 0.10);
  runner->add(1, 4, 100);
  runner->step();
  runner->add(2, 360, 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 4, 1, true}}));
  EXPECT_EQ(sched->numWaiting(), 1);
  // Alone, the head of the queue may use the whole pool.
  make(100, 1024, 8, 0.10);
  runner->add(2, 399, 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{2, 0, 399, true}}));
}

TEST_F(SchedulerTest, RefusesWhatCanNeverFit) {
  make(4, 64, 8);
  EXPECT_EQ(sched->maxContextTokens(), 16);
  EXPECT_THROW(sched->add(1, 10, 17), std::invalid_argument);
  EXPECT_NO_THROW(sched->add(1, 10, 16));
  EXPECT_THROW(sched->add(1, 2, 3), std::invalid_argument);  // same id twice
  EXPECT_THROW(sched->add(2, 0, 3), std::invalid_argument);
  EXPECT_THROW(sched->appendToken(99), std::invalid_argument);
}

TEST_F(SchedulerTest, FullPoolPreemptsTheNewestAndRecomputesItFirst) {
  // 5 blocks. Two requests of 6 prompt tokens take 2 blocks each. At position 8 both need a third
  // block: the older (1) takes the last free one; for the newer (2) none is left and it is the
  // newest running request, so it yields its own blocks.
  make(5, 64, 8);
  runner->add(1, 6, 6);
  runner->add(2, 6, 6);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 0, 6, true}, {2, 0, 6, true}}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 6, 1, true}, {2, 6, 1, true}}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 7, 1, true}, {2, 7, 1, true}}));
  StepPlan p = runner->step();
  EXPECT_EQ(chunks(p), (std::vector<Chunk>{{1, 8, 1, true}}));
  EXPECT_EQ(p.preempted, (std::vector<kv::SeqId>{2}));
  EXPECT_EQ(sched->computedTokens(2), 0);
  EXPECT_EQ(cache->usedBlocks(), 3);
  // Request 2 waits at the front: when request 1 is done, its context (6 prompt + 3 generated
  // tokens) is recomputed in one chunk, before request 3 that arrived later.
  runner->add(3, 1, 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 9, 1, true}}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 10, 1, true}}));
  EXPECT_EQ(runner->finished, (std::vector<kv::SeqId>{1}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{2, 0, 9, true}, {3, 0, 1, true}}));
}

TEST_F(SchedulerTest, AWindowedRequestStopsAtItsLimitMovesBackAndRestartsFromZero) {
  // Window 6, 2 sinks (1 block), positions stop at 20: a 30-token prompt is computed at most 6
  // positions a step, never past 20; each move back takes 2 blocks (8 positions).
  make(64, 64, 8);
  sched->add(1, 30, 20, nullptr, false, kv::SeqWindow{6, 2});
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 0, 6, false}}));
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 6, 6, false}}));
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 12, 6, false}}));
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 18, 2, false}}));
  EXPECT_TRUE(sched->atPositionLimit(1));
  EXPECT_LE(cache->usedBlocks(), 4);  // the sink block and the window's
  auto moveBack = [&] {  // what the engine does before planning a step
    const int32_t moved = cache->shiftWindow(1).tokens;
    ASSERT_EQ(moved, 8);
    sched->shift(1, moved);
    EXPECT_FALSE(sched->atPositionLimit(1));
    EXPECT_EQ(sched->computedTokens(1), 12);
    sched->checkInvariants();
    cache->checkInvariants();
  };
  moveBack();
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 12, 6, false}}));
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 18, 2, false}}));
  moveBack();
  // Context 30 - 16 = 14 positions: the last 2 complete it.
  EXPECT_EQ(sched->shiftedTokens(1), 16);
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 12, 2, true}}));
  sched->appendToken(1);  // the context may grow past the limit's worth of tokens
  // Preempted, it starts again from position 0 with its whole context (31 tokens).
  std::vector<kv::SeqId> preempted;
  ASSERT_TRUE(sched->freeSomeMemory(preempted));
  EXPECT_EQ(preempted, (std::vector<kv::SeqId>{1}));
  EXPECT_EQ(sched->shiftedTokens(1), 0);
  EXPECT_EQ(cache->usedBlocks(), 0);
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{1, 0, 6, false}}));
  sched->checkInvariants();
  EXPECT_THROW(sched->shift(1, 7), std::invalid_argument) << "more than it computed";
}

TEST_F(SchedulerTest, PreemptionChainAcrossSteps) {
  // 4 blocks. A (4 prompt tokens), B and C (2 each) run; A's first decode takes the last free block
  // (decodes may use the watermark). When B crosses into a second block, the newest (C) yields its
  // block; when A crosses again, the newest left (B) yields.
  make(4, 64, 8);
  runner->add(1, 4, 10);
  runner->add(2, 2, 10);
  runner->add(3, 2, 10);
  EXPECT_EQ(chunks(runner->step()),
            (std::vector<Chunk>{{1, 0, 4, true}, {2, 0, 2, true}, {3, 0, 2, true}}));
  EXPECT_EQ(cache->freeBlocks(), 1);
  EXPECT_TRUE(runner->step().preempted.empty());  // A: position 4 takes the last block
  EXPECT_EQ(cache->freeBlocks(), 0);
  EXPECT_TRUE(runner->step().preempted.empty());
  StepPlan p = runner->step();  // B: position 4 needs a block
  EXPECT_EQ(chunks(p), (std::vector<Chunk>{{1, 6, 1, true}, {2, 4, 1, true}}));
  EXPECT_EQ(p.preempted, (std::vector<kv::SeqId>{3}));
  EXPECT_TRUE(runner->step().preempted.empty());
  p = runner->step();  // A: position 8 needs a block
  EXPECT_EQ(chunks(p), (std::vector<Chunk>{{1, 8, 1, true}}));
  EXPECT_EQ(p.preempted, (std::vector<kv::SeqId>{2}));
  // Preempted requests wait at the front in their original order: B before C.
  EXPECT_EQ(sched->numWaiting(), 2);
  EXPECT_FALSE(sched->isRunning(2));
  EXPECT_EQ(sched->computedTokens(2), 0);
}

TEST_F(SchedulerTest, CancellingAWaitingRequestLetsTheNextOneIn) {
  make(8, 64, 8);
  runner->add(1, 20, 8);  // 5 blocks
  runner->add(2, 12, 1);  // 3 blocks + watermark: waits
  runner->add(3, 2, 1);   // 1 block: would fit, but may not overtake 2
  runner->step();
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 20, 1, true}}));
  EXPECT_TRUE(sched->remove(2));
  EXPECT_FALSE(sched->remove(2));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 21, 1, true}, {3, 0, 2, true}}));
  // Removing a running request frees its blocks at once.
  EXPECT_TRUE(sched->remove(1));
  EXPECT_EQ(cache->usedBlocks(), 0);
}

TEST_F(SchedulerTest, ACachedPrefixIsNotComputedAgain) {
  make(16, 64, 8);
  runner->addTokens(1, iota(10), 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 0, 10, true}}));
  EXPECT_EQ(runner->finished, (std::vector<kv::SeqId>{1}));
  EXPECT_EQ(cache->stats().cachedBlocks, 2);  // positions [0, 8)
  // The next turn starts with the same 10 tokens: it is admitted on the 2 cached blocks.
  std::vector<int32_t> next = iota(10);
  for (int32_t t : {7, 8, 9}) next.push_back(t);
  runner->addTokens(2, next, 1);
  const StepPlan p = runner->step();
  EXPECT_EQ(chunks(p), (std::vector<Chunk>{{2, 8, 5, true}}));
  EXPECT_TRUE(p.chunks[0].admitted);
  EXPECT_EQ(cache->stats().cachedBlocks, 3);  // request 2 finished too: its third block is cached
  // A prompt that is all cached still computes its last token (for its logits).
  runner->addTokens(3, iota(8), 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{3, 4, 4, true}}));
  cache->checkInvariants();
}

TEST_F(SchedulerTest, HitsOnBlocksInUseCostNoMemoryAtAdmission) {
  // 7 blocks. Request 1 (16 tokens) runs; request 2 starts with the same 16 tokens. After request
  // 1's next decode takes a fifth block, 2 blocks are free: request 2 needs 5 blocks but shares
  // the 4 of request 1's prompt, so 1 fresh block plus the watermark fits.
  make(7, 64, 8);
  runner->addTokens(1, iota(16), 8);
  runner->step();
  std::vector<int32_t> second = iota(16);
  for (int32_t t : {1, 2, 3}) second.push_back(t);
  runner->addTokens(2, second, 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 16, 1, true}, {2, 16, 3, true}}));
  EXPECT_EQ(cache->stats().sharedBlocks, 0);  // request 2 finished at once
  EXPECT_EQ(cache->stats().cachedBlocks, 0);
  cache->checkInvariants();
}

TEST_F(SchedulerTest, LongestPrefixFirstWithBoundedOvertaking) {
  // 6 blocks; one request at a time (maxNumSeqs 1). Request 9 leaves 8 tokens cached; then
  // request 1 (no hit) and request 2 (hits) wait. Lpm admits 2 first; with maxOvertakes 1,
  // request 1 then goes before request 3 although 3 hits too.
  make(16, 64, 1, 0.0, SchedulePolicy::Lpm, 1);
  runner->addTokens(9, iota(9), 1);
  runner->step();
  runner->addTokens(1, iota(9, 500), 1);
  runner->addTokens(2, iota(9), 1);
  runner->addTokens(3, iota(9), 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{2, 8, 1, true}}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 0, 9, true}}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{3, 8, 1, true}}));
}

TEST_F(SchedulerTest, FcfsNeverOvertakesEvenForAHit) {
  make(16, 64, 1);
  runner->addTokens(9, iota(9), 1);
  runner->step();
  runner->addTokens(1, iota(9, 500), 1);
  runner->addTokens(2, iota(9), 1);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{1, 0, 9, true}}));
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{2, 8, 1, true}}));
}

TEST_F(SchedulerTest, ForkedChoicesShareThePromptAndCopyOnlyTheLastBlock) {
  make(16, 64, 8);
  runner->addTokens(1, iota(6), 3);
  sched->schedule();  // prompt computed: 2 blocks; forked before its first token is appended
  runner->fork(1, 2, 3);
  runner->fork(1, 3, 3);
  EXPECT_EQ(cache->usedBlocks(), 2);
  EXPECT_EQ(cache->stats().sharedBlocks, 2);
  EXPECT_EQ(sched->numWaiting(), 2);
  // Each choice got its first token; the next step decodes all three. Two of them copy the shared,
  // partly filled second block; the full first block stays shared.
  for (kv::SeqId id : {1, 2, 3}) {
    runner->tokens[id].push_back(static_cast<int32_t>(id));
    runner->generated[id] = 1;
    sched->appendToken(id);
  }
  EXPECT_EQ(chunks(runner->step()),
            (std::vector<Chunk>{{1, 6, 1, true}, {3, 6, 1, true}, {2, 6, 1, true}}));
  EXPECT_EQ(cache->usedBlocks(), 4);
  EXPECT_EQ(cache->blockTable(2)[0], cache->blockTable(1)[0]);
  EXPECT_NE(cache->blockTable(2)[1], cache->blockTable(1)[1]);
  EXPECT_THROW(sched->addFork(1, 2, nullptr), std::invalid_argument);  // 2 exists
  cache->checkInvariants();
}

TEST_F(SchedulerTest, RandomWorkloadsKeepInvariantsAndFinishEverything) {
  std::mt19937 rng(7);
  for (int round = 0; round < 400; ++round) {
    const int32_t blocks = 4 + static_cast<int32_t>(rng() % 28);
    make(blocks, 1 + static_cast<int32_t>(rng() % 32), 1 + static_cast<int32_t>(rng() % 6),
         (rng() % 2) ? 0.0 : 0.05, (rng() % 2) ? SchedulePolicy::Fcfs : SchedulePolicy::Lpm,
         static_cast<int32_t>(rng() % 4));
    // Half the rounds give requests token ids from a few families with shared prefixes: prefix
    // hits, and forks of running requests (n > 1).
    const bool withTokens = round % 2 == 1;
    kv::SeqId next = 1;
    int32_t added = 0;
    for (int step = 0; step < 2000; ++step) {
      if (added < 30 && rng() % 3 == 0) {
        const auto maxCtx = static_cast<uint32_t>(sched->maxContextTokens());
        const int32_t prompt = 1 + static_cast<int32_t>(rng() % std::min(maxCtx - 1, 40u));
        const int32_t out =
            1 + static_cast<int32_t>(rng() % std::min(maxCtx - static_cast<uint32_t>(prompt), 20u));
        const kv::SeqId id = next++;
        if (withTokens) {
          std::vector<int32_t> t = iota(prompt, 100 * static_cast<int32_t>(rng() % 3));
          if (rng() % 2 == 0) t.back() = static_cast<int32_t>(rng() % 5);
          runner->addTokens(id, t, out);
        } else {
          runner->add(id, prompt, out);
        }
        ++added;
      }
      // Fork a running request whose context is complete (as the engine does for n > 1).
      if (withTokens && added < 30 && rng() % 5 == 0) {
        for (kv::SeqId id = 1; id < next; ++id) {
          if (runner->tokens.count(id) == 0 || !sched->isRunning(id)) continue;
          if (sched->computedTokens(id) != static_cast<int32_t>(runner->tokens[id].size())) continue;
          const kv::SeqId child = next++;
          runner->fork(id, child, 1 + static_cast<int32_t>(rng() % 4));
          ++added;
          break;
        }
      }
      if (rng() % 50 == 0 && next > 1) sched->remove(1 + rng() % (next - 1));  // cancellations
      const StepPlan p = runner->step();
      ASSERT_LE(p.numTokens, sched->config().maxBatchedTokens);
      cache->checkInvariants();
      if (added == 30 && sched->numRunning() == 0 && sched->numWaiting() == 0) break;
    }
    EXPECT_EQ(sched->numRunning() + sched->numWaiting(), 0) << "round " << round;
    EXPECT_EQ(cache->usedBlocks(), 0);
  }
}

}  // namespace
}  // namespace cortex::engine
