#include "kvsim/serving_sim.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/scheduler.h"
#include "kv/kv_cache.h"

namespace cortex::kvsim {

namespace {

struct Request {
  int64_t arrivalStep = 0;
  int32_t promptTokens = 0;
  int32_t outputTokens = 0;  // how many tokens it will generate before stopping
};

std::vector<Request> makeTrace(const SimConfig& c) {
  std::mt19937_64 rng(c.seed);
  std::poisson_distribution<int32_t> arrivals(c.arrivalsPerStep);
  std::lognormal_distribution<double> prompt(std::log(c.promptMedianTokens), c.promptSigma);
  std::lognormal_distribution<double> output(std::log(c.outputMedianTokens), c.outputSigma);
  std::vector<Request> trace;
  trace.reserve(static_cast<size_t>(c.numRequests));
  for (int64_t step = 0; static_cast<int32_t>(trace.size()) < c.numRequests; ++step) {
    for (int32_t k = arrivals(rng); k > 0 && static_cast<int32_t>(trace.size()) < c.numRequests;
         --k) {
      Request r;
      r.arrivalStep = step;
      r.promptTokens = std::clamp(static_cast<int32_t>(std::lround(prompt(rng))), 1,
                                  c.maxPromptTokens);
      r.outputTokens = std::clamp(static_cast<int32_t>(std::lround(output(rng))), 1,
                                  c.maxOutputTokens);
      trace.push_back(r);
    }
  }
  return trace;
}

// The contiguous design: one contiguous run of blocks per request, reserved at admission for its
// prompt + max output tokens and found by a first-fit linear scan.
class ContiguousPool {
 public:
  explicit ContiguousPool(int32_t numBlocks) : used_(static_cast<size_t>(numBlocks), false) {}

  // First block of a free run of n blocks, or -1.
  int32_t tryAllocate(int32_t n) {
    int32_t run = 0;
    for (int32_t i = 0; i < static_cast<int32_t>(used_.size()); ++i) {
      run = used_[static_cast<size_t>(i)] ? 0 : run + 1;
      if (run == n) {
        const int32_t first = i - n + 1;
        std::fill_n(used_.begin() + first, n, true);
        usedBlocks_ += n;
        return first;
      }
    }
    return -1;
  }
  void free(int32_t first, int32_t n) {
    std::fill_n(used_.begin() + first, n, false);
    usedBlocks_ -= n;
  }
  int32_t usedBlocks() const { return usedBlocks_; }
  int32_t totalBlocks() const { return static_cast<int32_t>(used_.size()); }

 private:
  std::vector<bool> used_;
  int32_t usedBlocks_ = 0;
};

// The scheduler's memory in the contiguous design: admission reserves the whole maximum context,
// so appends never need a block (and nothing is ever preempted).
class ContiguousBudget final : public engine::BlockBudget {
 public:
  ContiguousBudget(int32_t numBlocks, int32_t blockSizeTokens)
      : pool_(numBlocks), blockSizeTokens_(blockSizeTokens) {}
  int32_t totalBlocks() const override { return pool_.totalBlocks(); }
  int32_t freeBlocks() const override { return pool_.totalBlocks() - pool_.usedBlocks(); }
  int32_t blockSizeTokens() const override { return blockSizeTokens_; }
  bool tryAllocate(kv::SeqId seq, int32_t tokens, int32_t maxContextTokens) override {
    const int32_t n = blocksForTokens(maxContextTokens);
    const int32_t first = pool_.tryAllocate(n);
    if (first < 0) return false;
    runs_[seq] = {first, n, tokens};
    liveTokens_ += tokens;
    return true;
  }
  bool tryAppend(kv::SeqId seq, int32_t n) override {
    runs_.at(seq).tokens += n;
    liveTokens_ += n;
    return true;
  }
  int32_t blocksNeededToAppend(kv::SeqId, int32_t) const override { return 0; }
  void release(kv::SeqId seq) override {
    auto it = runs_.find(seq);
    if (it == runs_.end()) return;
    pool_.free(it->second.first, it->second.blocks);
    liveTokens_ -= it->second.tokens;
    runs_.erase(it);
  }
  std::pair<int64_t, int64_t> liveAndAllocatedSlots() const {
    return {liveTokens_, static_cast<int64_t>(pool_.usedBlocks()) * blockSizeTokens_};
  }

 private:
  struct Run {
    int32_t first = 0;
    int32_t blocks = 0;
    int32_t tokens = 0;
  };
  ContiguousPool pool_;
  int32_t blockSizeTokens_;
  std::map<kv::SeqId, Run> runs_;
  int64_t liveTokens_ = 0;
};

struct Accumulator {
  std::vector<double> utilization;
  double memorySum = 0;
  int64_t memorySteps = 0;
  std::vector<int64_t> admittedAt;
  int64_t generatedTokens = 0;
  SimResult result;

  explicit Accumulator(size_t n) : admittedAt(n, -1) {}

  void sample(int64_t liveTokens, int64_t allocatedSlots, int64_t poolSlots) {
    if (allocatedSlots == 0) return;
    utilization.push_back(static_cast<double>(liveTokens) / static_cast<double>(allocatedSlots));
    memorySum += static_cast<double>(allocatedSlots) / static_cast<double>(poolSlots);
    ++memorySteps;
  }

  SimResult finish(const std::vector<Request>& trace, int64_t steps) {
    SimResult r = result;
    r.steps = steps;
    if (!utilization.empty()) {
      double sum = 0;
      for (double u : utilization) sum += u;
      r.meanUtilization = sum / static_cast<double>(utilization.size());
      std::vector<double> sorted = utilization;
      std::nth_element(sorted.begin(), sorted.begin() + static_cast<long>(sorted.size() / 2),
                       sorted.end());
      r.p50Utilization = sorted[sorted.size() / 2];
      r.meanMemoryInUse = memorySum / static_cast<double>(memorySteps);
    }
    double waitSum = 0;
    int32_t admitted = 0;
    for (size_t i = 0; i < trace.size(); ++i) {
      if (admittedAt[i] < 0) continue;
      waitSum += static_cast<double>(admittedAt[i] - trace[i].arrivalStep);
      ++admitted;
      r.delayed += admittedAt[i] > trace[i].arrivalStep ? 1 : 0;
    }
    r.meanQueueSteps = admitted ? waitSum / admitted : 0;
    r.throughputTokensPerStep =
        steps ? static_cast<double>(generatedTokens) / static_cast<double>(steps) : 0;
    return r;
  }
};

// The paged design on the real KVCache (one layer, one head of size 1: the bookkeeping is real,
// the arena tiny).
class PagedMemory {
 public:
  explicit PagedMemory(const SimConfig& c) : cache_(config(c)), budget_(cache_) {}
  engine::BlockBudget& budget() { return budget_; }
  std::pair<int64_t, int64_t> liveAndAllocatedSlots() const {
    const kv::KVCacheStats st = cache_.stats();
    return {st.liveTokens, st.allocatedTokenSlots};
  }

 private:
  static kv::KVCacheConfig config(const SimConfig& c) {
    kv::KVCacheConfig kc;
    kc.numLayers = 1;
    kc.numKVHeads = 1;
    kc.headDim = 1;
    kc.blockSizeTokens = c.blockSizeTokens;
    kc.numBlocks = c.numBlocks;
    return kc;
  }
  kv::KVCache cache_;
  engine::PagedBlockBudget budget_;
};

class ContiguousMemory {
 public:
  explicit ContiguousMemory(const SimConfig& c) : budget_(c.numBlocks, c.blockSizeTokens) {}
  engine::BlockBudget& budget() { return budget_; }
  std::pair<int64_t, int64_t> liveAndAllocatedSlots() const {
    return budget_.liveAndAllocatedSlots();
  }

 private:
  ContiguousBudget budget_;
};

// One step loop for both designs, driving the engine's Scheduler: arrivals, one planned step
// (decodes, prefill chunks, admissions, preemptions), then the tokens a model would sample:
// every chunk that completes its request's context yields one token; finished requests leave.
template <class Memory>
SimResult simulate(const SimConfig& c, const std::vector<Request>& trace) {
  Memory mem(c);
  engine::SchedulerConfig sc;
  sc.maxBatchedTokens = c.maxBatchedTokens;
  sc.maxNumSeqs = c.maxNumSeqs;
  engine::Scheduler sched(sc, mem.budget());
  const int64_t poolSlots = static_cast<int64_t>(c.numBlocks) * c.blockSizeTokens;
  Accumulator acc(trace.size());
  std::vector<int32_t> generated(trace.size(), 0);
  size_t nextArrival = 0;
  int64_t step = 0;
  for (; nextArrival < trace.size() || sched.numRunning() + sched.numWaiting() > 0; ++step) {
    while (nextArrival < trace.size() && trace[nextArrival].arrivalStep <= step) {
      const Request& r = trace[nextArrival];
      // Both designs refuse what could never fit: prompt + max tokens beyond the pool.
      const int64_t maxContext = static_cast<int64_t>(r.promptTokens) + c.maxOutputTokens;
      if (maxContext > sched.maxContextTokens()) {
        ++acc.result.rejected;
      } else {
        sched.add(nextArrival, r.promptTokens, static_cast<int32_t>(maxContext));
      }
      ++nextArrival;
    }
    const engine::StepPlan plan = sched.schedule();
    acc.result.preemptions += static_cast<int32_t>(plan.preempted.size());
    acc.result.peakSequences = std::max(acc.result.peakSequences, sched.numRunning());
    for (const engine::ScheduledChunk& ch : plan.chunks) {
      if (acc.admittedAt[ch.seq] < 0) acc.admittedAt[ch.seq] = step;
    }
    const auto [live, allocated] = mem.liveAndAllocatedSlots();
    acc.sample(live, allocated, poolSlots);
    for (const engine::ScheduledChunk& ch : plan.chunks) {
      if (!ch.completesContext) continue;
      ++acc.generatedTokens;
      if (++generated[ch.seq] >= trace[ch.seq].outputTokens) {
        sched.remove(ch.seq);
        ++acc.result.completed;
      } else {
        sched.appendToken(ch.seq);
      }
    }
  }
  return acc.finish(trace, step);
}

nlohmann::json toJsonObject(const SimResult& r) {
  return {{"mean_utilization", r.meanUtilization},
          {"p50_utilization", r.p50Utilization},
          {"mean_memory_in_use", r.meanMemoryInUse},
          {"peak_sequences", r.peakSequences},
          {"completed", r.completed},
          {"rejected", r.rejected},
          {"delayed", r.delayed},
          {"preemptions", r.preemptions},
          {"steps", r.steps},
          {"mean_queue_steps", r.meanQueueSteps},
          {"throughput_tokens_per_step", r.throughputTokensPerStep}};
}

}  // namespace

SimReport runServingSim(const SimConfig& config) {
  const std::vector<Request> trace = makeTrace(config);
  SimReport report;
  report.config = config;
  report.paged = simulate<PagedMemory>(config, trace);
  report.contiguous = simulate<ContiguousMemory>(config, trace);
  return report;
}

std::string toJson(const SimReport& report) {
  const SimConfig& c = report.config;
  nlohmann::json j;
  j["config"] = {{"seed", c.seed},
                 {"num_blocks", c.numBlocks},
                 {"block_size_tokens", c.blockSizeTokens},
                 {"num_requests", c.numRequests},
                 {"arrivals_per_step", c.arrivalsPerStep},
                 {"max_output_tokens", c.maxOutputTokens},
                 {"prompt_median_tokens", c.promptMedianTokens},
                 {"prompt_sigma", c.promptSigma},
                 {"output_median_tokens", c.outputMedianTokens},
                 {"output_sigma", c.outputSigma},
                 {"max_prompt_tokens", c.maxPromptTokens},
                 {"max_batched_tokens", c.maxBatchedTokens},
                 {"max_num_seqs", c.maxNumSeqs}};
  j["paged"] = toJsonObject(report.paged);
  j["contiguous"] = toJsonObject(report.contiguous);
  return j.dump();
}

}  // namespace cortex::kvsim
