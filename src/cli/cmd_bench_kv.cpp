// `cortexstream bench kv` (KV cache micro-benchmarks), `bench kv-sim` (serving simulation) and
// `bench kv-footprint` (a model's KV bytes per sequence, hybrid cache on and off).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <limits>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "engine/engine.h"
#include "engine/scheduler.h"
#include "kv/kv_cache.h"
#include "kvsim/serving_sim.h"

namespace cortex::cli {

namespace {

using Clock = std::chrono::steady_clock;

// Best of `reps` runs of fn(), in nanoseconds per `units`: the minimum filters out the noise of
// a shared machine better than the mean.
template <typename Fn>
double bestNsPerUnit(int reps, double units, Fn&& fn) {
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    fn();
    const auto t1 = Clock::now();
    best = std::min(best, std::chrono::duration<double, std::nano>(t1 - t0).count() / units);
  }
  return best;
}

// Keeps the optimiser from discarding a computed value.
template <typename T>
void keep(const T& value) {
  asm volatile("" : : "g"(&value) : "memory");
}

// The KV bookkeeping of one decode step of 64 running sequences (512 tokens of context each, the
// default model's 30 layers), two ways:
//  - per_sequence: what the engine did before the forward pass received a resolved plan: for each
//    sequence a block check and appendToken, then inside the forward pass slotsFor and, in every
//    layer, getKView and getVView (a cache lock each: 63 per sequence);
//  - resolved_plan: the Scheduler plans the step (one tryAppend per sequence), one resolveStep
//    under one lock copies every slot and block table, and the views are built from the arena
//    without a lock.
// Both run in the same process on the same cache, so their ratio is the figure to quote.
nlohmann::json runStepBookkeepingBench(int32_t blockSize) {
  constexpr int32_t kSeqs = 64, kContext = 512, kLayers = 30, kSteps = 256;
  kv::KVCacheConfig cfg;
  cfg.numLayers = kLayers;
  cfg.numKVHeads = 3;
  cfg.headDim = 64;
  cfg.blockSizeTokens = blockSize;
  cfg.numBlocks = kSeqs * ((kContext + kSteps) / blockSize + 2);
  kv::KVCache cache(cfg);
  constexpr int kReps = 5;

  const double perSequence = bestNsPerUnit(kReps, double(kSteps), [&] {
    for (kv::SeqId s = 0; s < kSeqs; ++s) cache.allocateFor(s, kContext);
    kv::TokenSlot slot;
    for (int32_t step = 0; step < kSteps; ++step) {
      for (kv::SeqId s = 0; s < kSeqs; ++s) {
        keep(cache.blocksNeededToAppend(s, 1) <= cache.freeBlocks());
        const int32_t pos = cache.appendToken(s);
        cache.slotsFor(s, pos, std::span<kv::TokenSlot>(&slot, 1));
        keep(slot);
      }
      for (int32_t l = 0; l < kLayers; ++l) {
        for (kv::SeqId s = 0; s < kSeqs; ++s) {
          keep(cache.getKView(s, l));
          keep(cache.getVView(s, l));
        }
      }
    }
    for (kv::SeqId s = 0; s < kSeqs; ++s) cache.freeFor(s);
  });

  engine::PagedBlockBudget budget(cache);
  engine::SchedulerConfig sc;
  sc.maxBatchedTokens = kSeqs * kContext;
  sc.maxNumSeqs = kSeqs;
  sc.watermarkFraction = 0;
  std::vector<kv::StepSequence> step;
  std::vector<kv::TokenSlot> slots;
  std::vector<kv::BlockId> tables;
  std::vector<int32_t> starts;
  const kv::KVArena& arena = cache.arena();
  const double resolved = bestNsPerUnit(kReps, double(kSteps), [&] {
    engine::Scheduler sched(sc, budget);
    for (kv::SeqId s = 0; s < kSeqs; ++s) sched.add(s, kContext, kContext + kSteps + 1);
    sched.schedule();  // admission: the prompts, not part of a decode step
    for (int32_t i = 0; i < kSteps; ++i) {
      for (kv::SeqId s = 0; s < kSeqs; ++s) sched.appendToken(s);  // the sampled tokens
      const engine::StepPlan plan = sched.schedule();
      step.clear();
      for (const auto& c : plan.chunks) step.push_back({c.seq, c.firstPos, c.numTokens});
      cache.resolveStep(step, slots, tables, starts);
      for (int32_t l = 0; l < kLayers; ++l) {
        for (size_t s = 0; s < step.size(); ++s) {
          const auto end =
              static_cast<int32_t>(s + 1 < step.size() ? starts[s + 1] : tables.size());
          const int32_t n = step[s].firstPos + step[s].numTokens;
          keep(arena.kView(l, tables.data() + starts[s], end - starts[s], n));
          keep(arena.vView(l, tables.data() + starts[s], end - starts[s], n));
        }
      }
    }
    for (kv::SeqId s = 0; s < kSeqs; ++s) sched.remove(s);
  });
  return {{"sequences", kSeqs},
          {"context_tokens", kContext},
          {"layers", kLayers},
          {"per_sequence_ns_per_step", perSequence},
          {"resolved_plan_ns_per_step", resolved},
          {"per_sequence_over_resolved", perSequence / resolved}};
}

nlohmann::json runKvMicroBench(int32_t blockSize) {
  // The default model's shape (30 layers, 3 KV heads, head dim 64), f16, 4096 blocks.
  kv::KVCacheConfig cfg;
  cfg.numLayers = 30;
  cfg.numKVHeads = 3;
  cfg.headDim = 64;
  cfg.blockSizeTokens = blockSize;
  cfg.numBlocks = 4096;
  kv::KVCache cache(cfg);
  cache.warmup();

  constexpr int kReps = 7;
  // Allocate + free through the pool, 64 blocks a call.
  kv::BlockPool pool(4096);
  std::vector<kv::BlockId> ids(64);
  constexpr int kPoolIters = 20000;
  const double allocFree = bestNsPerUnit(kReps, double(kPoolIters) * 64, [&] {
    for (int i = 0; i < kPoolIters; ++i) {
      pool.allocate(ids);
      pool.free(ids);
    }
  });
  const double allocFreeOne = bestNsPerUnit(kReps, kPoolIters, [&] {
    for (int i = 0; i < kPoolIters; ++i) pool.free(pool.allocateOne());
  });

  // appendToken through KVCache (lock, lookup, new block every blockSize tokens), amortised.
  constexpr int32_t kSeqTokens = 4096;
  const double append = bestNsPerUnit(kReps, kSeqTokens - 1, [&] {
    cache.allocateFor(1, 1);
    for (int32_t t = 1; t < kSeqTokens; ++t) keep(cache.appendToken(1));
    cache.freeFor(1);
  });
  const double appendBulk = bestNsPerUnit(kReps, 1000.0 * 64, [&] {
    cache.allocateFor(1, 1);
    for (int i = 0; i < 1000; ++i) keep(cache.appendTokens(1, 64));
    cache.freeFor(1);
  });

  // fork of a 1024-token sequence (64 blocks at block size 16), then free of the fork.
  cache.allocateFor(7, 1024);
  constexpr int kForkIters = 2000;
  const double fork = bestNsPerUnit(kReps, kForkIters, [&] {
    for (int i = 0; i < kForkIters; ++i) {
      cache.fork(7, 8);
      cache.freeFor(8);
    }
  });
  constexpr int kViewIters = 100000;
  const double view = bestNsPerUnit(kReps, kViewIters, [&] {
    for (int i = 0; i < kViewIters; ++i) keep(cache.getKView(7, i % cfg.numLayers));
  });
  const double slot = bestNsPerUnit(kReps, kViewIters, [&] {
    for (int i = 0; i < kViewIters; ++i) keep(cache.slotFor(7, i % 1024));
  });
  cache.freeFor(7);

  return {{"config",
           {{"layers", cfg.numLayers},
            {"kv_heads", cfg.numKVHeads},
            {"head_dim", cfg.headDim},
            {"block_size_tokens", cfg.blockSizeTokens},
            {"num_blocks", cfg.numBlocks},
            {"dtype", kv::toString(cfg.dtype)}}},
          {"allocate_free_ns_per_block", allocFree},
          {"allocate_free_one_ns", allocFreeOne},
          {"append_ns_per_token", append},
          {"append_bulk64_ns_per_token", appendBulk},
          {"fork_ns", fork},
          {"fork_tokens", 1024},
          {"view_ns", view},
          {"slot_ns", slot},
          {"step_bookkeeping", runStepBookkeepingBench(blockSize)}};
}

// One sequence's way to `tokens` positions through the engine's own bookkeeping (Scheduler over
// the real KVCache, no forward pass): a prompt of tokens - 1 positions prefilled in chunks of
// maxBatchedTokens, then one decode step. Returns the blocks it holds then and the most it held
// on the way.
std::pair<int64_t, int64_t> sequenceBlocks(const kv::KVCacheConfig& base, int32_t tokens,
                                           int32_t maxBatchedTokens) {
  kv::KVCacheConfig cfg = base;
  cfg.memoryBudgetBytes = 0;
  cfg.prefixCaching = false;
  cfg.numBlocks = static_cast<int32_t>(kv::blocksForSequence(cfg, tokens, maxBatchedTokens)) + 2;
  kv::KVCache cache(cfg);
  engine::PagedBlockBudget budget(cache);
  engine::SchedulerConfig sc;
  sc.maxBatchedTokens = maxBatchedTokens;
  sc.maxNumSeqs = 1;
  sc.watermarkFraction = 0;
  engine::Scheduler scheduler(sc, budget);
  const kv::SeqId seq = 1;
  scheduler.add(seq, std::max(1, tokens - 1), tokens);
  int64_t peak = 0;
  while (scheduler.computedTokens(seq) < tokens) {
    const engine::StepPlan plan = scheduler.schedule();
    if (plan.empty()) throw std::runtime_error("kv-footprint: the sequence did not fit");
    peak = std::max<int64_t>(peak, cache.usedBlocks());
    if (plan.chunks.back().completesContext && scheduler.computedTokens(seq) < tokens) {
      scheduler.appendToken(seq);
    }
  }
  cache.checkInvariants();
  return {cache.usedBlocks(), peak};
}

nlohmann::json runKvFootprint(const ModelOptions& mo, const std::vector<int32_t>& lengths,
                              int32_t maxBatchedTokens) {
  const Loaded l = loadModel(mo);
  nlohmann::json rows = nlohmann::json::array();
  engine::EngineConfig ec;
  ec.kvDtype = mo.kvDtype;
  ec.maxBatchedTokens = maxBatchedTokens;
  ec.hybridKv = true;
  const kv::KVCacheConfig hybrid = engine::kvCacheConfigFor(*l.model, ec, 1);
  ec.hybridKv = false;
  const kv::KVCacheConfig full = engine::kvCacheConfigFor(*l.model, ec, 1);
  const kv::KVGroups groups = kv::kvGroups(hybrid);
  nlohmann::json groupJson = nlohmann::json::array();
  for (const kv::KVGroup& g : groups.groups) groupJson.push_back({{"window", g.window}, {"layers", g.layers}});
  constexpr double kMiB = 1024.0 * 1024.0;
  for (int32_t t : lengths) {
    if (t > l.model->hparams().nCtxTrain) {
      throw std::runtime_error("kv-footprint: " + std::to_string(t) +
                               " tokens exceed the model's context of " +
                               std::to_string(l.model->hparams().nCtxTrain));
    }
    const auto [hBlocks, hPeak] = sequenceBlocks(hybrid, t, maxBatchedTokens);
    const auto [fBlocks, fPeak] = sequenceBlocks(full, t, maxBatchedTokens);
    const auto bytes = [](int64_t blocks, const kv::KVCacheConfig& c) {
      return static_cast<uint64_t>(blocks) * kv::bytesPerBlock(c);
    };
    const uint64_t hb = bytes(hBlocks, hybrid), fb = bytes(fBlocks, full);
    rows.push_back({{"tokens", t},
                    {"hybrid_bytes", hb},
                    {"hybrid_peak_bytes", bytes(hPeak, hybrid)},
                    {"full_bytes", fb},
                    {"full_peak_bytes", bytes(fPeak, full)},
                    {"hybrid_mib", static_cast<double>(hb) / kMiB},
                    {"full_mib", static_cast<double>(fb) / kMiB},
                    {"hybrid_over_full", static_cast<double>(hb) / static_cast<double>(fb)}});
  }
  return {{"architecture", model::toString(l.model->hparams().arch)},
          {"kv_dtype", kv::toString(mo.kvDtype)},
          {"block_size_tokens", hybrid.blockSizeTokens},
          {"max_batched_tokens", maxBatchedTokens},
          {"layers_per_block", groups.layersPerGroup},
          {"groups", groupJson},
          {"hybrid_bytes_per_block", kv::bytesPerBlock(hybrid)},
          {"full_bytes_per_block", kv::bytesPerBlock(full)},
          {"sequences", rows}};
}

}  // namespace

void registerBenchKvCommands(CLI::App& bench) {
  auto* kvCmd = bench.add_subcommand("kv", "KV cache micro-benchmarks (ns per operation)");
  // note: options write into these shared objects, which the callbacks keep alive.
  auto blockSize = std::make_shared<int32_t>(16);
  auto json = std::make_shared<bool>(false);
  kvCmd->add_option("--block-size", *blockSize, "tokens per block")->check(CLI::Range(1, 4096));
  kvCmd->add_flag("--json", *json, "print the JSON object on one line");
  kvCmd->callback([blockSize, json] {
    // --json: one line for machines; without it the same object, indented for people.
    std::cout << runKvMicroBench(*blockSize).dump(*json ? -1 : 2) << "\n";
  });

  auto* sim = bench.add_subcommand(
      "kv-sim",
      "Seeded serving simulation under the engine's scheduler: paged KV cache vs the contiguous "
      "design");
  auto cfg = std::make_shared<kvsim::SimConfig>();
  sim->add_option("--seed", cfg->seed, "random seed");
  sim->add_option("--blocks", cfg->numBlocks, "blocks in the pool")->check(CLI::Range(1, 1 << 24));
  sim->add_option("--block-size", cfg->blockSizeTokens, "tokens per block")
      ->check(CLI::Range(1, 4096));
  sim->add_option("--requests", cfg->numRequests, "requests in the trace")
      ->check(CLI::Range(1, 10000000));
  sim->add_option("--arrival-rate", cfg->arrivalsPerStep, "mean arrivals per step")
      ->check(CLI::Range(0.001, 1000.0));
  sim->add_option("--max-tokens", cfg->maxOutputTokens, "max_tokens of every request")
      ->check(CLI::Range(1, 1 << 20));
  sim->add_option("--prompt-median", cfg->promptMedianTokens, "median prompt length (tokens)")
      ->check(CLI::Range(1.0, 1e6));
  sim->add_option("--output-median", cfg->outputMedianTokens, "median output length (tokens)")
      ->check(CLI::Range(1.0, 1e6));
  sim->add_option("--max-batched-tokens", cfg->maxBatchedTokens, "the scheduler's tokens per step")
      ->check(CLI::Range(1, 1 << 24));
  sim->add_option("--max-num-seqs", cfg->maxNumSeqs, "the scheduler's cap on running requests")
      ->check(CLI::Range(1, 1 << 20));
  sim->add_flag("--json", *json, "print the JSON object on one line");
  sim->callback([cfg, json] {
    const std::string out = kvsim::toJson(kvsim::runServingSim(*cfg));
    std::cout << (*json ? out : nlohmann::json::parse(out).dump(2)) << "\n";
  });

  auto* foot = bench.add_subcommand(
      "kv-footprint",
      "KV bytes one sequence holds at each length, hybrid cache on and off (the engine's "
      "scheduler and KV cache, no forward pass)");
  auto mo = std::make_shared<ModelOptions>();
  auto lengths = std::make_shared<std::vector<int32_t>>(std::vector<int32_t>{512, 4096, 32768});
  auto step = std::make_shared<int32_t>(512);
  foot->add_option("--model,-m", mo->modelPath, kModelOptionHelp);
  addKvDtypeOption(foot, mo->kvDtype);
  foot->add_option("--tokens", *lengths, "sequence lengths, comma-separated")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  foot->add_option("--max-batched-tokens", *step, "prefill chunk (tokens per step)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  foot->add_flag("--json", *json, "print the JSON object on one line");
  foot->callback([mo, lengths, step, json] {
    std::cout << runKvFootprint(*mo, *lengths, *step).dump(*json ? -1 : 2) << "\n";
  });
}

}  // namespace cortex::cli
