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
// finishes (and leaves) once it has generated its quota.
struct FakeRunner {
  Scheduler& s;
  std::map<kv::SeqId, int32_t> quota;  // tokens each request generates
  std::map<kv::SeqId, int32_t> generated;
  std::vector<kv::SeqId> finished;
  std::vector<kv::SeqId> parked;  // with parkFinished: finished requests parked, not removed
  bool parkFinished = false;

  void add(kv::SeqId seq, int32_t prompt, int32_t outputTokens) {
    s.add(seq, prompt, prompt + outputTokens);
    quota[seq] = outputTokens;
  }
  StepPlan step() {
    StepPlan p = s.schedule();
    for (const auto& c : p.chunks) {
      if (!c.completesContext) continue;
      if (++generated[c.seq] == quota[c.seq]) {
        if (parkFinished) {
          s.park(c.seq);
          parked.push_back(c.seq);
        } else {
          s.remove(c.seq);
        }
        finished.push_back(c.seq);
      } else {
        s.appendToken(c.seq);
      }
    }
    s.checkInvariants();
    return p;
  }
};

struct SchedulerTest : ::testing::Test {
  void make(int32_t numBlocks, int32_t budget, int32_t maxSeqs, double watermark = 0.0) {
    cache = std::make_unique<kv::KVCache>(tinyPool(numBlocks));
    memory = std::make_unique<PagedBlockBudget>(*cache);
    SchedulerConfig c;
    c.maxBatchedTokens = budget;
    c.maxNumSeqs = maxSeqs;
    c.watermarkFraction = watermark;
    sched = std::make_unique<Scheduler>(c, *memory);
    runner = std::make_unique<FakeRunner>(FakeRunner{*sched, {}, {}, {}, {}, false});
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

TEST_F(SchedulerTest, AParkedSequenceIsReusedByTheNextTurn) {
  make(8, 64, 8);
  runner->add(1, 6, 10);
  runner->step();  // prompt
  runner->step();  // decode position 6
  sched->park(1);  // the turn is over: positions 0..6 stay in memory
  EXPECT_TRUE(sched->isParked(1));
  EXPECT_EQ(sched->numRunning(), 0);
  EXPECT_EQ(cache->usedTokens(1), 7);
  // The next turn shares the first 5 tokens: only the rest of its 9-token prompt is computed.
  sched->addReusing(2, 9, 12, 1, 5);
  EXPECT_FALSE(sched->isParked(1));
  EXPECT_EQ(cache->usedTokens(2), 5);
  EXPECT_FALSE(cache->hasSequence(1));
  EXPECT_EQ(chunks(sched->schedule()), (std::vector<Chunk>{{2, 5, 4, true}}));
  sched->checkInvariants();
  cache->checkInvariants();
  EXPECT_THROW(sched->addReusing(3, 9, 12, 1, 5), std::invalid_argument);  // no longer parked
}

TEST_F(SchedulerTest, ParkedSequencesGoFirstWhenMemoryIsShort) {
  make(4, 64, 8);
  runner->add(1, 8, 4);  // 2 blocks
  runner->step();
  sched->park(1);
  runner->add(2, 8, 4);  // 2 blocks: fits beside the parked one (the head may use the last blocks)
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{2, 0, 8, true}}));
  EXPECT_TRUE(sched->isParked(1));
  // Request 2's next token needs a block: the parked sequence is released, nothing is preempted.
  const StepPlan p = runner->step();
  EXPECT_EQ(chunks(p), (std::vector<Chunk>{{2, 8, 1, true}}));
  EXPECT_TRUE(p.preempted.empty());
  EXPECT_FALSE(sched->isParked(1));
  EXPECT_FALSE(cache->hasSequence(1));
  sched->checkInvariants();
}

TEST_F(SchedulerTest, AWaitingRequestGivesBackReusedPositionsTheHeadNeeds) {
  // 8 blocks. Request 1 (20 tokens, 5 blocks) finishes and is parked; request 2 (16 tokens) is
  // queued, then request 3 reuses request 1's positions behind it. The head needs 4 blocks and
  // only 3 are free: request 3's reused positions go back (it will compute from scratch), rather
  // than the queue stalling behind blocks nobody is using.
  make(8, 64, 8);
  runner->parkFinished = true;
  runner->add(1, 20, 1);
  runner->step();
  runner->add(2, 16, 1);
  sched->addReusing(3, 24, 25, 1, 20);
  runner->quota[3] = 1;
  EXPECT_EQ(cache->freeBlocks(), 3);
  EXPECT_EQ(chunks(runner->step()), (std::vector<Chunk>{{2, 0, 16, true}}));
  EXPECT_EQ(sched->computedTokens(3), 0);
  EXPECT_FALSE(cache->hasSequence(3));
  sched->checkInvariants();
}

TEST_F(SchedulerTest, RandomWorkloadsKeepInvariantsAndFinishEverything) {
  std::mt19937 rng(7);
  for (int round = 0; round < 400; ++round) {
    const int32_t blocks = 4 + static_cast<int32_t>(rng() % 28);
    make(blocks, 1 + static_cast<int32_t>(rng() % 32), 1 + static_cast<int32_t>(rng() % 6),
         (rng() % 2) ? 0.0 : 0.05);
    // Half the rounds park finished requests and let later ones reuse them (conversations).
    runner->parkFinished = round % 2 == 1;
    kv::SeqId next = 1;
    int32_t added = 0;
    for (int step = 0; step < 2000; ++step) {
      if (added < 30 && rng() % 3 == 0) {
        const auto maxCtx = static_cast<uint32_t>(sched->maxContextTokens());
        const int32_t prompt = 1 + static_cast<int32_t>(rng() % std::min(maxCtx - 1, 40u));
        const int32_t out =
            1 + static_cast<int32_t>(rng() % std::min(maxCtx - static_cast<uint32_t>(prompt), 20u));
        const kv::SeqId id = next++;
        std::erase_if(runner->parked, [&](kv::SeqId p) { return !sched->isParked(p); });
        if (!runner->parked.empty() && prompt > 1 && rng() % 2 == 0) {
          const kv::SeqId from = runner->parked.back();
          runner->parked.pop_back();
          const int32_t reuse = std::min(sched->computedTokens(from), prompt - 1);
          sched->addReusing(id, prompt, prompt + out, from, reuse);
          runner->quota[id] = out;
        } else {
          runner->add(id, prompt, out);
        }
        ++added;
      }
      if (rng() % 50 == 0 && next > 1) sched->remove(1 + rng() % (next - 1));  // cancellations
      const StepPlan p = runner->step();
      ASSERT_LE(p.numTokens, sched->config().maxBatchedTokens);
      cache->checkInvariants();
      if (added == 30 && sched->numRunning() == 0 && sched->numWaiting() == 0) break;
    }
    EXPECT_EQ(sched->numRunning() + sched->numWaiting(), 0) << "round " << round;
    for (kv::SeqId id : runner->parked) sched->remove(id);  // parked ones may remain: release
    EXPECT_EQ(sched->numParked(), 0);
    EXPECT_EQ(cache->usedBlocks(), 0);
  }
}

}  // namespace
}  // namespace cortex::engine
