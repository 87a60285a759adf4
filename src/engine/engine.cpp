#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>

#include "engine/stop_matcher.h"

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

// log-softmax of one row, in double for the normaliser.
void logSoftmax(const float* logits, int32_t n, std::vector<float>& out) {
  out.resize(static_cast<size_t>(n));
  float maxv = -std::numeric_limits<float>::infinity();
  for (int32_t i = 0; i < n; ++i) maxv = std::max(maxv, logits[i]);
  double sum = 0;
  for (int32_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - maxv);
  const double logZ = std::log(sum) + maxv;
  for (int32_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<float>(logits[i] - logZ);
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
  const kv::KVCacheConfig c = model.kvCacheConfig(config.blockSizeTokens, 1, config.kvDtype);
  const uint64_t perToken = 2ull * static_cast<uint64_t>(c.numLayers) *
                            static_cast<uint64_t>(c.numKVHeads) *
                            static_cast<uint64_t>(c.headDim) * kv::dtypeBytes(c.dtype);
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

  int32_t contextTokens() const {
    return static_cast<int32_t>(params.promptTokens.size() + generated.size());
  }
  int32_t token(int32_t pos) const {
    const int32_t p = static_cast<int32_t>(params.promptTokens.size());
    return pos < p ? params.promptTokens[static_cast<size_t>(pos)]
                   : generated[static_cast<size_t>(pos - p)];
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
  int32_t computed = 0;  // positions whose K/V are in the cache
  bool inCache = false;
  RequestState state = RequestState::Waiting;
  std::vector<TokenLogprob> promptLogprobs;
  bool promptLogprobsDone = false;
  Clock::time_point submitted = Clock::now();
  Clock::time_point lastToken;
  std::vector<int32_t> batchTokens;  // this step's input
};

Engine::Engine(model::LlamaModel& model, const model::Tokenizer& tokenizer,
               const EngineConfig& config)
    : model_(model), tokenizer_(tokenizer), config_(config) {
  if (config_.maxBatchedTokens < 1 || config_.maxNumSeqs < 1 || config_.maxQueuedRequests < 1) {
    throw EngineError(EngineError::Kind::InvalidRequest,
                      "max batched tokens, max sequences and max queue must be >= 1");
  }
  const uint64_t bytes =
      config_.kvCacheBytes ? config_.kvCacheBytes : defaultKvCacheBytes(model_, config_);
  config_.kvCacheBytes = bytes;
  cache_ = std::make_unique<kv::KVCache>(
      model_.kvCacheConfig(config_.blockSizeTokens, bytes, config_.kvDtype));
  cache_->warmup();
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
  for (auto* list : {&incoming_, &waiting_}) {
    for (auto& r : *list) finish(*r, FinishReason::Cancelled);
  }
  for (auto& r : running_) finish(*r, FinishReason::Cancelled);
}

int32_t Engine::maxContextTokens() const {
  return std::min<int32_t>(model_.hparams().nCtxTrain,
                           cache_->numBlocks() * cache_->blockSizeTokens());
}

std::shared_ptr<RequestStream> Engine::submit(RequestParams params) {
  using Kind = EngineError::Kind;
  const int32_t vocab = model_.hparams().nVocab;
  if (params.promptTokens.empty()) throw EngineError(Kind::InvalidRequest, "the prompt is empty");
  for (int32_t t : params.promptTokens) {
    if (t < 0 || t >= vocab) {
      throw EngineError(Kind::InvalidRequest, "prompt token id " + std::to_string(t) +
                                                  " is outside the vocabulary [0, " +
                                                  std::to_string(vocab) + ")");
    }
  }
  if (params.maxTokens < 1) throw EngineError(Kind::InvalidRequest, "max_tokens must be >= 1");
  if (params.topLogprobs < -1 || params.topLogprobs > 20) {
    throw EngineError(Kind::InvalidRequest, "top_logprobs must be in [0, 20]");
  }
  if (const std::string bad = params.sampling.validate(); !bad.empty()) {
    throw EngineError(Kind::InvalidRequest, bad);
  }
  const int64_t need = static_cast<int64_t>(params.promptTokens.size()) + params.maxTokens;
  if (need > maxContextTokens()) {
    throw EngineError(Kind::TooLong,
                      "this request needs " + std::to_string(need) + " tokens (" +
                          std::to_string(params.promptTokens.size()) + " in the prompt + " +
                          std::to_string(params.maxTokens) +
                          " max tokens); the maximum context is " +
                          std::to_string(maxContextTokens()) + " tokens");
  }
  std::lock_guard lock(mu_);
  if (stopping_ || draining_) throw EngineError(Kind::ShuttingDown, "the server is shutting down");
  if (static_cast<int32_t>(incoming_.size()) + stats_.waiting >= config_.maxQueuedRequests) {
    throw EngineError(Kind::QueueFull, "too many requests are waiting (" +
                                           std::to_string(config_.maxQueuedRequests) +
                                           "); retry later");
  }
  auto r = std::make_unique<Request>(nextId_++, std::move(params), tokenizer_, vocab);
  std::shared_ptr<RequestStream> stream = r->stream;
  incoming_.push_back(std::move(r));
  wake_.notify_all();
  return stream;
}

void Engine::drain() {
  std::lock_guard lock(mu_);
  draining_ = true;
}

bool Engine::idle() const {
  std::lock_guard lock(mu_);
  return draining_ && incoming_.empty() && stats_.waiting == 0 && stats_.running == 0;
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
  std::lock_guard lock(mu_);
  while (!incoming_.empty()) {
    waiting_.push_back(std::move(incoming_.front()));
    incoming_.pop_front();
  }
}

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (stopping_) return;
    }
    admitNewRequests();
    if (!step()) {
      std::unique_lock lock(mu_);
      wake_.wait_for(lock, std::chrono::milliseconds(20),
                     [&] { return stopping_ || !incoming_.empty(); });
    }
  }
}

void Engine::finish(Request& r, FinishReason reason, const std::string& error) {
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
  e.promptTokens = static_cast<int32_t>(r.params.promptTokens.size());
  e.completionTokens = static_cast<int32_t>(r.generated.size());
  if (r.params.promptLogprobs && !r.promptLogprobs.empty()) e.promptLogprobs = std::move(r.promptLogprobs);
  if (r.inCache) {
    cache_->freeFor(r.id);
    r.inCache = false;
  }
  r.state = RequestState::Finished;
  {
    // Counted before the event goes out, so a client that sees it also sees it counted.
    std::lock_guard lock(mu_);
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

void Engine::preempt(Request& r) {
  cache_->freeFor(r.id);
  r.inCache = false;
  r.computed = 0;
  r.state = RequestState::Waiting;
  if (!r.promptLogprobsDone) r.promptLogprobs.clear();  // recomputed from the start
  std::lock_guard lock(mu_);
  ++stats_.preemptions;
}

void Engine::emitToken(Request& r, int32_t token, const std::vector<float>* logprobs) {
  RequestEvent e;
  if (logprobs) e.logprobs.push_back(tokenLogprob(*logprobs, token, r.params.topLogprobs));
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
  if (r.generated.size() == 1 && r.params.promptLogprobs) {
    e.promptLogprobs = std::move(r.promptLogprobs);
    r.promptLogprobs.clear();
  }
  e.promptTokens = static_cast<int32_t>(r.params.promptTokens.size());
  e.completionTokens = static_cast<int32_t>(r.generated.size());
  std::optional<FinishReason> done;
  if (!r.params.ignoreEos && tokenizer_.isEndOfGeneration(token)) {
    done = FinishReason::Stop;
  } else {
    e.text = r.stops.push(r.decoder.push(token));
    if (r.stops.stopped()) {
      done = FinishReason::Stop;
    } else if (static_cast<int32_t>(r.generated.size()) >= r.params.maxTokens ||
               r.contextTokens() >= maxContextTokens()) {
      done = FinishReason::Length;
    }
  }
  r.stream->push(std::move(e));
  if (done) finish(r, *done);
}

bool Engine::step() {
  // Cancelled requests leave first, freeing their blocks for this step.
  auto dropCancelled = [&](auto& list) {
    for (auto& r : list) {
      if (r && r->cancelRequested()) {
        finish(*r, FinishReason::Cancelled);
        r.reset();
      }
    }
    std::erase(list, nullptr);
  };
  dropCancelled(running_);
  dropCancelled(waiting_);
  if (running_.empty() && waiting_.empty()) {
    std::lock_guard lock(mu_);
    stats_.running = 0;
    stats_.waiting = 0;
    return false;
  }

  const int32_t B = cache_->blockSizeTokens();
  // note: like vLLM, keep ~1% of blocks back when admitting so running requests can grow.
  const int32_t watermark = std::max(1, cache_->numBlocks() / 100);
  std::vector<Request*> batch;
  std::vector<int32_t> counts;
  for (;;) {
    batch.clear();
    counts.clear();
    int32_t budget = config_.maxBatchedTokens;
    // 1. Decodes (one token each), oldest first; preempt the newest when the pool is dry.
    for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
      Request& r = *running_[i];
      if (r.contextTokens() - r.computed != 1) continue;
      bool preemptedSelf = false;
      while (cache_->blocksNeededToAppend(r.id, 1) > cache_->freeBlocks()) {
        Request& victim = *running_.back();
        preempt(victim);
        std::unique_ptr<Request> moved = std::move(running_.back());
        running_.pop_back();
        waiting_.push_front(std::move(moved));
        if (&victim == &r) {
          preemptedSelf = true;
          break;
        }
      }
      if (preemptedSelf) break;
      cache_->appendToken(r.id);
      batch.push_back(&r);
      counts.push_back(1);
      --budget;
    }
    // 2. Prefill chunks of admitted requests, then admit waiting ones in order (no overtaking).
    for (auto& rp : running_) {
      Request& r = *rp;
      const int32_t pending = r.contextTokens() - r.computed;
      if (pending <= 1 || budget == 0) continue;
      // Room in blocks: the free ones plus what is left in the last block.
      const int64_t room = static_cast<int64_t>(cache_->freeBlocks()) * B +
                           (r.computed % B ? B - r.computed % B : 0);
      const int32_t n = static_cast<int32_t>(std::min<int64_t>({pending, budget, room}));
      if (n <= 0) continue;
      cache_->appendTokens(r.id, n);
      batch.push_back(&r);
      counts.push_back(n);
      budget -= n;
    }
    while (!waiting_.empty() && budget > 0 &&
           static_cast<int32_t>(running_.size()) < config_.maxNumSeqs) {
      Request& r = *waiting_.front();
      const int32_t n = std::min(r.contextTokens(), budget);
      if (cache_->blocksForTokens(n) + watermark > cache_->freeBlocks() && !running_.empty()) {
        break;
      }
      if (cache_->blocksForTokens(n) > cache_->freeBlocks()) break;
      cache_->allocateFor(r.id, n);
      r.inCache = true;
      r.computed = 0;
      r.state = RequestState::Prefilling;
      batch.push_back(&r);
      counts.push_back(n);
      budget -= n;
      running_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
    if (!batch.empty() || running_.empty()) break;
    // Nothing could run (prefills waiting for blocks held by each other): free the newest.
    Request& victim = *running_.back();
    preempt(victim);
    std::unique_ptr<Request> moved = std::move(running_.back());
    running_.pop_back();
    waiting_.push_front(std::move(moved));
  }
  {
    std::lock_guard lock(mu_);
    stats_.running = static_cast<int32_t>(running_.size());
    stats_.waiting = static_cast<int32_t>(waiting_.size());
  }
  if (batch.empty()) return false;

  // Build the model batch.
  std::vector<model::BatchSequence> seqs;
  seqs.reserve(batch.size());
  uint64_t promptTokensThisStep = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    Request& r = *batch[i];
    r.batchTokens.resize(static_cast<size_t>(counts[i]));
    for (int32_t j = 0; j < counts[i]; ++j) r.batchTokens[static_cast<size_t>(j)] = r.token(r.computed + j);
    const bool wantPromptLogprobs = r.params.promptLogprobs && !r.promptLogprobsDone;
    seqs.push_back({r.id, r.batchTokens, r.computed, wantPromptLogprobs});
    if (counts[i] > 1 || r.generated.empty()) promptTokensThisStep += static_cast<uint64_t>(counts[i]);
  }
  try {
    model_.forward(seqs, *cache_, logits_);
  } catch (const std::exception& e) {
    for (Request* r : batch) finish(*r, FinishReason::Error, e.what());
    std::erase_if(running_, [](const auto& r) { return r->state == RequestState::Finished; });
    return true;
  }
  {
    std::lock_guard lock(mu_);
    ++stats_.steps;
    stats_.promptTokens += promptTokensThisStep;
  }

  // Consume the logits rows in batch order.
  const int32_t V = model_.hparams().nVocab;
  size_t row = 0;
  std::vector<float> lp;
  for (size_t i = 0; i < batch.size(); ++i) {
    Request& r = *batch[i];
    const int32_t n = counts[i];
    const int32_t first = r.computed;
    const size_t rows = seqs[i].allLogits ? static_cast<size_t>(n) : 1;
    if (seqs[i].allLogits) {
      // Row j predicts position first + j + 1.
      const int32_t P = static_cast<int32_t>(r.params.promptTokens.size());
      if (first == 0) r.promptLogprobs.push_back({r.params.promptTokens[0], NAN, {}});
      for (int32_t j = 0; j < n; ++j) {
        const int32_t target = first + j + 1;
        if (target >= P) break;
        logSoftmax(logits_.data() + (row + static_cast<size_t>(j)) * static_cast<size_t>(V), V, lp);
        r.promptLogprobs.push_back(
            tokenLogprob(lp, r.params.promptTokens[static_cast<size_t>(target)],
                         std::max(0, r.params.topLogprobs)));
      }
      if (first + n >= P) r.promptLogprobsDone = true;
    }
    r.computed += n;
    float* last = logits_.data() + (row + rows - 1) * static_cast<size_t>(V);
    row += rows;
    if (r.computed == r.contextTokens()) {
      r.state = RequestState::Decoding;
      // Logprobs report the model's distribution: taken before the sampler's penalties.
      if (r.params.topLogprobs >= 0) logSoftmax(last, V, lp);
      const int32_t token = r.sampler.sample(last);
      emitToken(r, token, r.params.topLogprobs >= 0 ? &lp : nullptr);
    }
  }
  std::erase_if(running_, [](const auto& r) { return r->state == RequestState::Finished; });
  {
    std::lock_guard lock(mu_);
    stats_.running = static_cast<int32_t>(running_.size());
    stats_.waiting = static_cast<int32_t>(waiting_.size());
  }
  return true;
}

}  // namespace cortex::engine
