#include "kvsim/serving_sim.h"

#include <algorithm>
#include <cmath>
#include <deque>
#include <random>
#include <vector>

#include <nlohmann/json.hpp>

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

// The origin design: one contiguous run of blocks per request, reserved for prompt + max output,
// found by a first-fit linear scan.
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

 private:
  std::vector<bool> used_;
  int32_t usedBlocks_ = 0;
};

struct Running {
  size_t request = 0;
  int32_t generated = 0;      // tokens generated so far (kept across preemption)
  int32_t contextTokens = 0;  // tokens held in memory
  int32_t firstBlock = -1;    // contiguous design only
  int32_t reservedBlocks = 0;
};

struct Accumulator {
  std::vector<double> utilization;
  double memorySum = 0;
  int64_t memorySteps = 0;
  std::vector<int64_t> admittedAt;
  std::vector<bool> delayed;
  int64_t generatedTokens = 0;
  SimResult result;

  explicit Accumulator(size_t n) : admittedAt(n, -1), delayed(n, false) {}

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
      r.delayed += delayed[i] ? 1 : 0;
    }
    r.meanQueueSteps = admitted ? waitSum / admitted : 0;
    r.throughputTokensPerStep =
        steps ? static_cast<double>(generatedTokens) / static_cast<double>(steps) : 0;
    return r;
  }
};

// The paged design, on the real KVCache: admission needs the context's blocks plus a watermark;
// a decode that finds the pool dry asks the driver to preempt.
class PagedMemory {
 public:
  explicit PagedMemory(const SimConfig& c)
      : cache_(config(c)), watermark_(std::max(1, c.numBlocks / 100)) {}

  bool admit(Running& q, const Request& r, int32_t /*maxOutputTokens*/) {
    const int32_t context = r.promptTokens + q.generated;  // recompute after preemption
    // note: like vLLM, keep ~1% of blocks back at admission so running requests can grow.
    if (cache_.blocksForTokens(context) + watermark_ > cache_.freeBlocks()) return false;
    cache_.allocateFor(q.request, context);
    q.contextTokens = context;
    return true;
  }
  bool canAppend(const Running& q) const {
    return cache_.blocksNeededToAppend(q.request, 1) <= cache_.freeBlocks();
  }
  void append(Running& q) {
    cache_.appendToken(q.request);
    ++q.contextTokens;
  }
  void release(Running& q) { cache_.freeFor(q.request); }
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
  int32_t watermark_;
};

// The origin design: the reservation covers the maximum output, so appends never fail.
class ContiguousMemory {
 public:
  explicit ContiguousMemory(const SimConfig& c) : pool_(c.numBlocks), B_(c.blockSizeTokens) {}

  bool admit(Running& q, const Request& r, int32_t maxOutputTokens) {
    const int32_t n = (r.promptTokens + maxOutputTokens + B_ - 1) / B_;
    const int32_t first = pool_.tryAllocate(n);
    if (first < 0) return false;
    q.firstBlock = first;
    q.reservedBlocks = n;
    q.contextTokens = r.promptTokens;
    live_ += r.promptTokens;
    return true;
  }
  bool canAppend(const Running&) const { return true; }
  void append(Running& q) {
    ++q.contextTokens;
    ++live_;
  }
  void release(Running& q) {
    pool_.free(q.firstBlock, q.reservedBlocks);
    live_ -= q.contextTokens;
  }
  std::pair<int64_t, int64_t> liveAndAllocatedSlots() const {
    return {live_, static_cast<int64_t>(pool_.usedBlocks()) * B_};
  }

 private:
  ContiguousPool pool_;
  int32_t B_;
  int64_t live_ = 0;
};

// One step loop for both designs: arrivals, FCFS admission without overtaking, one decode token
// per running request (preempting the newest when memory says no), frees of finished requests.
template <class Memory>
SimResult simulate(const SimConfig& c, const std::vector<Request>& trace) {
  Memory mem(c);
  const int64_t poolSlots = static_cast<int64_t>(c.numBlocks) * c.blockSizeTokens;
  const int64_t B = c.blockSizeTokens;
  Accumulator acc(trace.size());
  std::deque<Running> queue;     // waiting; preempted requests go back to the front
  std::vector<Running> running;  // admission order
  size_t nextArrival = 0;
  int64_t step = 0;
  for (; nextArrival < trace.size() || !queue.empty() || !running.empty(); ++step) {
    while (nextArrival < trace.size() && trace[nextArrival].arrivalStep <= step) {
      const Request& r = trace[nextArrival];
      // Both designs refuse what could never fit: prompt + max tokens beyond the pool.
      if ((r.promptTokens + c.maxOutputTokens + B - 1) / B > c.numBlocks) {
        ++acc.result.rejected;
      } else {
        queue.push_back(Running{nextArrival, 0, 0, -1, 0});
      }
      ++nextArrival;
    }
    while (!queue.empty() && mem.admit(queue.front(), trace[queue.front().request],
                                       c.maxOutputTokens)) {
      const size_t id = queue.front().request;
      if (acc.admittedAt[id] < 0) acc.admittedAt[id] = step;
      running.push_back(queue.front());
      queue.pop_front();
    }
    for (Running& q : queue) acc.delayed[q.request] = true;  // waiting for memory
    acc.result.peakSequences =
        std::max(acc.result.peakSequences, static_cast<int32_t>(running.size()));
    for (size_t i = 0; i < running.size();) {
      if (!mem.canAppend(running[i])) {
        Running victim = running.back();
        running.pop_back();
        mem.release(victim);
        ++acc.result.preemptions;
        queue.push_front(victim);
        continue;  // retry the same index (or stop, if the victim was this request)
      }
      mem.append(running[i]);
      ++running[i].generated;
      ++acc.generatedTokens;
      ++i;
    }
    const auto [live, allocated] = mem.liveAndAllocatedSlots();
    acc.sample(live, allocated, poolSlots);
    auto done = [&](Running& q) {
      if (q.generated < trace[q.request].outputTokens) return false;
      mem.release(q);
      ++acc.result.completed;
      return true;
    };
    std::erase_if(running, done);
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
                 {"max_prompt_tokens", c.maxPromptTokens}};
  j["paged"] = toJsonObject(report.paged);
  j["contiguous"] = toJsonObject(report.contiguous);
  return j.dump();
}

}  // namespace cortex::kvsim
