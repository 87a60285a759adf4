#include "engine/engine.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>

#include "engine/stop_matcher.h"
#include "kernels/ops.h"
#include "kvtier/disk_store.h"
#include "kvtier/redis_store.h"

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

const char* toString(PreemptionMode mode) {
  return mode == PreemptionMode::Recompute ? "recompute" : "swap";
}

PreemptionMode parsePreemptionMode(const std::string& name) {
  if (name == "recompute") return PreemptionMode::Recompute;
  if (name == "swap") return PreemptionMode::Swap;
  throw std::invalid_argument("unknown preemption mode '" + name + "' (choose recompute or swap)");
}

void Histogram::observe(double value) {
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (value <= bounds[i]) ++counts[i];
  }
  ++counts.back();  // +Inf
  sum += value;
  ++count;
}

kv::KVCacheConfig kvCacheConfigFor(const model::TransformerModel& model, const EngineConfig& config,
                                   uint64_t bytes) {
  kv::KVCacheConfig c = model.kvCacheConfig(config.blockSizeTokens, bytes, config.kvDtype);
  c.prefixCaching = config.prefixCaching;
  c.hybrid = config.hybridKv;
  c.maxMemoryBytes = config.kvCacheMaxBytes;
  return c;
}

uint64_t kvBytesForSequences(const model::TransformerModel& model, const EngineConfig& config,
                             int64_t tokens, int64_t numSeqs) {
  return kv::bytesForSequence(kvCacheConfigFor(model, config, 1), tokens,
                              config.maxBatchedTokens) *
         static_cast<uint64_t>(numSeqs);
}

uint64_t defaultKvCacheBytes(const model::TransformerModel& model, const EngineConfig& config) {
  const uint64_t oneContext = kvBytesForSequences(model, config, model.hparams().nCtxTrain, 1);
  const uint64_t share = std::min<uint64_t>(memAvailableBytes() / 4, 4ull << 30);
  return std::max(share, oneContext);
}

// ---------------------------------------------------------------------------------------------

void RequestStream::push(RequestEvent event) {
  {
    std::lock_guard lock(mu_);
    events_.push_back(std::move(event));
    if (notify_) notify_();
  }
  cv_.notify_all();
}

void RequestStream::setNotify(std::function<void()> notify) {
  std::lock_guard lock(mu_);
  notify_ = std::move(notify);
}

std::optional<RequestEvent> RequestStream::next(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  if (closed_) return std::nullopt;
  if (!cv_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
  RequestEvent e = std::move(events_.front());
  events_.pop_front();
  if (e.finished && --openChoices_ == 0) closed_ = true;
  return e;
}

void RequestStream::cancel() {
  std::lock_guard lock(mu_);
  cancelRequested_ = true;
}

// ---------------------------------------------------------------------------------------------

// What the choices of one request share: the client's stream and, for best_of, the finished
// candidates waiting for the others.
struct Engine::Group {
  std::shared_ptr<RequestStream> stream;
  int32_t n = 1;           // choices returned
  int32_t candidates = 1;  // choices generated (best_of)
  int32_t unfinished = 1;
  int32_t cachedTokens = 0;
  bool buffered() const { return candidates > n; }
  struct Candidate {
    double cumulativeLogprob = 0;
    int32_t index = 0;
    RequestEvent event;  // everything the candidate produced, finished
  };
  std::vector<Candidate> done;
};

namespace {

SamplingParams choiceSampling(SamplingParams s, int32_t index) {
  s.seed += static_cast<uint64_t>(index);  // each choice its own random stream
  return s;
}

}  // namespace

struct Engine::Request {
  Request(uint64_t id_, RequestParams p, std::shared_ptr<Group> g, int32_t index_,
          const model::Tokenizer& tok, int32_t vocab)
      : id(id_),
        index(index_),
        params(std::move(p)),
        group(std::move(g)),
        sampler(choiceSampling(params.sampling, index_), vocab, params.promptTokens),
        decoder(tok, !params.skipSpecialTokens),
        stops(params.stop),
        context(params.promptTokens) {}

  int32_t promptSize() const { return static_cast<int32_t>(params.promptTokens.size()); }
  int32_t contextTokens() const { return static_cast<int32_t>(context.size()); }
  int32_t generatedTokens() const { return contextTokens() - promptSize(); }
  // The context's tokens [first, first + n): prompt, then generated tokens.
  void tokens(int32_t first, int32_t n, std::vector<int32_t>& out) const {
    out.assign(context.begin() + first, context.begin() + first + n);
  }
  // Logits for every new prompt position (prompt logprobs, or raw rows for returnLogits) until
  // the whole prompt has been seen once.
  bool wantsPromptRows() const {
    return (params.promptLogprobs || params.returnLogits) && !promptRowsDone;
  }
  bool cancelRequested() {
    // note: a stream nobody holds any more (the client went away) counts as cancelled.
    RequestStream& stream = *group->stream;
    if (group->stream.use_count() == 1) return true;
    std::lock_guard lock(stream.mu_);
    return stream.cancelRequested_;
  }
  // Sends an event of this choice (held back until the end for best_of candidates).
  void send(RequestEvent e) {
    e.index = index;
    e.cachedTokens = group->cachedTokens;
    if (!group->buffered()) {
      group->stream->push(std::move(e));
      return;
    }
    held.text += e.text;
    held.tokens.insert(held.tokens.end(), e.tokens.begin(), e.tokens.end());
    for (auto& l : e.logprobs) held.logprobs.push_back(std::move(l));
    if (!e.promptLogprobs.empty()) held.promptLogprobs = std::move(e.promptLogprobs);
    if (!e.promptLogits.empty()) held.promptLogits = std::move(e.promptLogits);
    held.logits.insert(held.logits.end(), e.logits.begin(), e.logits.end());
    held.finished = e.finished;
    held.finishReason = e.finishReason;
    held.error = e.error;
    held.promptTokens = e.promptTokens;
    held.completionTokens = e.completionTokens;
  }

  uint64_t id;
  int32_t index;  // the choice
  RequestParams params;
  std::shared_ptr<Group> group;
  Sampler sampler;
  model::StreamDecoder decoder;
  StopMatcher stops;
  std::vector<int32_t> context;    // prompt, then generated tokens (the scheduler reads it)
  bool forked = false;             // choice 0 of n > 1: the other choices exist
  int32_t cachedTokens = -1;       // prompt tokens its first admission found cached
  double cumulativeLogprob = 0;    // of the sampled tokens (best_of)
  RequestEvent held;               // best_of: the events so far, merged
  bool running = false;  // admitted by the scheduler (not waiting)
  bool finished = false;
  std::vector<TokenLogprob> promptLogprobs;
  std::vector<float> promptLogits;
  bool promptRowsDone = false;
  std::vector<kvtier::TierHit> tierHits;  // prompt tokens loaded from tiers below the pool
  Clock::time_point submitted = Clock::now();
  Clock::time_point lastToken;
};

Engine::Engine(model::TransformerModel& model, const model::Tokenizer& tokenizer,
               const EngineConfig& config, EngineHooks hooks)
    : model_(model), tokenizer_(tokenizer), config_(config), hooks_(std::move(hooks)) {
  using Kind = EngineError::Kind;
  if (config_.maxBatchedTokens < 1 || config_.maxNumSeqs < 1 || config_.maxQueuedRequests < 1 ||
      config_.maxModelLen < 0) {
    throw EngineError(Kind::InvalidRequest,
                      "max batched tokens, max sequences and max queue must be >= 1, max model "
                      "length >= 0");
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
  cache_ = std::make_unique<kv::KVCache>(kvCacheConfigFor(model_, config_, bytes));
  // The MLX backend keeps K/V in its own arrays: the cache's arena is never touched (so its
  // pages are never committed).
  if (config_.backend == Backend::Cpu) cache_->warmup();
  cache_->recordEvents(static_cast<bool>(config_.kvEventListener));
  budget_ = std::make_unique<PagedBlockBudget>(*cache_);
  SchedulerConfig sc;
  sc.maxBatchedTokens = config_.maxBatchedTokens;
  sc.maxNumSeqs = config_.maxNumSeqs;
  sc.policy = config_.schedulePolicy;
  scheduler_ = std::make_unique<Scheduler>(sc, *budget_);
  try {
    runner_ = std::make_unique<ModelRunner>(model_, *cache_, config_.numThreads, config_.backend);
  } catch (const model::ModelError& e) {
    throw EngineError(Kind::InvalidRequest, e.what());
  }
  if (config_.preemptionMode == PreemptionMode::Swap && config_.kvTiers.diskDir.empty()) {
    throw EngineError(Kind::InvalidRequest,
                      "swap preemption writes preempted requests' blocks to the disk tier: it "
                      "needs one (a KV offload folder)");
  }
  if (config_.kvTiers.enabled()) startTiers();
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
  resized_.notify_all();
  thread_.join();
  tiers_.reset();  // its worker signals through mu_ and wake_
  for (auto& r : incoming_) finish(*r, FinishReason::Cancelled);
  for (auto& l : loading_) finish(*l.request, FinishReason::Cancelled);
  for (auto& r : swapped_) finish(*r, FinishReason::Cancelled);
  for (auto& r : deferred_) finish(*r, FinishReason::Cancelled);
  for (auto& [id, r] : requests_) finish(*r, FinishReason::Cancelled);
}

void Engine::startTiers() {
  using Kind = EngineError::Kind;
  const KVTierConfig& t = config_.kvTiers;
  if (config_.backend != Backend::Cpu) {
    throw EngineError(Kind::InvalidRequest,
                      std::string("KV tiers (disk, Redis) need the cpu backend (this engine runs ") +
                          toString(config_.backend) + ")");
  }
  if (!config_.prefixCaching) {
    throw EngineError(Kind::InvalidRequest,
                      "KV tiers (disk, Redis) keep cached prefix blocks: prefix caching must be on");
  }
  char ns[17];
  std::snprintf(ns, sizeof ns, "%016llx", static_cast<unsigned long long>(cache_->hashRoot()));
  std::vector<std::unique_ptr<kvtier::BlockStore>> stores;
  try {
    if (!t.diskDir.empty()) {
      stores.push_back(std::make_unique<kvtier::DiskStore>(t.diskDir, t.diskBytes, ns));
    }
    if (!t.redisUrl.empty()) {
      kvtier::RedisOptions ro;
      ro.url = t.redisUrl;
      ro.keyPrefix = t.redisKeyPrefix;
      ro.ttlSeconds = t.redisTtlSeconds;
      stores.push_back(std::make_unique<kvtier::RedisStore>(ro, ns));
    }
  } catch (const std::exception& e) {
    throw EngineError(Kind::InvalidRequest, std::string("KV tier: ") + e.what());
  }
  kvtier::KVTiers::Options options;
  options.onLoadDone = [this] {
    {
      std::lock_guard lock(mu_);
      loadsDone_ = true;
    }
    wake_.notify_all();
  };
  tiers_ = std::make_unique<kvtier::KVTiers>(*cache_, std::move(stores), std::move(options));
  stats_.tierHitTokens.assign(tiers_->stats().tiers.size(), 0);
}

void Engine::flushKVTiers() {
  if (tiers_) tiers_->flush();
}

int32_t Engine::resetPrefixCache() { return cache_->resetPrefixCache(); }

int32_t Engine::saveSession(std::span<const int32_t> tokens, std::string_view metadata,
                            const std::string& path) {
  requireSessionsSupported();
  const std::string tmp = path + ".tmp";
  int32_t saved = 0;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + tmp + ": " + std::strerror(errno));
    try {
      saved = cache_->saveSession(tokens, metadata, out);
    } catch (const kv::KVError& e) {
      out.close();
      std::remove(tmp.c_str());
      throw EngineError(EngineError::Kind::InvalidRequest, e.what());
    }
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      throw std::runtime_error("cannot write " + tmp);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot rename " + tmp + " to " + path + ": " + why);
  }
  return saved;
}

void Engine::requireSessionsSupported() const {
  if (config_.backend != Backend::Cpu) {
    throw EngineError(EngineError::Kind::InvalidRequest,
                      std::string("KV sessions need the cpu backend (this engine runs ") +
                          toString(config_.backend) + ")");
  }
}

kv::KVCache::LoadedSession Engine::loadSession(const std::string& path) {
  requireSessionsSupported();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path + ": " + std::strerror(errno));
  try {
    return cache_->loadSession(in);
  } catch (const kv::KVError& e) {
    throw EngineError(EngineError::Kind::InvalidRequest, path + ": " + e.what());
  }
}

int32_t Engine::positionLimit() const {
  const int32_t ctx = model_.hparams().nCtxTrain;
  return config_.maxModelLen > 0 ? std::min(config_.maxModelLen, ctx) : ctx;
}

int32_t Engine::maxContextTokens() const {
  return static_cast<int32_t>(std::min<int64_t>(positionLimit(), scheduler_->maxContextTokens()));
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
  if (params.n < 1 || params.n > kMaxChoices) {
    throw EngineError(Kind::InvalidRequest,
                      "n must be in [1, " + std::to_string(kMaxChoices) + "], got " +
                          std::to_string(params.n),
                      "n");
  }
  if (params.bestOf == 0) params.bestOf = params.n;
  if (params.bestOf < params.n || params.bestOf > kMaxChoices) {
    throw EngineError(Kind::InvalidRequest,
                      "best_of must be in [n, " + std::to_string(kMaxChoices) + "] (n is " +
                          std::to_string(params.n) + "), got " + std::to_string(params.bestOf),
                      "best_of");
  }
  const int64_t prompt = static_cast<int64_t>(params.promptTokens.size());
  const bool windowed = params.kvWindow != 0 || params.kvSinks != 0;
  if (windowed) checkWindow(params);
  std::unique_lock lock(mu_);
  if (windowed) {
    if (prompt + params.maxTokens > kMaxWindowedTokens) {
      throw EngineError(Kind::TooLong,
                        "a windowed request may run " + std::to_string(kMaxWindowedTokens) +
                            " tokens at most (prompt + max_tokens), not " +
                            std::to_string(prompt + params.maxTokens),
                        "max_tokens");
    }
  } else if (prompt + params.maxTokens > std::min<int64_t>(maxContextTokens(), acceptCap_)) {
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
  if (stopping_ || draining_) throw EngineError(Kind::ShuttingDown, "the server is shutting down");
  if (queued_ >= config_.maxQueuedRequests) {
    throw EngineError(Kind::QueueFull, "too many requests are waiting (" +
                                           std::to_string(config_.maxQueuedRequests) +
                                           "); retry later");
  }
  const uint64_t id = nextId_++;
  auto group = std::make_shared<Group>();
  group->stream.reset(new RequestStream(id, params.n));
  group->n = params.n;
  group->candidates = params.bestOf;
  group->unfinished = params.bestOf;
  std::shared_ptr<RequestStream> stream = group->stream;
  auto r = std::make_unique<Request>(id, std::move(params), std::move(group), 0, tokenizer_, vocab);
  incoming_.push_back(std::move(r));
  ++queued_;
  stats_.waiting = queued_;
  wake_.notify_all();
  return stream;
}

void Engine::checkWindow(const RequestParams& p) const {
  using Kind = EngineError::Kind;
  const kv::SeqWindow win{p.kvWindow, p.kvSinks};
  if (p.kvWindow <= 0) {
    throw EngineError(Kind::InvalidRequest,
                      "kv_window must be >= 1 (tokens kept), got " + std::to_string(p.kvWindow) +
                          (p.kvSinks != 0 ? " (kv_sinks needs kv_window)" : ""),
                      "kv_window");
  }
  if (p.kvSinks < 0) {
    throw EngineError(Kind::InvalidRequest,
                      "kv_sinks must be >= 0, got " + std::to_string(p.kvSinks), "kv_sinks");
  }
  if (config_.backend != Backend::Cpu) {
    throw EngineError(Kind::InvalidRequest,
                      std::string("kv_window needs the cpu backend (this engine runs ") +
                          toString(config_.backend) + ")",
                      "kv_window");
  }
  if (p.n != 1 || p.bestOf > 1) {
    throw EngineError(Kind::InvalidRequest, "kv_window does not combine with n > 1 or best_of",
                      "kv_window");
  }
  // The window must move back wholly past the blocks a full-attention request could share
  // (those before sinks + window) and past every sliding layer's window: sinks + window + the
  // widest window + two blocks of room.
  int32_t widest = p.kvWindow;
  for (const kv::KVGroup& g : cache_->groups().groups) widest = std::max(widest, g.window);
  const int64_t need =
      int64_t{p.kvSinks} + p.kvWindow + widest + 2 * int64_t{config_.blockSizeTokens};
  if (need > positionLimit()) {
    throw EngineError(Kind::InvalidRequest,
                      "kv_sinks + kv_window + the widest window (" + std::to_string(p.kvSinks) +
                          " + " + std::to_string(p.kvWindow) + " + " + std::to_string(widest) +
                          ") must leave two blocks of the " + std::to_string(positionLimit()) +
                          "-token context (" + std::to_string(need) + " needed)",
                      "kv_window");
  }
  const int64_t blocks = kv::blocksForWindowedSequence(
      cache_->config(), win, std::min(config_.maxBatchedTokens, p.kvWindow));
  if (blocks > cache_->numBlocks()) {
    throw EngineError(Kind::TooLong,
                      "a window of " + std::to_string(p.kvWindow) + " tokens and " +
                          std::to_string(p.kvSinks) + " sinks needs " + std::to_string(blocks) +
                          " KV blocks; the pool has " + std::to_string(cache_->numBlocks()),
                      "kv_window");
  }
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
  if (tiers_) s.tiers = tiers_->stats();
  return s;
}

void Engine::admitNewRequests() {
  std::deque<std::unique_ptr<Request>> arrived;
  {
    std::lock_guard lock(mu_);
    arrived.swap(incoming_);
  }
  dropCancelledWaiting();
  pollLoads();
  resumeSwapped();
  for (auto& r : arrived) deferred_.push_back(std::move(r));
  // Swapped-out requests resume before later arrivals take their room.
  if (!swapped_.empty() || resuming()) {
    updateTierCounts();
    return;
  }
  arrived.clear();
  arrived.swap(deferred_);
  const int32_t B = config_.blockSizeTokens;
  for (auto& r : arrived) {
    // A prompt whose blocks beyond the pool's hit a tier might hold waits while they load (the
    // last prompt token is always computed, for its logits).
    if (tiers_ && !r->wantsPromptRows() && r->params.kvWindow == 0) {
      const int32_t firstBlock = cache_->cachedPrefixTokens(r->context) / B;
      const int32_t endBlock = (r->promptSize() - 1) / B;
      if (endBlock > firstBlock) {
        try {
          const kvtier::KVTiers::Ticket ticket = tiers_->startLoad(r->context, firstBlock, endBlock);
          loading_.push_back({std::move(r), ticket});
          continue;
        } catch (const std::exception&) {
          // note: only allocation can fail here; the request computes its prompt instead.
        }
      }
    }
    enqueue(std::move(r));
  }
  updateTierCounts();
}

void Engine::notePreempted(const std::vector<kv::SeqId>& preempted) {
  if (preempted.empty()) return;
  {
    std::lock_guard lock(mu_);
    stats_.preemptions += preempted.size();
    for (kv::SeqId id : preempted) {
      Request& r = *requests_.at(id);
      r.running = false;
      ++queued_;
      if (!r.promptRowsDone) {  // recomputed from the start
        r.promptLogprobs.clear();
        r.promptLogits.clear();
      }
    }
  }
  if (config_.preemptionMode == PreemptionMode::Swap) {
    for (kv::SeqId id : preempted) swapOut(id);
    updateTierCounts();
  }
}

KvResize Engine::resizeKvCache(uint64_t bytes) {
  auto job = std::make_shared<ResizeJob>();
  job->bytes = bytes;
  std::unique_lock lock(mu_);
  if (stopping_) throw EngineError(EngineError::Kind::ShuttingDown, "the server is shutting down");
  resizes_.push_back(job);
  wake_.notify_all();
  resized_.wait(lock, [&] { return job->done || stopping_; });
  if (!job->done) throw EngineError(EngineError::Kind::ShuttingDown, "the server is shutting down");
  if (!job->error.empty()) throw EngineError(EngineError::Kind::InvalidRequest, job->error);
  return job->result;
}

void Engine::runResizes() {
  for (;;) {
    std::shared_ptr<ResizeJob> job;
    {
      std::lock_guard lock(mu_);
      if (resizes_.empty()) return;
      job = resizes_.front();
      resizes_.pop_front();
    }
    KvResize result;
    std::string error;
    try {
      result = resizeOnLoop(job->bytes);
    } catch (const EngineError& e) {
      error = e.what();
    } catch (const kv::KVError& e) {
      error = std::string("cannot resize the KV cache: ") + e.what();
    }
    {
      std::lock_guard lock(mu_);
      acceptCap_ = INT64_MAX;
      job->result = result;
      job->error = error;
      job->done = true;
      stats_.running = scheduler_->numRunning();
      stats_.waiting = queued_;
    }
    resized_.notify_all();
  }
}

int64_t Engine::longestAccepted() const {
  int64_t longest = 0;
  auto note = [&](const Request& r) {
    // A windowed request holds about what a full-attention one of sinks + window + a step does.
    const int64_t bound = r.params.kvWindow > 0
                              ? int64_t{r.params.kvSinks} + r.params.kvWindow +
                                    config_.maxBatchedTokens + 2 * int64_t{config_.blockSizeTokens}
                              : INT64_MAX;
    longest = std::max<int64_t>(longest,
                                std::min(bound, r.promptSize() + int64_t{r.params.maxTokens}));
  };
  for (const auto& [id, r] : requests_) note(*r);
  for (const auto& l : loading_) note(*l.request);
  for (const auto& r : swapped_) note(*r);
  for (const auto& r : deferred_) note(*r);
  for (const auto& r : incoming_) note(*r);  // the caller holds mu_
  return longest;
}

KvResize Engine::resizeOnLoop(uint64_t bytes) {
  using Kind = EngineError::Kind;
  const uint64_t perBlock = cache_->bytesPerBlock();
  const uint64_t maxBytes = static_cast<uint64_t>(cache_->capacityBlocks()) * perBlock;
  if (bytes < perBlock || bytes / perBlock > static_cast<uint64_t>(cache_->capacityBlocks())) {
    throw EngineError(Kind::InvalidRequest,
                      "the KV cache can be " + std::to_string(perBlock) + " to " +
                          std::to_string(maxBytes) + " bytes (one block to the maximum it was "
                          "started with), not " + std::to_string(bytes));
  }
  const auto blocks = static_cast<int32_t>(bytes / perBlock);
  const int64_t newMax = std::min<int64_t>(
      model_.hparams().nCtxTrain, cache_->maxSequenceTokensFor(blocks, config_.maxBatchedTokens));
  {
    std::lock_guard lock(mu_);
    const int64_t longest = longestAccepted();
    if (longest > newMax) {
      throw EngineError(Kind::InvalidRequest,
                        "a KV cache of " + std::to_string(blocks) + " blocks holds " +
                            std::to_string(newMax) + " tokens per request, and a request "
                            "already accepted may need " + std::to_string(longest));
    }
    acceptCap_ = newMax;  // until the scheduler knows the new size
  }
  KvResize r;
  std::vector<kv::SeqId> preempted;
  while (cache_->stats().usedBlocks > blocks && scheduler_->freeSomeMemory(preempted)) {
  }
  r.preempted = static_cast<int32_t>(preempted.size());
  notePreempted(preempted);
  r.movedBlocks = cache_->resize(blocks);
  scheduler_->memoryResized();
  r.blocks = blocks;
  r.bytes = static_cast<uint64_t>(blocks) * perBlock;
  r.maxBytes = maxBytes;
  return r;
}

void Engine::updateTierCounts() {
  std::lock_guard lock(mu_);
  stats_.loading = 0;
  stats_.swapped = static_cast<int32_t>(swapped_.size());
  for (const Loading& l : loading_) ++(l.resume ? stats_.swapped : stats_.loading);
}

void Engine::dropCancelledWaiting() {
  for (auto* q : {&swapped_, &deferred_}) {
    for (auto it = q->begin(); it != q->end();) {
      if ((*it)->cancelRequested()) {
        finish(**it, FinishReason::Cancelled);
        it = q->erase(it);
      } else {
        ++it;
      }
    }
  }
}

void Engine::swapOut(kv::SeqId seq) {
  auto it = requests_.find(seq);
  if (it == requests_.end() || scheduler_->isRunning(seq) || it->second->wantsPromptRows() ||
      it->second->params.kvWindow > 0) {
    // Readmitted in the same plan, or recomputed anyway (it wants every prompt row, or its
    // window's blocks are not kept by any tier).
    return;
  }
  scheduler_->remove(seq);
  swapped_.push_back(std::move(it->second));
  requests_.erase(it);
}

bool Engine::resuming() const {
  return std::any_of(loading_.begin(), loading_.end(), [](const Loading& l) { return l.resume; });
}

void Engine::resumeSwapped() {
  if (swapped_.empty() || resuming()) return;
  Request& r = *swapped_.front();
  // Room for its whole context and the next token, or nothing else running: read it back now,
  // so that what is loaded is admitted before anything evicts it.
  const int64_t need = cache_->blocksForSequence(r.contextTokens() + 1, config_.maxBatchedTokens);
  if (scheduler_->numRunning() > 0 && cache_->freeBlocks() < need + 1) return;
  std::unique_ptr<Request> req = std::move(swapped_.front());
  swapped_.pop_front();
  const int32_t B = config_.blockSizeTokens;
  const int32_t firstBlock = cache_->cachedPrefixTokens(req->context) / B;
  const int32_t endBlock = (req->contextTokens() - 1) / B;
  if (endBlock > firstBlock) {
    const kvtier::KVTiers::Ticket ticket =
        tiers_->startLoad(req->context, firstBlock, endBlock, /*afterStores=*/true);
    loading_.push_back({std::move(req), ticket, true});
    return;
  }
  enqueue(std::move(req), /*front=*/true);
}

void Engine::pollLoads() {
  {
    std::lock_guard lock(mu_);
    loadsDone_ = false;
  }
  for (size_t i = 0; i < loading_.size();) {
    Loading& l = loading_[i];
    if (l.request->cancelRequested()) {
      tiers_->cancelLoad(l.ticket);
      finish(*l.request, FinishReason::Cancelled);
    } else if (tiers_->finishLoad(l.ticket, l.request->tierHits)) {
      enqueue(std::move(l.request), l.resume);
    } else {
      ++i;
      continue;
    }
    loading_.erase(loading_.begin() + static_cast<long>(i));
  }
}

void Engine::enqueue(std::unique_ptr<Request> r, bool front) {
  const kv::SeqId id = r->id;
  try {
    // Requests that want every prompt row compute their whole prompt.
    const bool lookUp = cache_->prefixCaching() && !r->wantsPromptRows();
    const kv::SeqWindow win{r->params.kvWindow, r->params.kvSinks};
    scheduler_->add(id, r->contextTokens(),
                    win.on() ? positionLimit() : r->promptSize() + r->params.maxTokens,
                    lookUp ? &r->context : nullptr, front, win);
  } catch (const std::exception& e) {
    // submit() checked the size against the same limits; this is a safety net, not a path.
    finish(*r, FinishReason::Error, e.what());
    return;
  }
  requests_.emplace(id, std::move(r));
}

void Engine::publishKVEvents() {
  if (!config_.kvEventListener) return;
  cache_->takeEvents(kvEvents_);
  if (kvEvents_.empty()) return;
  std::vector<kv::KVEvent> batch;
  batch.swap(kvEvents_);
  config_.kvEventListener(std::move(batch));
}

void Engine::loop() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (stopping_) return;
    }
    bool worked = false;
    try {
      runResizes();
      admitNewRequests();
      worked = step();
      publishKVEvents();
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
      wake_.wait_for(lock, std::chrono::milliseconds(20), [&] {
        return stopping_ || !incoming_.empty() || loadsDone_ || !resizes_.empty();
      });
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
  e.completionTokens = r.generatedTokens();
  // A request that finishes without sampling (scoring) carries its prompt rows here.
  e.promptLogprobs = std::move(r.promptLogprobs);
  e.promptLogits = std::move(r.promptLogits);
  scheduler_->remove(r.id);  // its blocks go back to the pool (full ones stay cached)
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
  r.send(std::move(e));
  Group& g = *r.group;
  --g.unfinished;
  if (g.buffered()) {
    g.done.push_back({r.cumulativeLogprob, r.index, std::move(r.held)});
    if (g.unfinished == 0) finishBestOf(g);
  }
  // note: the other choices of an n > 1 request that was never forked (it ended before its
  // prompt was computed) will not come: their finished events are sent here.
  if (r.index == 0 && !r.forked) {
    for (int32_t i = 1; i < g.candidates; ++i) {
      RequestEvent c;
      c.index = i;
      c.finished = true;
      c.finishReason = reason;
      c.error = error;
      c.promptTokens = r.promptSize();
      --g.unfinished;
      if (g.buffered()) {
        g.done.push_back({-INFINITY, i, std::move(c)});
        if (g.unfinished == 0) finishBestOf(g);
      } else {
        g.stream->push(std::move(c));
      }
    }
  }
}

void Engine::finishBestOf(Group& g) {
  std::stable_sort(g.done.begin(), g.done.end(), [](const auto& a, const auto& b) {
    return a.cumulativeLogprob > b.cumulativeLogprob ||
           (a.cumulativeLogprob == b.cumulativeLogprob && a.index < b.index);
  });
  for (int32_t i = 0; i < g.n; ++i) {
    RequestEvent e = std::move(g.done[static_cast<size_t>(i)].event);
    e.index = i;
    e.finished = true;
    e.cachedTokens = g.cachedTokens;
    g.stream->push(std::move(e));
  }
  g.done.clear();
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
  if (r.params.topLogprobs >= 0 || r.group->buffered()) {
    std::vector<float> lp(static_cast<size_t>(V));
    kernels::logSoftmax(logits, V, lp.data());
    r.cumulativeLogprob += lp[static_cast<size_t>(token)];
    if (r.params.topLogprobs >= 0) e.logprobs.push_back(tokenLogprob(lp, token, r.params.topLogprobs));
  }
  if (r.params.returnLogits) e.logits.assign(logits, logits + V);
  r.sampler.accept(token);
  r.context.push_back(token);
  e.tokens.push_back(token);
  const Clock::time_point now = Clock::now();
  {
    std::lock_guard lock(mu_);
    ++stats_.generationTokens;
    if (r.generatedTokens() == 1) {
      if (r.index == 0) stats_.timeToFirstToken.observe(seconds(now - r.submitted));
    } else {
      stats_.timePerOutputToken.observe(seconds(now - r.lastToken));
    }
  }
  r.lastToken = now;
  if (r.generatedTokens() == 1) {
    e.promptLogprobs = std::move(r.promptLogprobs);
    e.promptLogits = std::move(r.promptLogits);
  }
  e.promptTokens = r.promptSize();
  e.completionTokens = r.generatedTokens();
  std::optional<FinishReason> done;
  if (!r.params.ignoreEos && tokenizer_.isEndOfGeneration(token)) {
    done = FinishReason::Stop;
  } else {
    e.text = r.stops.push(r.decoder.push(token));
    if (r.stops.stopped()) {
      done = FinishReason::Stop;
    } else if (r.generatedTokens() >= r.params.maxTokens) {
      done = FinishReason::Length;
    }
  }
  r.send(std::move(e));
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
  const int32_t first = chunk.firstPos + scheduler_->shiftedTokens(r.id);  // its context's index
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
  if (r.group->candidates > 1 && r.index == 0 && !r.forked) forkChoices(r, last);
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

void Engine::forkChoices(Request& r, const float* row) {
  r.forked = true;
  Group& g = *r.group;
  const int32_t V = model_.hparams().nVocab;
  const std::vector<float> original(row, row + V);  // the parent's sampler changes its row
  std::vector<float> sampleRow;
  for (int32_t i = 1; i < g.candidates; ++i) {
    RequestParams p = r.params;
    p.promptLogprobs = false;  // the prompt's rows go with choice 0
    uint64_t id = 0;
    {
      std::lock_guard lock(mu_);
      id = nextId_++;
      ++queued_;
    }
    auto child = std::make_unique<Request>(id, std::move(p), r.group, i, tokenizer_, V);
    child->promptRowsDone = true;
    child->forked = true;
    child->submitted = r.submitted;
    Request& c = *child;
    requests_.emplace(id, std::move(child));
    try {
      // The prompt's KV is shared, not copied: the first token each choice appends copies only
      // the partly filled last block.
      scheduler_->addFork(r.id, id, cache_->prefixCaching() ? &c.context : nullptr);
      if (hooks_.beforeSample) hooks_.beforeSample(id);
      sampleRow = original;
      emitToken(c, c.sampler.sample(sampleRow.data()), original.data());
    } catch (const std::exception& e) {
      finish(c, FinishReason::Error, std::string("forking choice ") + std::to_string(i) +
                                         " failed: " + e.what());
    }
  }
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

void Engine::shiftWindows() {
  std::vector<std::pair<kv::SeqId, std::string>> failed;
  for (const auto& [id, r] : requests_) {
    if (r->params.kvWindow == 0 || !scheduler_->atPositionLimit(id)) continue;
    try {
      const int32_t moved = runner_->shiftWindow(id);
      if (moved == 0) throw std::logic_error("its window cannot move back");
      scheduler_->shift(id, moved);
    } catch (const std::exception& e) {
      failed.emplace_back(id, std::string("moving the KV window failed: ") + e.what());
    }
  }
  for (const auto& [id, error] : failed) fail(id, error);  // (fail erases from requests_)
}

bool Engine::step() {
  dropCancelled();
  if (requests_.empty()) {
    updateCounts();
    return false;
  }
  shiftWindows();
  const StepPlan plan = scheduler_->schedule();
  notePreempted(plan.preempted);
  {
    std::lock_guard lock(mu_);
    for (const ScheduledChunk& c : plan.chunks) {
      Request& r = *requests_.at(c.seq);
      if (!r.running) {
        r.running = true;
        --queued_;
      }
      if (c.admitted && cache_->prefixCaching() && !r.wantsPromptRows()) {
        stats_.prefixCacheQueries += static_cast<uint64_t>(r.contextTokens());
        stats_.prefixCacheHits += static_cast<uint64_t>(c.firstPos);
        if (r.cachedTokens < 0) {
          r.cachedTokens = c.firstPos;
          if (r.index == 0) r.group->cachedTokens = c.firstPos;
        }
        for (const kvtier::TierHit& h : r.tierHits) {
          const int32_t served = std::min(h.firstToken + h.tokens, c.firstPos) - h.firstToken;
          if (served > 0) {
            stats_.tierHitTokens[static_cast<size_t>(h.tier)] += static_cast<uint64_t>(served);
          }
        }
        r.tierHits.clear();
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
    r.tokens(c.firstPos + scheduler_->shiftedTokens(c.seq), c.numTokens, tokens);
    runner_->add(c.seq, c.firstPos, tokens, r.wantsPromptRows(),
                 kv::SeqWindow{r.params.kvWindow, r.params.kvSinks});
    batch.push_back(c.seq);
    if (c.numTokens > 1 || r.generatedTokens() == 0) {
      promptTokensThisStep += static_cast<uint64_t>(c.numTokens);
    }
  }
  const Clock::time_point forwardStart = Clock::now();
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
  // The prefill rate the tiers weigh a load against: steps mostly of prompt tokens.
  if (tiers_ && promptTokensThisStep >= 64) {
    const double rate =
        static_cast<double>(promptTokensThisStep) / seconds(Clock::now() - forwardStart);
    prefillRate_ = prefillRate_ <= 0 ? rate : 0.8 * prefillRate_ + 0.2 * rate;
    tiers_->setRecomputeRate(prefillRate_);
  }
  // The step's K/V are written: their full blocks can be hit from now on (not before, or a request
  // admitted in the same step could read blocks still being computed).
  // Only chunks that fill a block have anything to register (1 decode step in 16).
  const int32_t B = config_.blockSizeTokens;
  for (const ScheduledChunk& c : plan.chunks) {
    const int32_t end = c.firstPos + c.numTokens;
    if (!cache_->prefixCaching() || end / B == c.firstPos / B ||
        scheduler_->shiftedTokens(c.seq) > 0) {
      continue;  // (a shifted window's positions are no longer its tokens' indices)
    }
    const Request& r = *requests_.at(c.seq);
    cache_->cacheComputedBlocks(
        c.seq, std::span<const int32_t>(r.context).first(static_cast<size_t>(end)));
  }
  if (tiers_) tiers_->storeNewBlocks();

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
