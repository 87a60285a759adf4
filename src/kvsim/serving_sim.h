// A seeded discrete-time simulation of serving on a fixed KV pool, comparing the paged KVCache
// with the origin design (each request reserves prompt + max output tokens as one contiguous run
// of blocks, found by a first-fit scan). Used by `cortexstream bench kv-sim`.
//
// Each step: requests arrive (Poisson), the queue head is admitted while memory allows (FCFS, no
// overtaking), every running request decodes one token, finished requests free their memory.
// The paged run uses the real KVCache for all bookkeeping; when an append finds the pool empty it
// preempts the most recently admitted request (frees it, requeues it at the front for
// recomputation), as a vLLM-style scheduler does.
#pragma once

#include <cstdint>
#include <string>

namespace cortex::kvsim {

struct SimConfig {
  uint64_t seed = 42;
  int32_t numBlocks = 4096;
  int32_t blockSizeTokens = 16;
  int32_t numRequests = 2000;
  double arrivalsPerStep = 1.0;      // mean of the Poisson arrivals per decode step
  int32_t maxOutputTokens = 1024;    // the request's max_tokens, reserved by the contiguous design
  double promptMedianTokens = 180;   // log-normal, long-tailed like chat traffic
  double promptSigma = 1.0;
  double outputMedianTokens = 120;
  double outputSigma = 1.0;
  int32_t maxPromptTokens = 4096;
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
