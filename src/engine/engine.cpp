#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "engine/stop_matcher.h"
#include "kernels/ops.h"

namespace cortex::engine {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::vector<double> latencyBounds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
          0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
}

uint64_t memAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  uint64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

TokenLogprob tokenLogprob(const std::vector<float>& lp, int32_t token, int32_t topN) {
  TokenLogprob t;
  t.token = token;
  t.logprob = lp[static_cast<size_t>(token)];
  if (topN > 0) {
    std::vector<int32_t> ids(lp.size());
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
    const size_t k = std::min(static_cast<size_t>(topN), ids.size());
    std::partial_sort(ids.begin(), ids.begin() + static_cast<long>(k), ids.end(),
                      [&](int32_t a, int32_t b) {
                        return lp[static_cast<size_t>(a)] > lp[static_cast<size_t>(b)] ||
                               (lp[static_cast<size_t>(a)] == lp[static_cast<size_t>(b)] && a < b);
                      });
    for (size_t i = 0; i < k; ++i) t.top.emplace_back(ids[i], lp[static_cast<size_t>(ids[i])]);
  }
  return t;
}

}  // namespace

const char* toString(FinishReason reason) {
  switch (reason) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
    case FinishReason::Error: return "error";
  }
  return "?";
}

void Histogram::observe(double value) {
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (value <= bounds[i]) ++counts[i];
  }
  ++counts.back();  // +Inf
  sum += value;
  ++count;
}

uint64_t defaultKvCacheBytes(const model::LlamaModel& model, const EngineConfig& config) {
  const uint64_t perToken =
      kv::bytesPerToken(model.kvCacheConfig(config.blockSizeTokens, 1, config.kvDtype));
  const uint64_t oneContext =
      perToken * static_cast<uint64_t>((model.hparams().nCtxTrain + config.blockSizeTokens - 1) /
                                       config.blockSizeTokens * config.blockSizeTokens);
  const uint64_t share = std::min<uint64_t>(memAvailableBytes() / 4, 4ull << 30);
  return std::max(share, oneContext);
}

// ---------------------------------------------------------------------------------------------

void RequestStream::push(RequestEvent event) {
  {
    std::lock_guard lock(mu_);
    events_.push_back(std::move(event));
  }
  cv_.notify_all();
}

std::optional<RequestEvent> RequestStream::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  if (closed_) return std::nullopt;
  if (!cv_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
  RequestEvent e = std::move(events_.front());
  events_.pop_front();
  if (e.finished) closed_ = true;
  return e;
}

void RequestStream::cancel() {
  std::lock_guard lock(mu_);
  cancelRequested_ = true;
}

// ---------------------------------------------------------------------------------------------

struct Engine::Request {
  Request(uint64_t id_, RequestParams p, const model::Tokenizer& tok, int32_t vocab)
      : id(id_),
        params(std::move(p)),
        stream(new RequestStream(id_)),
        sampler(params.sampling, vocab, params.promptTokens),
        decoder(tok),
        stops(params.stop) {}

  int32_t promptSize() const { return static_cast<int32_t>(params.promptTokens.size()); }
  int32_t contextTokens() const { return promptSize() + static_cast<int32_t>(generated.size()); }
  // The context's tokens [first, first + n): prompt, then generated tokens.
  void tokens(int32_t first, int32_t n, std::vector<int32_t>& out) const {
    out.resize(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) {
      const int32_t pos = first + i;
      out[static_cast<size_t>(i)] = pos < promptSize()
                                        ? params.promptTokens[static_cast<size_t>(pos)]
                                        : generated[static_cast<size_t>(pos - promptSize())];
    }
  }
  // Logits for every new prompt position (prompt logprobs, or raw rows for returnLogits) until
  // the whole prompt has been seen once.
  bool wantsPromptRows() const {
    return (params.promptLogprobs || params.returnLogits) && !promptRowsDone;
  }
  bool cancelRequested() {
    // note: a stream nobody holds any more (the client went away) counts as cancelled.
    if (stream.use_count() == 1) return true;
    std::lock_guard lock(stream->mu_);
    return stream->cancelRequested_;
  }

  uint64_t id;
  RequestParams params;
  std::shared_ptr<RequestStream> stream;
  Sampler sampler;
  model::StreamDecoder decoder;
  StopMatcher stops;
  std::vector<int32_t> generated;
  bool running = false;  // admitted by the scheduler (not waiting)
  bool finished = false;
  std::vector<TokenLogprob> promptLogprobs;
  std::vector<float> promptLogits;
  bool promptRowsDone = false;
  Clock::time_point submitted = Clock::now();
  Clock::time_point lastToken;
};

Engine::Engine(model::LlamaModel& model, const model::Tokenizer& tokenizer,
               const EngineConfig& config, EngineHooks hooks)
    : model_(model), tokenizer_(tokenizer), config_(config), hooks_(std::move(hooks)) {
  using Kind = EngineError::Kind;
  if (config_.maxBatchedTokens < 1 || config_.maxNumSeqs < 1 || config_.maxQueuedRequests < 1) {
    throw EngineError(Kind::InvalidRequest,
                      "max batched tokens, max sequences and max queue must be >= 1");
  }
  if (tokenizer_.vocabSize() > model_.hparams().nVocab) {
    throw EngineError(Kind::InvalidRequest,
                      "the tokenizer has " + std::to_string(tokenizer_.vocabSize()) +
                          " tokens but the model has output rows for only " +
                          std::to_string(model_.hparams().nVocab));
  }
  const uint64_t bytes =
      config_.kvCacheBytes ? config_.kvCacheBytes : defaultKvCacheBytes(model_, config_);
  config_.kvCacheBytes = bytes;
  cache_ = std::make_unique<kv::KVCache>(
      model_.kvCacheConfig(config_.blockSizeTokens, bytes, config_.kvDtype));
  cache_->warmup();
  budget_ = std::make_unique<PagedBlockBudget>(*cache_);
  SchedulerConfig sc;
  sc.maxBatchedTokens = config_.maxBatchedTokens;
  sc.maxNumSeqs = config_.maxNumSeqs;
  scheduler_ = std::make_unique<Scheduler>(sc, *budget_);
  runner_ = std::make_unique<ModelRunner>(model_, *cache_, config_.numThreads);
  stats_.blockSizeTokens = config_.blockSizeTokens;
  stats_.timeToFirstToken = {latencyBounds(), std::vector<uint64_t>(latencyBounds().size() + 1)};
  stats_.timePerOutputToken = stats_.timeToFirstToken;
  stats_.requestLatency = stats_.timeToFirstToken;
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
  for (auto& r : incoming_) finish(*r, FinishReason::Cancelled);
  for (auto& [id, r] : requests_) finish(*r, FinishReason::Cancelled);
}

int32_t Engine::maxContextTokens() const {
  return static_cast<int32_t>(
      std::min<int64_t>(model_.hparams().nCtxTrain, scheduler_->maxContextTokens()));
}

std::shared_ptr<RequestStream> Engine::submit(RequestParams params) {
  using Kind = EngineError::Kind;
  const int32_t vocab = model_.hparams().nVocab;
  if (params.promptTokens.empty()) {
    throw EngineError(Kind::InvalidRequest, "the prompt has no tokens", "prompt");
  }
  for (int32_t t : params.promptTokens) {
    if (t < 0 || t >= vocab) {
      throw EngineError(Kind::InvalidRequest,
                        "prompt token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                            std::to_string(vocab) + ")",
                        "prompt");
    }
  }
  if (params.maxTokens < (params.promptLogprobs ? 0 : 1)) {
    throw EngineError(Kind::InvalidRequest,
                      params.promptLogprobs ? "max_tokens must be >= 0"
                                            : "max_tokens must be >= 1 (0 only to score the "
                                              "prompt with prompt logprobs)",
                      "max_tokens");
  }
  if (params.topLogprobs < -1 || params.topLogprobs > 20) {
    throw EngineError(Kind::InvalidRequest, "top_logprobs must be in [0, 20]", "top_logprobs");
  }
  if (const std::string bad = params.sampling.validate(); !bad.empty()) {
    throw EngineError(Kind::InvalidRequest, bad);
  }
  const int64_t prompt = static_cast<int64_t>(params.promptTokens.size());
  if (prompt + params.maxTokens > maxContextTokens()) {
    throw EngineError(Kind::TooLong,
                      "This model's maximum context length is " +
                          std::to_string(maxContextTokens()) + " tokens. However, you requested " +
                          std::to_string(prompt + params.maxTokens) + " tokens (" +
                          std::to_string(prompt) + " in the prompt, " +
                          std::to_string(params.maxTokens) +
                          " for the completion). Please reduce the length of the prompt or the "
                          "completion.",
                      "prompt");
  }
  std::lock_guard lock(mu_);
  if (stopping_ || draining_) throw EngineError(Kind::ShuttingDown, "the server is shutting down");
  if (queued_ >= config_.maxQueuedRequests) {
    throw EngineError(Kind::QueueFull, "too many requests are waiting (" +
                                           std::to_string(config_.maxQueuedRequests) +
                                           "); retry later");
  }
  auto r = std::make_unique<Request>(nextId_++, std::move(params), tokenizer_, vocab);
  std::shared_ptr<RequestStream> stream = r->stream;
  incoming_.push_back(std::move(r));
  ++queued_;
  stats_.waiting = queued_;
  wake_.notify_all();
  return stream;
}

void Engine::drain() {
  std::lock_guard lock(mu_);
  draining_ = true;
}

EngineStats Engine::stats() const {
  EngineStats s;
  {
    std::lock_guard lock(mu_);
    s = stats_;
  }
  s.kv = cache_->stats();
  return s;
}

void Engine::admitNewRequests() {
  std::deque<std::unique_ptr<Request>> arrived;
  {
    std::lock_guard lock(mu_);
    arrived.swap(incoming_);
  }
  for (auto& r : arrived) {
    const kv::SeqId id = r->id;
    try {
      const int32_t maxContext = r->promptSize() + r->params.maxTokens;
      const int32_t reuse = reusableTokens(*r);
      if (reuse > 0) {
        scheduler_->addReusing(id, r->promptSize(), maxContext, sessions_.at(r->params.session).seq,
                               reuse);
        sessions_.erase(r->params.session);
      } else {
        scheduler_->add(id, r->promptSize(), maxContext);
      }
    } catch (const std::exception& e) {
      // submit() checked the size against the same limits; this is a safety net, not a path.
      finish(*r, FinishReason::Error, e.what());
      continue;
    }
    requests_.emplace(id, std::move(r));
  }
}

int32_t Engine::reusableTokens(const Request& r) {
  if (r.params.session == 0) return 0;
  auto it = sessions_.find(r.params.session);
  if (it == sessions_.end()) return 0;
  const KeptSession& kept = it->second;
  const auto& prompt = r.params.promptTokens;
  size_t common = 0;
  if (scheduler_->isParked(kept.seq) && !r.wantsPromptRows()) {
    while (common < kept.tokens.size() && common < prompt.size() &&
           kept.tokens[common] == prompt[common]) {
      ++common;
    }
  }
  // At least one prompt token is computed: its logits give the first new token.
  const auto reuse = static_cast<int32_t>(std::min(common, prompt.size() - 1));
  if (reuse == 0) {
    scheduler_->remove(kept.seq);  // nothing to share: free it now
    sessions_.erase(it);
  }
  return reuse;
}

void Engine::keepForSession(Request& r) {
  const kv::SeqId seq = r.id;
  const int32_t computed = scheduler_->computedTokens(seq);
  KeptSession kept{seq, {}};
  r.tokens(0, computed, kept.tokens);
  scheduler_->park(seq);
  auto [it, inserted] = sessions_.try_emplace(r.params.session);
  if (!inserted) scheduler_->remove(it->second.seq);  // an older turn's KV: superseded
  it->second = std::move(kept);
}

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (stopping_) return;
    }
    bool worked = false;
    try {
      admitNewRequests();
      worked = step();
    } catch (const std::exception& e) {
      // note: step() handles the failures it expects per request; anything that still escapes
      // leaves the scheduler's state unknown, so every request in it ends with the error.
      std::vector<kv::SeqId> all;
      for (const auto& [id, r] : requests_) all.push_back(id);
      for (kv::SeqId id : all) fail(id, std::string("engine step failed: ") + e.what());
      updateCounts();
    }
    if (!worked) {
      std::unique_lock lock(mu_);
      wake_.wait_for(lock, std::chrono::milliseconds(20),
                     [&] { return stopping_ || !incoming_.empty(); });
    }
  }
}

void Engine::finish(Request& r, FinishReason reason, const std::string& error) {
  if (r.finished) return;
  RequestEvent e;
  e.finished = true;
  e.finishReason = reason;
  e.error = error;
  if (reason == FinishReason::Stop || reason == FinishReason::Length) {
    // The decoder's held bytes and any held stop-string prefix were real output.
    if (!r.stops.stopped()) {
      e.text = r.stops.push(r.decoder.flush());
      e.text += r.stops.flush();
    }
  }
  e.promptTokens = r.promptSize();
  e.completionTokens = static_cast<int32_t>(r.generated.size());
  // A request that finishes without sampling (scoring) carries its prompt rows here.
  e.promptLogprobs = std::move(r.promptLogprobs);
  e.promptLogits = std::move(r.promptLogits);
  const bool keep = r.params.session != 0 && r.running &&
                    (reason == FinishReason::Stop || reason == FinishReason::Length);
  if (keep) {
    keepForSession(r);
  } else {
    scheduler_->remove(r.id);  // its blocks go back to the pool
  }
  r.finished = true;
  {
    // Counted before the event goes out, so a client that sees it also sees it counted.
    std::lock_guard lock(mu_);
    if (!r.running) --queued_;
    switch (reason) {
      case FinishReason::Stop: ++stats_.finishedStop; break;
      case FinishReason::Length: ++stats_.finishedLength; break;
      case FinishReason::Cancelled: ++stats_.finishedCancelled; break;
      case FinishReason::Error: ++stats_.finishedError; break;
    }
    stats_.requestLatency.observe(seconds(Clock::now() - r.submitted));
  }
  r.stream->push(std::move(e));
}

void Engine::fail(kv::SeqId seq, const std::string& error) {
  auto it = requests_.find(seq);
  if (it == requests_.end()) return;
  try {
    finish(*it->second, FinishReason::Error, error);
  } catch (...) {
    // note: finish only allocates small strings; if even that fails, the request is still
    // dropped below so the engine goes on.
  }
  scheduler_->remove(seq);
  requests_.erase(it);
}

void Engine::updateCounts() {
  std::lock_guard lock(mu_);
  stats_.running = scheduler_->numRunning();
  stats_.waiting = queued_;
}

void Engine::emitToken(Request& r, int32_t token, const float* logits) {
  RequestEvent e;
  const int32_t V = model_.hparams().nVocab;
  if (r.params.topLogprobs >= 0) {
    std::vector<float> lp(static_cast<size_t>(V));
    kernels::logSoftmax(logits, V, lp.data());
    e.logprobs.push_back(tokenLogprob(lp, token, r.params.topLogprobs));
  }
  if (r.params.returnLogits) e.logits.assign(logits, logits + V);
  r.sampler.accept(token);
  r.generated.push_back(token);
  e.tokens.push_back(token);
  const Clock::time_point now = Clock::now();
  {
    std::lock_guard lock(mu_);
    ++stats_.generationTokens;
    if (r.generated.size() == 1) {
      stats_.timeToFirstToken.observe(seconds(now - r.submitted));
    } else {
      stats_.timePerOutputToken.observe(seconds(now - r.lastToken));
    }
  }
  r.lastToken = now;
  if (r.generated.size() == 1) {
    e.promptLogprobs = std::move(r.promptLogprobs);
    e.promptLogits = std::move(r.promptLogits);
  }
  e.promptTokens = r.promptSize();
  e.completionTokens = static_cast<int32_t>(r.generated.size());
  std::optional<FinishReason> done;
  if (!r.params.ignoreEos && tokenizer_.isEndOfGeneration(token)) {
    done = FinishReason::Stop;
  } else {
    e.text = r.stops.push(r.decoder.push(token));
    if (r.stops.stopped()) {
      done = FinishReason::Stop;
    } else if (static_cast<int32_t>(r.generated.size()) >= r.params.maxTokens) {
      done = FinishReason::Length;
    }
  }
  r.stream->push(std::move(e));
  if (done) {
    finish(r, *done);
  } else {
    scheduler_->appendToken(r.id);
  }
}

// Consumes one chunk's logits rows: prompt logprobs / logits for new prompt positions, then, when
// the chunk completed the context, the next token.
void Engine::process(Request& r, const ScheduledChunk& chunk, float* rows) {
  const int32_t V = model_.hparams().nVocab;
  const int32_t P = r.promptSize();
  const int32_t first = chunk.firstPos;
  const int32_t n = chunk.numTokens;
  const bool allRows = r.wantsPromptRows();
  if (allRows) {
    if (r.params.promptLogprobs) {
      // Row j predicts position first + j + 1.
      std::vector<float> lp(static_cast<size_t>(V));
      if (first == 0) r.promptLogprobs.push_back({r.params.promptTokens[0], NAN, {}});
      for (int32_t j = 0; j < n && first + j + 1 < P; ++j) {
        kernels::logSoftmax(rows + static_cast<size_t>(j) * static_cast<size_t>(V), V, lp.data());
        r.promptLogprobs.push_back(
            tokenLogprob(lp, r.params.promptTokens[static_cast<size_t>(first + j + 1)],
                         std::max(0, r.params.topLogprobs)));
      }
    }
    if (r.params.returnLogits) {
      const int32_t keep = std::min(n, P - first);
      r.promptLogits.insert(r.promptLogits.end(), rows,
                            rows + static_cast<size_t>(keep) * static_cast<size_t>(V));
    }
    if (first + n >= P) r.promptRowsDone = true;
  }
  if (!chunk.completesContext) return;
  if (r.params.maxTokens == 0) {
    finish(r, FinishReason::Length);  // scored the prompt; nothing to generate
    return;
  }
  const float* last = rows + static_cast<size_t>(allRows ? n - 1 : 0) * static_cast<size_t>(V);
  if (hooks_.beforeSample) hooks_.beforeSample(r.id);
  // note: the sampler applies its penalties to the row in place; logprobs and returned logits
  // report the model's own distribution, so those requests sample from a copy.
  float* row = rows + static_cast<size_t>(allRows ? n - 1 : 0) * static_cast<size_t>(V);
  if (r.params.topLogprobs >= 0 || r.params.returnLogits) {
    sampleRow_.assign(last, last + V);
    row = sampleRow_.data();
  }
  const int32_t token = r.sampler.sample(row);
  emitToken(r, token, last);
}

void Engine::dropCancelled() {
  std::vector<kv::SeqId> cancelled;
  for (auto& [id, r] : requests_) {
    if (r->cancelRequested()) cancelled.push_back(id);
  }
  for (kv::SeqId id : cancelled) {
    finish(*requests_.at(id), FinishReason::Cancelled);
    requests_.erase(id);
  }
}

bool Engine::step() {
  dropCancelled();
  if (requests_.empty()) {
    updateCounts();
    return false;
  }
  const StepPlan plan = scheduler_->schedule();
  {
    std::lock_guard lock(mu_);
    stats_.preemptions += plan.preempted.size();
    for (kv::SeqId id : plan.preempted) {
      Request& r = *requests_.at(id);
      r.running = false;
      ++queued_;
      if (!r.promptRowsDone) {  // recomputed from the start
        r.promptLogprobs.clear();
        r.promptLogits.clear();
      }
    }
    for (const ScheduledChunk& c : plan.chunks) {
      Request& r = *requests_.at(c.seq);
      if (!r.running) {
        r.running = true;
        --queued_;
        // Admitted past position 0: it starts on a session's kept positions (the scheduler may
        // have had to give them back while it waited, and then it starts at 0).
        stats_.reusedPromptTokens += static_cast<uint64_t>(c.firstPos);
      }
    }
    stats_.running = scheduler_->numRunning();
    stats_.waiting = queued_;
    stats_.peakStepSequences =
        std::max(stats_.peakStepSequences, static_cast<int32_t>(plan.chunks.size()));
  }
  if (plan.empty()) return false;

  // Run the step. A failure here concerns every request in it.
  runner_->clear();
  std::vector<kv::SeqId> batch;
  uint64_t promptTokensThisStep = 0;
  std::vector<int32_t> tokens;
  for (const ScheduledChunk& c : plan.chunks) {
    const Request& r = *requests_.at(c.seq);
    r.tokens(c.firstPos, c.numTokens, tokens);
    runner_->add(c.seq, c.firstPos, tokens, r.wantsPromptRows());
    batch.push_back(c.seq);
    if (c.numTokens > 1 || r.generated.empty()) {
      promptTokensThisStep += static_cast<uint64_t>(c.numTokens);
    }
  }
  try {
    if (hooks_.beforeForward) hooks_.beforeForward(batch);
    runner_->run(logits_);
  } catch (const std::exception& e) {
    for (kv::SeqId id : batch) fail(id, std::string("forward pass failed: ") + e.what());
    updateCounts();
    return true;
  }
  {
    std::lock_guard lock(mu_);
    ++stats_.steps;
    stats_.promptTokens += promptTokensThisStep;
  }

  // Consume the logits rows in batch order; a failure here concerns one request.
  const auto V = static_cast<size_t>(model_.hparams().nVocab);
  size_t row = 0;
  for (const ScheduledChunk& c : plan.chunks) {
    Request& r = *requests_.at(c.seq);
    const size_t rows = r.wantsPromptRows() ? static_cast<size_t>(c.numTokens) : 1;
    try {
      process(r, c, logits_.data() + row * V);
    } catch (const std::exception& e) {
      fail(c.seq, std::string("sampling failed: ") + e.what());
    }
    row += rows;
  }
  std::erase_if(requests_, [](const auto& kv) { return kv.second->finished; });
  updateCounts();
  return true;
}

}  // namespace cortex::engine
