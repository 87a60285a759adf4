// The serving simulation: deterministic for a seed, and the paged cache beats the contiguous design
// (each request reserves prompt + max output tokens as one run of blocks, found by first fit).
#include "kvsim/serving_sim.h"

#include <gtest/gtest.h>

namespace cortex::kvsim {
namespace {

SimConfig small() {
  SimConfig c;
  c.numBlocks = 512;
  c.numRequests = 300;
  c.arrivalsPerStep = 0.5;
  c.maxOutputTokens = 512;
  c.maxPromptTokens = 1024;
  return c;
}

TEST(ServingSim, SameSeedSameResult) {
  EXPECT_EQ(toJson(runServingSim(small())), toJson(runServingSim(small())));
  SimConfig other = small();
  other.seed = 7;
  EXPECT_NE(toJson(runServingSim(small())), toJson(runServingSim(other)));
}

TEST(ServingSim, EveryRequestCompletesOrIsRejected) {
  const SimReport r = runServingSim(small());
  EXPECT_EQ(r.paged.completed + r.paged.rejected, 300);
  EXPECT_EQ(r.contiguous.completed + r.contiguous.rejected, 300);
}

TEST(ServingSim, PagedKeepsMemoryBusierWithLiveTokens) {
  const SimReport r = runServingSim(small());
  EXPECT_GT(r.paged.meanUtilization, 0.95);  // block size 16: only tails are unused
  EXPECT_LT(r.contiguous.meanUtilization, r.paged.meanUtilization);
  EXPECT_GE(r.paged.peakSequences, r.contiguous.peakSequences);
  EXPECT_LE(r.paged.steps, r.contiguous.steps);
}

TEST(ServingSim, OversizedRequestsAreRejected) {
  SimConfig c = small();
  c.numBlocks = 40;  // 640 tokens: prompt + 512 max tokens often does not fit
  const SimReport r = runServingSim(c);
  EXPECT_GT(r.paged.rejected, 0);
  EXPECT_EQ(r.paged.rejected, r.contiguous.rejected);
}

}  // namespace
}  // namespace cortex::kvsim
