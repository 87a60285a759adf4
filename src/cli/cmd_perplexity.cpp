// `cortexstream perplexity`: how well the model predicts a text file, scored on the serving
// engine (prompt log-probabilities of windows of the text submitted as requests).
//
// Two ways of cutting the text into windows (--method):
//   native     non-overlapping windows of --ctx tokens over the whole text (the last may be
//              shorter); every token of a window but its first is scored.
//   llama.cpp  the way llama.cpp's `llama-perplexity` scores a file, so the two figures can be
//              compared: only whole chunks of --ctx tokens, the first token of each chunk
//              replaced by BOS when the vocabulary adds BOS, and only the tokens after the
//              chunk's first half scored (each of them sees at least --ctx/2 tokens of context).
// Both report exp(mean negative log-likelihood) over the scored tokens (natural log).
//
// With --kv-window W (and --kv-sinks S), each window is scored as one windowed request
// (attention sinks + a sliding window): every token sees the first S tokens of its window and the
// W before it, and a window may be longer than the model's context (its positions move back at
// --max-model-len). Comparing it with full attention (--ctx up to the context) and with a plain
// window (--kv-sinks 0) on the same text shows what the sinks keep.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <fstream>
#include <future>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "engine/engine.h"
#include "kv/kv_cache.h"

namespace cortex::cli {

namespace {

// Completion tokens each scoring request asks for: none, the engine only scores the prompt.
constexpr int32_t kScoreMaxTokens = 0;

// Tokens per engine step. Every row of a step's logits is kept (4 bytes x vocabulary per token,
// ~100 MB at 512 tokens for a 49k vocabulary), so longer windows are prefilled in chunks of this
// size rather than whole; shorter ones share a step.
constexpr int32_t kStepTokens = 512;
constexpr int32_t kBlockSizeTokens = 16;

enum class Method { Native, LlamaCpp };

struct PerplexityOptions {
  ModelOptions model;
  std::string file;
  int32_t ctx = 512;
  std::string method = "native";
  int32_t kvWindow = 0;
  int32_t kvSinks = 0;
  int32_t maxModelLen = 0;
};

// One window of the tokenized text: tokens [start, start + length), the first replaced by BOS
// when bosFirst, scored from position firstScored on (earlier positions are context only).
struct Window {
  size_t start = 0;
  int32_t length = 0;
  int32_t firstScored = 1;
  bool bosFirst = false;
};

// Native windows: [0, ctx), [ctx, 2 ctx), ... over all `numTokens` tokens, the last one shorter
// when the text does not divide evenly (dropped when it would have fewer than 2 tokens, as it
// would score nothing). Each window scores every token but its first.
std::vector<Window> nativeWindows(size_t numTokens, int32_t ctx) {
  std::vector<Window> windows;
  for (size_t start = 0; start + 1 < numTokens; start += static_cast<size_t>(ctx)) {
    const auto length = static_cast<int32_t>(std::min<size_t>(ctx, numTokens - start));
    windows.push_back({start, length, 1, false});
  }
  return windows;
}

// llama-perplexity's chunks: floor(numTokens / ctx) whole chunks of ctx tokens (the remainder is
// not scored), each starting with BOS when the vocabulary adds one, each scoring the tokens at
// positions ctx/2 + 1 .. ctx - 1, i.e. ctx - ctx/2 - 1 tokens per chunk. Like llama-perplexity,
// refuses a text of fewer than 2 x ctx tokens.
std::vector<Window> llamaCppWindows(size_t numTokens, int32_t ctx, bool addBos) {
  if (numTokens < 2 * static_cast<size_t>(ctx)) {
    throw std::runtime_error("--method llama.cpp needs at least 2 x --ctx = " +
                             std::to_string(2 * static_cast<int64_t>(ctx)) +
                             " tokens; the file has " + std::to_string(numTokens));
  }
  std::vector<Window> windows;
  for (size_t i = 0; i < numTokens / static_cast<size_t>(ctx); ++i) {
    windows.push_back({i * static_cast<size_t>(ctx), ctx, ctx / 2 + 1, addBos});
  }
  return windows;
}

// Submits `tokens` to the engine as one scoring request (kScoreMaxTokens completion tokens,
// prompt log-probs on) and returns a future whose get() waits for it. The result has one
// entry per token: entry i is log p(tokens[i] | tokens[0..i)), entry 0 is NaN (nothing predicts
// it). get() throws std::runtime_error when the engine fails the request or returns log-probs
// that do not match the tokens. Throws engine::EngineError at once when the engine refuses it.
std::future<std::vector<float>> scoreWindow(engine::Engine& engine, std::vector<int32_t> tokens,
                                            kv::SeqWindow win) {
  engine::RequestParams p;
  p.promptTokens = std::move(tokens);
  p.kvWindow = win.window;
  p.kvSinks = win.sinks;
  p.sampling.temperature = 0;
  p.maxTokens = kScoreMaxTokens;
  p.promptLogprobs = true;
  std::vector<int32_t> expected = p.promptTokens;
  std::shared_ptr<engine::RequestStream> stream = engine.submit(std::move(p));
  return std::async(std::launch::deferred, [stream, expected = std::move(expected)] {
    std::vector<float> logprobs;
    logprobs.reserve(expected.size());
    while (true) {
      std::optional<engine::RequestEvent> e = stream->next(std::chrono::seconds(60));
      if (!e) continue;  // a long window on a slow machine: keep waiting
      for (const engine::TokenLogprob& t : e->promptLogprobs) {
        if (logprobs.size() >= expected.size() || t.token != expected[logprobs.size()]) {
          throw std::runtime_error("the engine's prompt log-probs do not match the window");
        }
        logprobs.push_back(t.logprob);
      }
      if (!e->finished) continue;
      if (e->finishReason == engine::FinishReason::Error ||
          e->finishReason == engine::FinishReason::Cancelled) {
        throw std::runtime_error("scoring a window failed: " +
                                 (e->error.empty() ? std::string("cancelled") : e->error));
      }
      break;
    }
    if (logprobs.size() != expected.size()) {
      throw std::runtime_error("the engine returned " + std::to_string(logprobs.size()) +
                               " prompt log-probs for a window of " +
                               std::to_string(expected.size()) + " tokens");
    }
    return logprobs;
  });
}

// Scores o.file with o.method and prints one JSON object: perplexity, tokens scored, windows,
// ctx, method, seconds (scoring only, not loading). Throws std::runtime_error for an unreadable
// file, an out-of-range --ctx or too short a text, and when the engine fails a window.
void runPerplexity(const PerplexityOptions& o) {
  const Method method = o.method == "llama.cpp" ? Method::LlamaCpp : Method::Native;
  std::ifstream in(o.file, std::ios::binary);
  if (!in) throw std::runtime_error(o.file + ": cannot open the text file");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Loaded l = loadModel(o.model);
  const model::HParams& hp = l.model->hparams();
  // A llama.cpp chunk of 2 tokens would score none (its second half starts at its last token).
  const int32_t minCtx = method == Method::LlamaCpp ? 3 : 2;
  const kv::SeqWindow win{o.kvWindow, o.kvSinks};
  if (o.kvSinks > 0 && !win.on()) throw std::runtime_error("--kv-sinks needs --kv-window");
  const int32_t maxCtx = win.on() ? (1 << 30) : hp.nCtxTrain - kScoreMaxTokens;
  if (o.ctx < minCtx || o.ctx > maxCtx) {
    throw std::runtime_error("--ctx must be in [" + std::to_string(minCtx) + ", " +
                             std::to_string(maxCtx) + "]");
  }
  // BOS once at the start of the text when the vocabulary adds it; special-token text in the
  // file is scored as plain text (both as llama-perplexity tokenizes).
  const std::vector<int32_t> tokens = l.tokenizer->encode(text, true, false);
  if (tokens.size() < 2) throw std::runtime_error(o.file + ": fewer than 2 tokens to score");
  const std::vector<Window> windows =
      method == Method::LlamaCpp ? llamaCppWindows(tokens.size(), o.ctx, l.tokenizer->addBos())
                                 : nativeWindows(tokens.size(), o.ctx);

  // Enough windows in flight to fill a step, and at least two so the next window is queued
  // while this thread sums the last one. The KV pool holds exactly that many windows (plus their
  // completion tokens); results do not depend on how many share a step, as every kernel is
  // batch-invariant.
  const int32_t inFlight = std::max(2, (kStepTokens + o.ctx - 1) / o.ctx + 1);
  engine::EngineConfig ec;
  ec.blockSizeTokens = kBlockSizeTokens;
  ec.kvDtype = o.model.kvDtype;
  ec.hybridKv = !o.model.noHybridKv;
  ec.backend = o.model.backend;
  ec.numThreads = o.model.threads;
  ec.maxBatchedTokens = kStepTokens;
  ec.maxNumSeqs = inFlight;
  ec.maxModelLen = o.maxModelLen;
  // One block per window to spare (per group); a windowed request holds its sinks and window.
  ec.kvCacheBytes =
      win.on() ? static_cast<uint64_t>(
                     kv::blocksForWindowedSequence(engine::kvCacheConfigFor(*l.model, ec, 1), win,
                                                   std::min(kStepTokens, win.window)) +
                     1) * kv::bytesPerBlock(engine::kvCacheConfigFor(*l.model, ec, 1)) *
                     static_cast<uint64_t>(inFlight)
               : engine::kvBytesForSequences(
                     *l.model, ec, static_cast<int64_t>(o.ctx) + kScoreMaxTokens + kBlockSizeTokens,
                     inFlight);
  engine::Engine engine(*l.model, *l.tokenizer, ec);

  auto submit = [&](const Window& w) {
    std::vector<int32_t> window(tokens.begin() + static_cast<std::ptrdiff_t>(w.start),
                                tokens.begin() + static_cast<std::ptrdiff_t>(w.start + w.length));
    if (w.bosFirst) window[0] = l.tokenizer->bos();
    return scoreWindow(engine, std::move(window), win);
  };
  double nll = 0;
  int64_t scored = 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::deque<std::pair<const Window*, std::future<std::vector<float>>>> pending;
  size_t next = 0;
  while (next < windows.size() || !pending.empty()) {
    while (next < windows.size() && static_cast<int32_t>(pending.size()) < inFlight) {
      pending.emplace_back(&windows[next], submit(windows[next]));
      ++next;
    }
    const Window& w = *pending.front().first;
    const std::vector<float> logprobs = pending.front().second.get();
    pending.pop_front();
    for (int32_t i = w.firstScored; i < w.length; ++i) {
      nll -= logprobs[static_cast<size_t>(i)];
      ++scored;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  nlohmann::json j = {{"perplexity", std::exp(nll / static_cast<double>(scored))},
                      {"tokens", scored},
                      {"windows", windows.size()},
                      {"ctx", o.ctx},
                      {"method", o.method},
                      {"seconds", seconds}};
  if (win.on()) {
    j["kv_window"] = win.window;
    j["kv_sinks"] = win.sinks;
  }
  std::cout << j.dump() << "\n";
}

}  // namespace

void registerPerplexityCommand(CLI::App& app) {
  auto o = std::make_shared<PerplexityOptions>();
  CLI::App* cmd = app.add_subcommand(
      "perplexity", "Perplexity of a text file, scored in windows of --ctx tokens");
  addModelOptions(cmd, o->model);
  cmd->add_option("--file,-f", o->file, "UTF-8 text file")->required();
  cmd->add_option("--ctx", o->ctx, "window length in tokens")->capture_default_str();
  cmd->add_option("--method", o->method,
                  "native: non-overlapping windows, every token but each window's first "
                  "scored; llama.cpp: as llama-perplexity (whole chunks, second half scored)")
      ->check(CLI::IsMember({"native", "llama.cpp"}))
      ->capture_default_str();
  cmd->add_option("--kv-window", o->kvWindow,
                  "score each window with attention sinks + a sliding window of this many tokens "
                  "(the window may then be longer than the model's context)")
      ->check(CLI::Range(1, 1 << 30));
  cmd->add_option("--kv-sinks", o->kvSinks, "first tokens of each window kept for good (with "
                                            "--kv-window)")
      ->check(CLI::Range(0, 1 << 30));
  cmd->add_option("--max-model-len", o->maxModelLen,
                  "positions a windowed request reaches before its window moves back "
                  "(default: the model's context)")
      ->check(CLI::Range(1, 1 << 30));
  cmd->callback([o] { runPerplexity(*o); });
}

}  // namespace cortex::cli
