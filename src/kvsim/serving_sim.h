// A seeded discrete-time simulation of serving on a fixed KV pool, comparing the paged KVCache
// with the contiguous design (each request reserves prompt + max output tokens as one contiguous
// run of blocks, found by a first-fit scan). Used by `cortexstream bench kv-sim`.
//
// Both designs run under the engine's own Scheduler (engine/scheduler.h), so the simulation's
// numbers describe the policy the server runs: each step, requests arrive (Poisson), the scheduler
// plans decodes, prefill chunks and admissions under the token budget and sequence cap (preempting
// the newest request when the paged pool runs dry), and every request whose context is complete
// "samples" one token; a request leaves when it has generated its output length. The paged run
// does all its bookkeeping on the real KVCache.
#pragma once

#include <cstdint>
#include <string>

namespace cortex::kvsim {

struct SimConfig {
  uint64_t seed = 42;
  int32_t numBlocks = 4096;
  int32_t blockSizeTokens = 16;
  int32_t numRequests = 2000;
  double arrivalsPerStep = 1.0;      // mean of the Poisson arrivals per step
  int32_t maxOutputTokens = 1024;    // the request's max_tokens, reserved by the contiguous design
  double promptMedianTokens = 180;   // log-normal, long-tailed like chat traffic
  double promptSigma = 1.0;
  double outputMedianTokens = 120;
  double outputSigma = 1.0;
  int32_t maxPromptTokens = 4096;
  int32_t maxBatchedTokens = 2048;   // the scheduler's token budget per step
  int32_t maxNumSeqs = 256;          // the scheduler's cap on running requests
};

struct SimResult {
  double meanUtilization = 0;  // mean over steps of live tokens / allocated token slots
  double p50Utilization = 0;
  double meanMemoryInUse = 0;  // mean over steps of allocated slots / pool slots
  int32_t peakSequences = 0;
  int32_t completed = 0;
  int32_t rejected = 0;        // could never fit in the pool
  int32_t delayed = 0;         // waited at least one step for memory
  int32_t preemptions = 0;
  int64_t steps = 0;           // steps until the last request finished
  double meanQueueSteps = 0;   // mean steps from arrival to (first) admission
  double throughputTokensPerStep = 0;
};

struct SimReport {
  SimConfig config;
  SimResult paged;
  SimResult contiguous;
};

// Runs both designs on the same seeded request trace.
SimReport runServingSim(const SimConfig& config);

// One JSON object: {"config": {...}, "paged": {...}, "contiguous": {...}}.
std::string toJson(const SimReport& report);

}  // namespace cortex::kvsim
