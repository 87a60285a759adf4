// The serving engine: requests with a lifecycle, continuous batching over the paged KV cache, and
// a stream of events per request. This is the C++ API for embedding CortexStream
// (examples/embed.cpp); the HTTP server, `generate`, `chat` and `perplexity` are its clients.
//
// One background thread runs the step loop: the Scheduler (scheduler.h) plans each step in blocks
// and tokens (decodes first, chunked prefill under a token budget, FCFS admission, preemption of
// the newest request when the pool runs dry: it is recomputed from prompt + tokens generated so
// far, and the tokens it already streamed are not re-sent), the ModelRunner resolves the plan's
// slots and block tables and runs the forward pass, and the engine samples, detokenizes and
// streams.
// Because every kernel is batch-invariant, a greedy request's output does not change under
// preemption or load.
//
// The engine owns request validation and the context-length policy (submit()), and it survives its
// own failures: an exception while planning, running, sampling or detokenizing ends the requests it
// concerns with FinishReason::Error and a message, and the others go on.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "engine/model_runner.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "kv/kv_cache.h"
#include "kv/kv_events.h"
#include "kvtier/kv_tiers.h"
#include "model/transformer.h"
#include "model/tokenizer.h"

namespace cortex::engine {

// Tiers below the KV pool (kvtier/kv_tiers.h): cached blocks are written through to them and read
// back for a prompt the pool no longer (or never) held. Either, both or none.
struct KVTierConfig {
  std::string diskDir;            // local disk tier's folder; empty: none
  uint64_t diskBytes = 8ull << 30;  // its capacity
  std::string redisUrl;           // redis://host:port[/db]; empty: none
  std::string redisKeyPrefix = "cortexstream";
  int64_t redisTtlSeconds = 3600;   // 0: records never expire
  bool enabled() const { return !diskDir.empty() || !redisUrl.empty(); }
};

// What happens to a request preempted for lack of KV blocks: its blocks are freed and it is
// computed again from prompt + tokens generated so far when it resumes (Recompute), or it leaves
// the scheduler until there is room for it and its blocks are read back from the tiers below the
// pool, where write-through put them, before it resumes (Swap; needs a disk tier). The same
// tokens come out either way.
enum class PreemptionMode { Recompute, Swap };
const char* toString(PreemptionMode mode);  // "recompute", "swap"
// Throws std::invalid_argument naming the choices.
PreemptionMode parsePreemptionMode(const std::string& name);

struct EngineConfig {
  int32_t maxBatchedTokens = 512;  // tokens per forward step (decodes + prefill chunks)
  int32_t maxNumSeqs = 64;         // sequences running at once
  int32_t maxQueuedRequests = 1024;  // waiting requests beyond which submit() refuses (QueueFull)
  uint64_t kvCacheBytes = 0;       // 0: a share of free memory (see defaultKvCacheBytes)
  // The most resizeKvCache may grow the pool to (address space is reserved for it, memory is
  // committed as the pool grows). 0: the starting size.
  uint64_t kvCacheMaxBytes = 0;
  int32_t blockSizeTokens = 16;
  // The longest context a request may have, in tokens (vLLM's max_model_len); 0: the model's
  // trained context. Windowed requests (RequestParams::kvWindow) run past it: it is where their
  // positions stop before their window moves back.
  int32_t maxModelLen = 0;
  kv::KVDType kvDtype = kv::KVDType::F16;
  int32_t numThreads = 0;          // kernel threads, the step loop's included; 0: one per core
  bool prefixCaching = true;       // keep and reuse the KV blocks of prompts already computed
  // Hybrid KV cache: sliding-window layers keep only the blocks their window sees (kv_config.h).
  bool hybridKv = true;
  // What runs the forward pass (model_runner.h): the CPU kernels, or MLX when built with it.
  Backend backend = Backend::Cpu;
  SchedulePolicy schedulePolicy = SchedulePolicy::Fcfs;
  KVTierConfig kvTiers;
  PreemptionMode preemptionMode = PreemptionMode::Recompute;
  // Called on the step loop after each step that changed the prefix cache, with what changed, in
  // order. It must not block (hand the events to another thread).
  std::function<void(std::vector<kv::KVEvent>&&)> kvEventListener;
};

// What Engine::resizeKvCache did.
struct KvResize {
  uint64_t bytes = 0;       // the pool's size now (whole blocks)
  int32_t blocks = 0;
  uint64_t maxBytes = 0;    // the most it can grow to
  int32_t movedBlocks = 0;  // blocks in use moved below the new size
  int32_t preempted = 0;    // requests preempted for the smaller pool (they resume later)
};

// Failure injection for tests: called on the step loop before the forward pass of each step
// (with the sequences in it) and before each token is sampled. Whatever they throw is handled as
// a failure at that point.
struct EngineHooks {
  std::function<void(std::span<const kv::SeqId> batch)> beforeForward;
  std::function<void(kv::SeqId seq)> beforeSample;
};

// The KV cache configuration an engine with `config` builds for `model`, with a memory budget of
// `bytes`.
kv::KVCacheConfig kvCacheConfigFor(const model::TransformerModel& model, const EngineConfig& config,
                                   uint64_t bytes);
// KV memory for `numSeqs` sequences of `tokens` positions each, as an engine with `config` holds
// them (its block size, storage type, hybrid layout and step size).
uint64_t kvBytesForSequences(const model::TransformerModel& model, const EngineConfig& config,
                             int64_t tokens, int64_t numSeqs);
// KV memory when none is configured: a quarter of the memory available now, at most 4 GiB and at
// least enough for one full-context sequence.
uint64_t defaultKvCacheBytes(const model::TransformerModel& model, const EngineConfig& config);

enum class FinishReason { Stop, Length, Cancelled, Error };
const char* toString(FinishReason reason);  // "stop", "length", "cancelled", "error"

struct RequestParams {
  std::vector<int32_t> promptTokens;  // >= 1 token
  SamplingParams sampling;
  // Completion tokens at most, >= 1; 0 only with promptLogprobs (scoring: the prompt is
  // computed, nothing is generated).
  int32_t maxTokens = 256;
  std::vector<std::string> stop;
  bool ignoreEos = false;
  int32_t topLogprobs = -1;           // -1: no logprobs; 0..20: logprob of each sampled token plus
                                      // that many alternatives
  bool promptLogprobs = false;        // log-probabilities of the prompt tokens (echo)
  bool returnLogits = false;          // raw float32 logits rows in the events (tests, debugging)
  // Leave control tokens (<|im_end|>, <|endoftext|>, ...) out of the text (as vLLM's
  // skip_special_tokens, default true); their ids are still in the events' tokens.
  bool skipSpecialTokens = true;
  // Choices to return, >= 1: the prompt is computed once and its KV shared by all of them (each
  // samples with its own random stream: seed + index). With bestOf > n, bestOf candidates are
  // generated and the n with the highest cumulative log-probability are returned, each in one
  // event when it is complete (no streaming). bestOf 0 means n.
  int32_t n = 1;
  int32_t bestOf = 0;
  // Attention sinks + a sliding window (StreamingLLM), for a request that may run far past the
  // context length in bounded KV memory: the layers that read every position read only the first
  // kvSinks tokens and the last kvWindow ones; the blocks in between go back to the pool as it
  // runs. Its positions are those of its cache: when they reach the model's limit
  // (EngineConfig::maxModelLen), the window moves back next to the sinks (keys re-rotated), and
  // prompt + maxTokens may exceed the limit. kvWindow 0: full attention. Not with n > 1 or
  // best_of, and only on the cpu backend.
  int32_t kvWindow = 0;
  int32_t kvSinks = 0;
};

// The most choices (n, and best_of candidates) one request may ask for.
inline constexpr int32_t kMaxChoices = 128;
// The most tokens (prompt + max tokens) a windowed request may run.
inline constexpr int64_t kMaxWindowedTokens = int64_t{1} << 30;

struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // (token, logprob), most likely first
};

// One event of a request's stream, for one of its choices. Text is UTF-8-complete and never
// contains any part of a stop string. Each choice's last event has finished = true; the stream ends
// after every choice's.
struct RequestEvent {
  int32_t index = 0;                    // the choice, in [0, n)
  std::string text;                     // new text since the previous event
  std::vector<int32_t> tokens;          // tokens sampled since the previous event
  std::vector<TokenLogprob> logprobs;   // one per token when topLogprobs >= 0
  std::vector<TokenLogprob> promptLogprobs;  // first event only, when promptLogprobs
  // With returnLogits: nVocab floats per prompt position (first event only; row i is the
  // distribution after prompt token i), and per token sampled since the previous event.
  std::vector<float> promptLogits;
  std::vector<float> logits;
  bool finished = false;
  FinishReason finishReason = FinishReason::Stop;
  std::string error;                    // for FinishReason::Error
  int32_t promptTokens = 0;
  int32_t completionTokens = 0;             // of this choice
  int32_t cachedTokens = 0;                 // prompt tokens found in the prefix cache
};

// Why submit() refused a request: the caller maps these to HTTP 400 / 503.
class EngineError : public std::runtime_error {
 public:
  enum class Kind { InvalidRequest, TooLong, QueueFull, ShuttingDown };
  EngineError(Kind kind, const std::string& message, std::string param = {})
      : std::runtime_error(message), kind_(kind), param_(std::move(param)) {}
  Kind kind() const { return kind_; }
  // The request field at fault, in the OpenAI API's words ("prompt", "max_tokens", ...), or empty.
  const std::string& param() const { return param_; }

 private:
  Kind kind_;
  std::string param_;
};

// The receiving end of one request. Thread-safe; the engine pushes, one consumer pops.
class RequestStream {
 public:
  uint64_t id() const { return id_; }
  // Waits up to `timeout` for the next event; nullopt on timeout. After every choice's finished
  // event, returns nullopt at once.
  std::optional<RequestEvent> next(std::chrono::milliseconds timeout);
  // Asks the engine to stop the request; its blocks are freed within one step and a final event
  // with FinishReason::Cancelled follows (unless it had already finished).
  void cancel();
  // Called by the engine's thread after each new event (with the stream's lock held, so it must
  // only signal, e.g. post work to an event loop, and never call back into this stream). Once
  // setNotify returns, the previous callback is no longer running and is never called again;
  // events pushed before the callback was set are not announced (read them with next(0)).
  void setNotify(std::function<void()> notify);

 private:
  friend class Engine;
  RequestStream(uint64_t id, int32_t choices) : id_(id), openChoices_(choices) {}
  void push(RequestEvent event);

  uint64_t id_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<RequestEvent> events_;
  int32_t openChoices_;        // choices whose finished event is not consumed yet
  bool closed_ = false;        // every finished event consumed
  bool cancelRequested_ = false;
  std::function<void()> notify_;
};

// Counters and gauges for /metrics. Histograms are cumulative bucket counts over fixed bounds.
struct Histogram {
  std::vector<double> bounds;    // upper bounds in seconds, ascending
  std::vector<uint64_t> counts;  // counts[i]: observations <= bounds[i]; last = +Inf
  double sum = 0;
  uint64_t count = 0;
  void observe(double value);
};

struct EngineStats {
  kv::KVCacheStats kv;
  int32_t blockSizeTokens = 0;
  int32_t running = 0;            // after the last step
  int32_t waiting = 0;            // submitted and not running (queued, or preempted)
  int32_t peakStepSequences = 0;  // most sequences one forward step has carried
  uint64_t preemptions = 0;
  uint64_t promptTokens = 0;      // prompt tokens prefilled (recomputation included)
  // Prefix cache, in tokens (as vLLM counts them): looked up at admission, and found.
  uint64_t prefixCacheQueries = 0;
  uint64_t prefixCacheHits = 0;
  // Of those hits, the tokens loaded from each tier below the pool (tiers.tiers' order); the
  // rest were in the pool.
  std::vector<uint64_t> tierHitTokens;
  int32_t loading = 0;            // requests waiting for their prefix to load from a tier
  int32_t swapped = 0;            // preempted requests swapped out (waiting to be read back)
  kvtier::TiersStats tiers;       // empty without tiers
  uint64_t generationTokens = 0;  // tokens sampled
  uint64_t steps = 0;
  uint64_t finishedStop = 0, finishedLength = 0, finishedCancelled = 0, finishedError = 0;
  Histogram timeToFirstToken;     // seconds from submit to the first sampled token
  Histogram timePerOutputToken;   // seconds between consecutive tokens of a request
  Histogram requestLatency;       // seconds from submit to finish
};

class Engine {
 public:
  // Builds the KV cache (config.kvCacheBytes or the default share) and starts the step loop.
  // Throws EngineError{InvalidRequest} for a bad config, or when the tokenizer's vocabulary has
  // ids the model has no output row for.
  Engine(model::TransformerModel& model, const model::Tokenizer& tokenizer, const EngineConfig& config,
         EngineHooks hooks = {});
  // Cancels everything still running and joins the loop.
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request. Throws EngineError: InvalidRequest (empty prompt, bad sampling values,
  // token ids outside the vocabulary, max tokens < 1 without prompt logprobs), TooLong (prompt +
  // max tokens beyond the model's context or the whole KV pool: it could never run), QueueFull
  // (maxQueuedRequests requests are waiting), ShuttingDown.
  std::shared_ptr<RequestStream> submit(RequestParams params);

  // Stops admitting new requests; running and waiting ones run to completion. Returns at once.
  void drain();
  // Evicts every cached prefix block (blocks of running requests keep their content). Returns how
  // many. Thread-safe.
  int32_t resetPrefixCache();
  // Sessions (kv::KVCache::saveSession / loadSession): writes the cached prefix of `tokens` (the
  // whole blocks the prefix cache holds for them, as a later request would hit) and `metadata`
  // to `path`, through a temporary file renamed into place; returns the tokens saved. Loads such
  // a file's blocks into the prefix cache, so requests starting with its tokens hit them. Both
  // are thread-safe and run beside the step loop. Throw EngineError{InvalidRequest} with the
  // cache's reason (prefix caching off, a damaged or foreign file, a pool too small) and
  // std::runtime_error when the file cannot be written or read. They read and write the cache's
  // arena, so the MLX backend refuses them (EngineError{InvalidRequest}).
  int32_t saveSession(std::span<const int32_t> tokens, std::string_view metadata,
                      const std::string& path);
  kv::KVCache::LoadedSession loadSession(const std::string& path);
  EngineStats stats() const;
  // Grows or shrinks the KV pool to `bytes` (rounded down to whole blocks) while serving, between
  // two steps; returns when done. Shrinking evicts cached blocks first, then preempts the most
  // recently admitted requests (recomputed or swapped, as for any preemption) until what is in
  // use fits, and moves blocks in use to the bottom of the pool; no accepted request is lost.
  // Throws EngineError{InvalidRequest} for a size below one block or above the maximum
  // (EngineConfig::kvCacheMaxBytes), one too small for a request already accepted, or a backend
  // whose K/V live outside the arena (MLX); {ShuttingDown} while stopping.
  KvResize resizeKvCache(uint64_t bytes);
  // Waits until every block queued for the tiers below the pool is written (no-op without
  // tiers). For tests and benchmarks.
  void flushKVTiers();
  const EngineConfig& config() const { return config_; }
  int32_t maxContextTokens() const;  // longest prompt + completion a request may ask for
  // Positions a windowed request reaches before its window moves back (maxModelLen or the
  // model's context).
  int32_t positionLimit() const;

 private:
  void requireSessionsSupported() const;
  void checkWindow(const RequestParams& p) const;  // a windowed request's fields (EngineError)
  void startTiers();  // builds the tiers of config_.kvTiers
  struct Request;
  struct Group;
  void loop();
  bool step();  // false when there was nothing to do
  void admitNewRequests();
  // Into the scheduler (first with `front`: a swapped-out request coming back).
  void enqueue(std::unique_ptr<Request> r, bool front = false);
  void pollLoads();                          // requests whose prefix was loading
  void swapOut(kv::SeqId seq);               // a preempted request leaves the scheduler
  void resumeSwapped();                      // the first swapped request, when it fits again
  bool resuming() const;                     // a swapped request is being read back
  void dropCancelledWaiting();               // cancelled requests outside the scheduler
  void updateTierCounts();
  void runResizes();                         // pending resizeKvCache calls, on the loop
  KvResize resizeOnLoop(uint64_t bytes);
  void notePreempted(const std::vector<kv::SeqId>& preempted);  // bookkeeping of preemptions
  int64_t longestAccepted() const;           // prompt + max tokens of every accepted request
  void dropCancelled();
  void finish(Request& r, FinishReason reason, const std::string& error = {});
  void fail(kv::SeqId seq, const std::string& error);
  void emitToken(Request& r, int32_t token, const float* logits);
  void process(Request& r, const ScheduledChunk& chunk, float* rows);
  void shiftWindows();  // windowed requests at their position limit move their window back
  void updateCounts();
  void forkChoices(Request& r, const float* row);  // an n > 1 request's prompt is computed
  void finishBestOf(Group& g);                     // every candidate done: send the best n
  void publishKVEvents();

  model::TransformerModel& model_;
  const model::Tokenizer& tokenizer_;
  EngineConfig config_;
  EngineHooks hooks_;
  std::unique_ptr<kv::KVCache> cache_;
  std::unique_ptr<PagedBlockBudget> budget_;
  std::unique_ptr<Scheduler> scheduler_;  // loop thread only
  std::unique_ptr<ModelRunner> runner_;   // loop thread only
  std::unique_ptr<kvtier::KVTiers> tiers_;

  mutable std::mutex mu_;  // guards incoming_, stats_, queued_, flags
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Request>> incoming_;
  bool stopping_ = false;
  bool draining_ = false;
  bool loadsDone_ = false;  // a tier load finished since the loop last looked
  struct ResizeJob {
    uint64_t bytes = 0;
    bool done = false;
    KvResize result;
    std::string error;  // EngineError{InvalidRequest} message when not empty
  };
  std::deque<std::shared_ptr<ResizeJob>> resizes_;
  std::condition_variable resized_;
  // While a shrink is under way: the longest request submit() may accept (the new pool's).
  int64_t acceptCap_ = INT64_MAX;
  int32_t queued_ = 0;  // submitted and not running: incoming_ + the scheduler's waiting queue

  EngineStats stats_;
  uint64_t nextId_ = 1;

  // Loop-thread state.
  std::unordered_map<kv::SeqId, std::unique_ptr<Request>> requests_;  // in the scheduler
  struct Loading {
    std::unique_ptr<Request> request;
    kvtier::KVTiers::Ticket ticket = 0;
    bool resume = false;  // a swapped-out request coming back: it goes first
  };
  std::vector<Loading> loading_;  // waiting for their prefix to load from a tier
  // Swap preemption: requests swapped out, oldest first, and the new arrivals held back while
  // there are any (so that a swapped request resumes before later ones take its room).
  std::deque<std::unique_ptr<Request>> swapped_;
  std::deque<std::unique_ptr<Request>> deferred_;
  double prefillRate_ = 0;        // prompt tokens per second of forward pass (moving average)
  std::vector<kv::KVEvent> kvEvents_;
  std::vector<float> logits_;
  std::vector<float> sampleRow_;
  std::thread thread_;
};

}  // namespace cortex::engine
