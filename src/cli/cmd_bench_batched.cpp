// `cortexstream bench batched`: prefill and decode throughput of N sequences decoded together on
// one Engine, for each N of --npl (the measurement llama.cpp's llama-batched-bench makes).
//
// For each N a fresh Engine is built whose limits let all N sequences run together: max-num-seqs
// N, max-batched-tokens N x npp (the whole prefill is one step), and KV memory for N x (npp + ntg)
// positions plus the scheduler's watermark. Then, untimed: one warm-up request (npp prompt tokens,
// 2 generated), and a one-token "gate" request whose forward pass is held (EngineHooks::
// beforeForward) while the N requests are submitted, so the step loop admits all N in the same
// step. Timed, per repeat:
//   start       the first forward pass that carries the N requests (on the step loop);
//   prefill end the next forward pass after every sequence has sampled its first token (so the
//               prefill includes computing all N x npp prompt tokens and sampling N tokens);
//   end         the last request's final event received by this thread.
// decode = end - prefill end: ntg - 1 steps of N tokens each (the first token of each sequence
// comes from the prefill), so decode tokens/s = N x (ntg - 1) / decode seconds.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "engine/engine.h"
#include "engine/generate.h"

namespace cortex::cli {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

struct BatchedOptions {
  ModelOptions model;
  std::vector<int32_t> npl{1, 4, 16, 32, 64};
  int32_t npp = 128;
  int32_t ntg = 128;
  int32_t repeats = 1;
  bool json = false;
};

// The CPU's model name from /proc/cpuinfo ("unknown" when it has none).
std::string cpuModelName() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon == std::string::npos) break;
      const size_t start = line.find_first_not_of(" \t", colon + 1);
      return start == std::string::npos ? std::string() : line.substr(start);
    }
  }
  return "unknown";
}

// N distinct prompts of `length` token ids, drawn deterministically (xorshift64*, seeded by the
// sequence's index) from the vocabulary's normal tokens, so no prompt holds a control token.
std::vector<std::vector<int32_t>> makePrompts(const model::Tokenizer& tok, int32_t nVocab,
                                              int32_t count, int32_t length) {
  std::vector<int32_t> normal;
  const int32_t vocab = std::min(tok.vocabSize(), nVocab);
  for (int32_t id = 0; id < vocab; ++id) {
    if (tok.tokenType(id) == model::TokenType::Normal && !tok.isEndOfGeneration(id)) {
      normal.push_back(id);
    }
  }
  if (normal.empty()) throw std::runtime_error("the vocabulary has no normal tokens");
  std::vector<std::vector<int32_t>> prompts;
  std::set<std::vector<int32_t>> seen;
  uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&state] {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
  };
  for (int32_t i = 0; i < count; ++i) {
    state = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(i + 1);
    std::vector<int32_t> p(static_cast<size_t>(length));
    for (int attempt = 0;; ++attempt) {
      for (int32_t& t : p) t = normal[next() % normal.size()];
      if (seen.insert(p).second) break;
      if (attempt == 1000) {
        throw std::runtime_error("cannot draw " + std::to_string(count) +
                                 " distinct prompts of " + std::to_string(length) + " tokens");
      }
    }
    prompts.push_back(std::move(p));
  }
  return prompts;
}

// State shared with the engine's step loop through its hooks: holding one forward pass (the
// gate), and the timestamps of the measured run. Outlives the engine.
struct Probe {
  std::mutex mu;
  std::condition_variable cv;
  // The gate: the next forward pass waits until released.
  bool holdNext = false;
  bool holding = false;
  bool released = false;
  // The measured run: its requests have ids >= firstId; `count` of them.
  bool armed = false;
  uint64_t firstId = 0;
  int32_t count = 0;
  std::set<kv::SeqId> sampled;  // measured sequences that have sampled a token
  bool started = false, prefillDone = false;
  Clock::time_point start, prefillEnd;
  int32_t prefillSteps = 0, decodeSteps = 0;

  void beforeForward(std::span<const kv::SeqId> batch) {
    std::unique_lock lock(mu);
    if (holdNext) {
      holdNext = false;
      holding = true;
      cv.notify_all();
      cv.wait(lock, [&] { return released; });
      holding = false;
      released = false;
    }
    if (!armed) return;
    const bool measured =
        std::any_of(batch.begin(), batch.end(), [&](kv::SeqId s) { return s >= firstId; });
    if (!measured) return;
    const Clock::time_point now = Clock::now();
    if (!started) {
      started = true;
      start = now;
    }
    if (!prefillDone && static_cast<int32_t>(sampled.size()) == count) {
      prefillDone = true;
      prefillEnd = now;
    }
    ++(prefillDone ? decodeSteps : prefillSteps);
  }
  void beforeSample(kv::SeqId seq) {
    std::lock_guard lock(mu);
    if (armed && seq >= firstId) sampled.insert(seq);
  }
};

struct RunTimes {
  double prefill = 0, decode = 0, total = 0;
  int32_t prefillSteps = 0, decodeSteps = 0;
};

// Waits for every stream to finish; each must end with FinishReason::Length after `ntg` tokens.
void drain(std::vector<std::shared_ptr<engine::RequestStream>>& streams, int32_t ntg) {
  for (auto& s : streams) {
    for (;;) {
      std::optional<engine::RequestEvent> e = s->next(std::chrono::hours(1));
      if (!e || !e->finished) continue;
      if (e->finishReason != engine::FinishReason::Length || e->completionTokens != ntg) {
        throw std::runtime_error(
            std::string("a benchmark request ended with ") + engine::toString(e->finishReason) +
            " after " + std::to_string(e->completionTokens) + " tokens" +
            (e->error.empty() ? std::string() : ": " + e->error));
      }
      break;
    }
  }
}

// One measured run of all prompts at once on `eng` (see the file comment).
RunTimes measureOnce(engine::Engine& eng, Probe& probe,
                     const std::vector<std::vector<int32_t>>& prompts, int32_t ntg) {
  auto request = [](std::vector<int32_t> prompt, int32_t maxTokens) {
    engine::RequestParams p;
    p.promptTokens = std::move(prompt);
    p.sampling.temperature = 0;
    p.maxTokens = maxTokens;
    p.ignoreEos = true;
    return p;
  };
  {
    std::lock_guard lock(probe.mu);
    probe.holdNext = true;
  }
  // The gate: a one-token request whose forward pass waits while the measured ones are queued.
  std::vector<std::shared_ptr<engine::RequestStream>> gate{
      eng.submit(request({prompts.front().front()}, 1))};
  {
    std::unique_lock lock(probe.mu);
    probe.cv.wait(lock, [&] { return probe.holding; });
    probe.armed = true;
    probe.firstId = gate.front()->id() + 1;
    probe.count = static_cast<int32_t>(prompts.size());
    probe.sampled.clear();
    probe.started = probe.prefillDone = false;
    probe.prefillSteps = probe.decodeSteps = 0;
  }
  std::vector<std::shared_ptr<engine::RequestStream>> streams;
  try {
    for (const auto& p : prompts) streams.push_back(eng.submit(request(p, ntg)));
  } catch (...) {
    std::lock_guard lock(probe.mu);
    probe.released = true;
    probe.cv.notify_all();
    throw;
  }
  {
    std::lock_guard lock(probe.mu);
    probe.released = true;
  }
  probe.cv.notify_all();
  if (streams.front()->id() < probe.firstId) throw std::logic_error("request ids out of order");
  drain(gate, 1);
  drain(streams, ntg);
  const Clock::time_point end = Clock::now();
  std::lock_guard lock(probe.mu);
  probe.armed = false;
  if (!probe.started || !probe.prefillDone) {
    throw std::logic_error("the benchmark's steps were not observed");
  }
  RunTimes t;
  t.prefill = seconds(probe.prefillEnd - probe.start);
  t.decode = seconds(end - probe.prefillEnd);
  t.total = seconds(end - probe.start);
  t.prefillSteps = probe.prefillSteps;
  t.decodeSteps = probe.decodeSteps;
  return t;
}

nlohmann::json benchOneN(const Loaded& l, const BatchedOptions& o, int32_t n, int threads) {
  const int64_t promptTokens = int64_t{n} * o.npp;
  if (promptTokens > std::numeric_limits<int32_t>::max()) {
    throw std::runtime_error("N x npp is too large");
  }
  engine::EngineConfig c;
  c.kvDtype = o.model.kvDtype;
  c.hybridKv = !o.model.noHybridKv;
  c.backend = o.model.backend;
  c.numThreads = threads;
  c.maxNumSeqs = n;
  c.maxBatchedTokens = static_cast<int32_t>(promptTokens);
  c.maxQueuedRequests = n + 2;
  // Room for every sequence's whole context, plus more than the scheduler's watermark (1%).
  const uint64_t blockBytes = kv::bytesPerBlock(engine::kvCacheConfigFor(*l.model, c, 1));
  const uint64_t needed = engine::kvBytesForSequences(*l.model, c, o.npp + o.ntg, n) / blockBytes;
  c.kvCacheBytes = (needed + needed / 50 + 2) * blockBytes;

  auto probe = std::make_shared<Probe>();
  engine::EngineHooks hooks;
  hooks.beforeForward = [probe](std::span<const kv::SeqId> batch) { probe->beforeForward(batch); };
  hooks.beforeSample = [probe](kv::SeqId seq) { probe->beforeSample(seq); };
  engine::Engine eng(*l.model, *l.tokenizer, c, hooks);

  const auto prompts = makePrompts(*l.tokenizer, l.model->hparams().nVocab, n, o.npp);
  {
    // Warm-up, untimed: one request of the same prompt length, one decode step.
    engine::RequestParams w;
    w.promptTokens = prompts.back();
    w.promptTokens.front() = prompts.front().back();  // not any measured prompt
    w.sampling.temperature = 0;
    w.maxTokens = 2;
    w.ignoreEos = true;
    engine::generate(eng, std::move(w));
  }
  std::vector<RunTimes> runs;
  nlohmann::json runsJson = nlohmann::json::array();
  for (int32_t r = 0; r < o.repeats; ++r) {
    // Every repeat computes its prompts: the previous repeat's blocks must not be hit.
    eng.resetPrefixCache();
    runs.push_back(measureOnce(eng, *probe, prompts, o.ntg));
    const RunTimes& t = runs.back();
    runsJson.push_back({{"prefill_s", t.prefill}, {"decode_s", t.decode}, {"total_s", t.total}});
  }
  const engine::EngineStats st = eng.stats();

  auto best = [&](double RunTimes::*field) {
    double b = std::numeric_limits<double>::infinity();
    for (const RunTimes& t : runs) b = std::min(b, t.*field);
    return b;
  };
  const double prefill = best(&RunTimes::prefill);
  const double decode = best(&RunTimes::decode);
  const double total = best(&RunTimes::total);
  const int64_t decodeTokens = int64_t{n} * (o.ntg - 1);
  const int64_t allTokens = promptTokens + int64_t{n} * o.ntg;
  const bool together = st.peakStepSequences == n && st.preemptions == 0 &&
                        runs.front().prefillSteps == 1 && runs.front().decodeSteps == o.ntg - 1;
  return {{"n", n},
          {"engine_config",
           {{"max_num_seqs", c.maxNumSeqs},
            {"max_batched_tokens", c.maxBatchedTokens},
            {"kv_cache_bytes", st.kv.totalBytes},
            {"kv_blocks", st.kv.totalBlocks},
            {"kv_blocks_needed", needed},
            {"block_size_tokens", c.blockSizeTokens}}},
          {"all_sequences_together", together},
          {"peak_step_sequences", st.peakStepSequences},
          {"preemptions", st.preemptions},
          {"prefill_steps", runs.front().prefillSteps},
          {"decode_steps", runs.front().decodeSteps},
          {"prefill_tokens", promptTokens},
          {"decode_tokens", decodeTokens},
          {"prefill_s", prefill},
          {"decode_s", decode},
          {"total_s", total},
          {"prefill_tokens_per_s", double(promptTokens) / prefill},
          {"decode_tokens_per_s", double(decodeTokens) / decode},
          {"total_tokens_per_s", double(allTokens) / total},
          {"runs", runsJson}};
}

void runBatched(const BatchedOptions& o) {
  Loaded l = loadModel(o.model);  // not timed
  const int threads = o.model.threads > 0
                          ? o.model.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  nlohmann::json results = nlohmann::json::array();
  for (int32_t n : o.npl) {
    results.push_back(benchOneN(l, o, n, threads));
    std::cerr << "bench batched: N=" << n << " done\n";  // progress; the JSON goes to stdout
  }
  const nlohmann::json out = {
      {"bench", "batched"},
      {"machine", {{"cpu", cpuModelName()}, {"cores", std::thread::hardware_concurrency()}}},
      {"threads", threads},
      {"model", resolveModelPath(o.model.modelPath)},
      {"kv_dtype", kv::toString(o.model.kvDtype)},
      {"npp", o.npp},
      {"ntg", o.ntg},
      {"repeats", o.repeats},
      {"protocol",
       "per N: a fresh engine sized so that all N sequences run together (max_num_seqs N, "
       "max_batched_tokens N*npp, KV for N*(npp+ntg) tokens); model load, engine setup and one "
       "warm-up request (npp prompt tokens, 2 generated) are not timed; the prefix cache is emptied "
       "before each repeat; all N requests are "
       "admitted in one step; greedy, ignore_eos, distinct prompts of npp token ids; prefill = "
       "first forward pass of the N requests until every sequence has its first token; decode = "
       "the rest, N*(ntg-1) tokens; best of the repeats for each figure"},
      {"results", results}};
  std::cout << out.dump(o.json ? -1 : 2) << "\n";
}

}  // namespace

void registerBenchBatchedCommand(CLI::App& bench) {
  auto o = std::make_shared<BatchedOptions>();
  CLI::App* cmd = bench.add_subcommand(
      "batched", "Prefill and decode tokens/s of N sequences decoded together, for each N");
  addModelOptions(cmd, o->model);
  cmd->add_option("--npl", o->npl, "parallel sequence counts, comma-separated")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cmd->add_option("--npp", o->npp, "prompt tokens per sequence")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--ntg", o->ntg,
                  "tokens generated per sequence (>= 2: the first comes from the prefill)")
      ->check(CLI::Range(2, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--repeats", o->repeats, "measured runs per N (best of them is reported)")
      ->check(CLI::Range(1, 1000))
      ->capture_default_str();
  cmd->add_flag("--json", o->json, "print the JSON object on one line");
  cmd->callback([o] { runBatched(*o); });
}

}  // namespace cortex::cli
