// The continuous-batching policy: which requests run in the next forward step and how many tokens
// each, decided in blocks and tokens only. It knows nothing of models, logits or bytes, so it is
// tested without a model file and the serving simulation (kvsim) drives the same code.
//
// Each schedule() call builds one step under a token budget (maxBatchedTokens) and a sequence cap
// (maxNumSeqs):
//   1. running requests that decode (one token each), in admission order; when the pool has no
//      block for one of them, the most recently admitted running request is preempted (its blocks
//      are freed and it goes back to the front of the queue, to be recomputed from scratch);
//   2. the next chunk of running requests still prefilling, as far as budget and blocks allow;
//   3. waiting requests: the next one (see below) is admitted with as much of its context as the
//      budget allows, while the pool keeps a watermark of free blocks back for running requests
//      to grow (the next one may always take the last blocks when nothing runs), and admission
//      stops at the first request that does not fit.
// Admission starts a request on the longest prefix of its tokens that the KV cache already holds
// (prefix caching): those positions count as computed, their blocks are taken out of the cache's
// reach (they cannot be evicted under the request) and only the rest is prefilled. At least one
// token is always computed, for its logits.
// Which waiting request is next: the oldest (SchedulePolicy::Fcfs, never overtaken), or the one
// with the longest cached prefix (SchedulePolicy::Lpm, which turns shared prefixes into hits before
// the cache evicts them), except that a request overtaken maxOvertakes times goes first.
// If nothing at all could be scheduled while requests run (prefills holding blocks each other
// need), the newest running request is preempted and the step is planned again.
// Waiting requests that hold memory (the forked choices of an n > 1 request) give it back first
// when memory is short, before any running request is preempted and before admission gives up.
// Positions are reserved in KV memory as they are planned: after schedule() returns, every planned
// chunk's positions exist in the cache, ready for the forward pass to write.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <atomic>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "kv/kv_cache.h"

namespace cortex::engine {

// The scheduler's view of KV memory: blocks and tokens. Implemented over the real KVCache
// (PagedBlockBudget) and, in the serving simulation, over the contiguous-reservation design.
class BlockBudget {
 public:
  virtual ~BlockBudget() = default;
  virtual int32_t totalBlocks() const = 0;
  virtual int32_t freeBlocks() const = 0;
  virtual int32_t blockSizeTokens() const = 0;
  int32_t blocksForTokens(int64_t tokens) const {
    return static_cast<int32_t>((tokens + blockSizeTokens() - 1) / blockSizeTokens());
  }
  // Creates `seq` holding positions [0, tokens); maxContextTokens is the most it may ever hold
  // (designs that reserve up front use it). False, with nothing changed, when memory is short.
  virtual bool tryAllocate(kv::SeqId seq, int32_t tokens, int32_t maxContextTokens) = 0;
  // Adds n positions to `seq`; false, with nothing changed, when memory is short.
  virtual bool tryAppend(kv::SeqId seq, int32_t n) = 0;
  // Blocks tryAppend(seq, n) needs free.
  virtual int32_t blocksNeededToAppend(kv::SeqId seq, int32_t n) const = 0;
  // The longest sequence the whole memory can hold when at most stepTokens positions are
  // computed per step: totalBlocks() * blockSizeTokens() unless blocks are given back on the way.
  virtual int64_t maxSequenceTokens(int32_t stepTokens) const;
  // Releases everything `seq` holds (no-op for an unknown id).
  virtual void release(kv::SeqId seq) = 0;

  // Prefix caching; designs without it find nothing and allocate plainly. `win`: the sequence
  // keeps only attention sinks and a window (kv::SeqWindow; designs without windows ignore it).
  // Tokens of the longest cached prefix of `tokens` (whole blocks).
  virtual int32_t cachedPrefixTokens(std::span<const int32_t> tokens, kv::SeqWindow win) const;
  // Blocks tryAllocateWithPrefix(seq, prefix, totalTokens, ...) would take.
  virtual int32_t blocksNeededToAllocate(std::span<const int32_t> prefix, int32_t totalTokens,
                                         kv::SeqWindow win) const;
  // Creates `seq` with positions [0, totalTokens), starting on the cached prefix of `prefix` (at
  // most totalTokens - 1 tokens). The cached tokens, or -1 with nothing changed when memory is
  // short.
  virtual int32_t tryAllocateWithPrefix(kv::SeqId seq, std::span<const int32_t> prefix,
                                        int32_t totalTokens, int32_t maxContextTokens,
                                        kv::SeqWindow win);
  // Makes `child` share all of `parent`'s positions (no memory taken). Designs that cannot share
  // throw std::logic_error.
  virtual void fork(kv::SeqId parent, kv::SeqId child);
};

// BlockBudget over the paged KVCache.
class PagedBlockBudget final : public BlockBudget {
 public:
  explicit PagedBlockBudget(kv::KVCache& cache) : cache_(cache) {}
  int32_t totalBlocks() const override { return cache_.numBlocks(); }
  int32_t freeBlocks() const override { return cache_.freeBlocks(); }
  int32_t blockSizeTokens() const override { return cache_.blockSizeTokens(); }
  bool tryAllocate(kv::SeqId seq, int32_t tokens, int32_t) override {
    return cache_.tryAllocateFor(seq, tokens);
  }
  bool tryAppend(kv::SeqId seq, int32_t n) override { return cache_.tryAppendTokens(seq, n); }
  int32_t blocksNeededToAppend(kv::SeqId seq, int32_t n) const override {
    return cache_.blocksNeededToAppend(seq, n);
  }
  int64_t maxSequenceTokens(int32_t stepTokens) const override {
    return cache_.maxSequenceTokens(stepTokens);
  }
  void release(kv::SeqId seq) override { cache_.freeFor(seq); }
  int32_t cachedPrefixTokens(std::span<const int32_t> tokens, kv::SeqWindow win) const override {
    return cache_.cachedPrefixTokens(tokens, win);
  }
  int32_t blocksNeededToAllocate(std::span<const int32_t> prefix, int32_t totalTokens,
                                 kv::SeqWindow win) const override {
    return cache_.blocksNeededToAllocate(prefix, totalTokens, win);
  }
  int32_t tryAllocateWithPrefix(kv::SeqId seq, std::span<const int32_t> prefix,
                                int32_t totalTokens, int32_t, kv::SeqWindow win) override {
    return cache_.tryAllocateWithPrefix(seq, prefix, totalTokens, win);
  }
  void fork(kv::SeqId parent, kv::SeqId child) override { cache_.fork(parent, child); }

 private:
  kv::KVCache& cache_;
};

enum class SchedulePolicy { Fcfs, Lpm };
const char* toString(SchedulePolicy policy);  // "fcfs", "lpm"
// "fcfs" or "lpm"; throws std::invalid_argument naming the choices.
SchedulePolicy parseSchedulePolicy(const std::string& name);

struct SchedulerConfig {
  int32_t maxBatchedTokens = 512;  // tokens per step (decodes + prefill chunks), >= 1
  int32_t maxNumSeqs = 64;         // requests running at once, >= 1
  // Blocks kept free at admission so running requests can grow: this fraction of the pool, at
  // least one block (vLLM keeps 1%).
  double watermarkFraction = 0.01;
  SchedulePolicy policy = SchedulePolicy::Fcfs;
  // Lpm: how many later requests may be admitted before a waiting one, after which it goes first.
  int32_t maxOvertakes = 32;
};

// One request's share of a step: positions [firstPos, firstPos + numTokens) of its context.
struct ScheduledChunk {
  kv::SeqId seq = 0;
  int32_t firstPos = 0;
  int32_t numTokens = 0;
  // True when the chunk computes the last position of the request's context: the step's output
  // for it is the distribution of its next token.
  bool completesContext = false;
  // Set on the chunk that admits a request without memory: the positions [0, firstPos) it starts
  // on were found in the prefix cache.
  bool admitted = false;
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;  // decodes first (admission order), then prefill chunks
  std::vector<kv::SeqId> preempted;    // freed in this step and queued again at the front
  int32_t numTokens = 0;               // sum of chunk sizes, <= maxBatchedTokens
  bool empty() const { return chunks.empty(); }
};

class Scheduler {
 public:
  // Throws std::invalid_argument for a config outside the documented ranges.
  Scheduler(const SchedulerConfig& config, BlockBudget& memory);
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerConfig& config() const { return config_; }
  // The longest context (tokens) a request may ever reach: what the whole pool holds for one
  // sequence (BlockBudget::maxSequenceTokens).
  int64_t maxContextTokens() const;

  // Queues a new request at the back. contextTokens >= 1 (its prompt); maxContextTokens >=
  // contextTokens is prompt + max new tokens. `tokens`, when given, is the request's context
  // (prompt, then each generated token before appendToken is called), owned by the caller and
  // valid until the request is removed: admission looks its prefix up in the cache. Without it
  // the request computes its whole context. `front` queues it first instead (a preempted request
  // that comes back). Throws std::invalid_argument for an id already known, bad counts, or a
  // request that could never fit (maxContextTokens > maxContextTokens()).
  // A windowed request (`window` on: attention sinks + a sliding window, kv::SeqWindow) holds
  // bounded memory however long it runs (the caller checks that it fits): maxContextTokens is
  // then the most positions it may reach, its context may grow past that, its chunks stop there
  // and hold at most its window, and once its computed positions reach it the caller moves it
  // back with shift().
  void add(kv::SeqId seq, int32_t contextTokens, int32_t maxContextTokens,
           const std::vector<int32_t>* tokens = nullptr, bool front = false,
           kv::SeqWindow window = {});
  // A windowed request's positions moved back by `tokens` (kv::KVCache::shiftWindow): its
  // context and computed positions go down by as much; token i of its context is at position
  // i - shiftedTokens(seq) from its sinks' blocks on. Preemption resets it (recomputed from
  // position 0). Throws std::invalid_argument for an unknown id or a bad count.
  void shift(kv::SeqId seq, int32_t tokens);
  int32_t shiftedTokens(kv::SeqId seq) const;
  // Whether a windowed request's computed positions have reached its limit (it needs a shift).
  bool atPositionLimit(kv::SeqId seq) const;
  // Adds `child`, a copy of the running `parent` whose context is complete: it shares all of
  // parent's computed positions (forked memory, no bytes copied) and waits, at the front of the
  // queue, for its context to grow by appendToken. `tokens` as in add. Throws
  // std::invalid_argument for an unknown or busy parent or a known child.
  void addFork(kv::SeqId parent, kv::SeqId child, const std::vector<int32_t>* tokens);
  // A token was sampled for `seq` (after a step whose chunk completed its context): the context
  // grows by one, to be computed in a later step. Throws std::invalid_argument for an unknown id.
  void appendToken(kv::SeqId seq);
  // Removes `seq` wherever it is (waiting or running) and releases its memory. False for an
  // unknown id (removing twice is harmless).
  bool remove(kv::SeqId seq);

  // Plans the next step (see the file comment). Empty when there is nothing to run.
  StepPlan schedule();

  // --- the pool changed size (live resize) ---------------------------------------------------
  // Frees memory for a smaller pool: a waiting request's held positions first, else the most
  // recently admitted running request is preempted (queued again at the front; its id is
  // appended to `preempted`). False when nothing holds memory.
  bool freeSomeMemory(std::vector<kv::SeqId>& preempted);
  // Recomputes what depends on the pool's size (the longest context, the watermark). Requests
  // already queued keep their place; the caller checks they still fit.
  void memoryResized();

  int32_t numWaiting() const { return static_cast<int32_t>(waiting_.size()); }
  int32_t numRunning() const { return static_cast<int32_t>(running_.size()); }
  bool isRunning(kv::SeqId seq) const;  // false for unknown ids
  // Tokens of `seq` computed (or planned) so far; throws std::invalid_argument for unknown ids.
  int32_t computedTokens(kv::SeqId seq) const;

  // Verifies: every request is in exactly one of the queues (waiting, running); running ones hold
  // memory with 0 < computed <= context; waiting ones hold none (computed 0) unless forked;
  // running count <= maxNumSeqs. Throws std::logic_error.
  void checkInvariants() const;

 private:
  struct Entry {
    kv::SeqId seq = 0;
    int32_t contextTokens = 0;     // prompt + tokens generated so far
    int32_t computedTokens = 0;    // positions computed or planned (held in memory)
    int32_t maxContextTokens = 0;  // prompt + max new tokens
    enum class Where : uint8_t { Waiting, Running } where = Where::Waiting;
    bool holdsMemory = false;      // positions [0, computedTokens) are in memory
    const std::vector<int32_t>* tokens = nullptr;  // the context's token ids, when known
    int32_t overtaken = 0;         // later requests admitted before this one (Lpm)
    kv::SeqWindow window{};        // windowed request: maxContextTokens limits its positions
    int32_t shifted = 0;           // positions its window moved back by (shift)
    // Positions it may still plan before it reaches its limit.
    int32_t room() const { return window.on() ? maxContextTokens - computedTokens : INT32_MAX; }
    // The most positions one of its chunks may hold: a windowed request computes at most its
    // window per step, so its memory stays within about twice its window.
    int32_t chunkCap() const { return window.on() ? std::min(room(), window.window) : INT32_MAX; }
  };
  Entry& entry(kv::SeqId seq);
  const Entry& entry(kv::SeqId seq) const;
  void preemptNewest(StepPlan& plan);
  void plan(StepPlan& plan, Entry& e, int32_t n);
  // Gives back memory that no running request uses: the positions a waiting request (other than
  // `keep`) holds. False when there is none.
  bool releaseIdleMemory(const Entry* keep);
  // The waiting request to admit next (see the file comment).
  std::deque<Entry*>::iterator nextToAdmit();
  std::span<const int32_t> prefixOf(const Entry& e) const;

  SchedulerConfig config_;
  BlockBudget& memory_;
  int32_t watermarkBlocks_ = 1;
  std::atomic<int64_t> maxContextTokens_{0};  // read by submitting threads
  std::unordered_map<kv::SeqId, Entry> entries_;
  std::deque<Entry*> waiting_;   // arrival order; preempted requests go back to the front
  std::vector<Entry*> running_;  // admission order
};

}  // namespace cortex::engine
