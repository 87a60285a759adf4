#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace cortex::engine {

namespace {

std::string seqName(kv::SeqId seq) { return "request " + std::to_string(seq); }

}  // namespace

const char* toString(SchedulePolicy policy) {
  return policy == SchedulePolicy::Fcfs ? "fcfs" : "lpm";
}

SchedulePolicy parseSchedulePolicy(const std::string& name) {
  if (name == "fcfs") return SchedulePolicy::Fcfs;
  if (name == "lpm") return SchedulePolicy::Lpm;
  throw std::invalid_argument("unknown schedule policy '" + name + "' (choose fcfs or lpm)");
}

int64_t BlockBudget::maxSequenceTokens(int32_t) const {
  return int64_t{totalBlocks()} * blockSizeTokens();
}

int32_t BlockBudget::cachedPrefixTokens(std::span<const int32_t>, kv::SeqWindow) const {
  return 0;
}

int32_t BlockBudget::blocksNeededToAllocate(std::span<const int32_t>, int32_t totalTokens,
                                            kv::SeqWindow) const {
  return blocksForTokens(totalTokens);
}

int32_t BlockBudget::tryAllocateWithPrefix(kv::SeqId seq, std::span<const int32_t>,
                                           int32_t totalTokens, int32_t maxContextTokens,
                                           kv::SeqWindow) {
  return tryAllocate(seq, totalTokens, maxContextTokens) ? 0 : -1;
}

void BlockBudget::fork(kv::SeqId, kv::SeqId) {
  throw std::logic_error("this memory design cannot share a sequence's positions");
}

Scheduler::Scheduler(const SchedulerConfig& config, BlockBudget& memory)
    : config_(config), memory_(memory) {
  if (config_.maxBatchedTokens < 1 || config_.maxNumSeqs < 1) {
    throw std::invalid_argument("max batched tokens and max sequences must be >= 1");
  }
  if (!(config_.watermarkFraction >= 0.0 && config_.watermarkFraction < 1.0)) {
    throw std::invalid_argument("the watermark fraction must be in [0, 1)");
  }
  if (config_.maxOvertakes < 0) throw std::invalid_argument("max overtakes must be >= 0");
  memoryResized();
}

void Scheduler::memoryResized() {
  maxContextTokens_ = memory_.maxSequenceTokens(config_.maxBatchedTokens);
  watermarkBlocks_ = std::max(
      1, static_cast<int32_t>(std::floor(config_.watermarkFraction * memory_.totalBlocks())));
}

bool Scheduler::freeSomeMemory(std::vector<kv::SeqId>& preempted) {
  if (releaseIdleMemory(nullptr)) return true;
  if (running_.empty()) return false;
  StepPlan plan;
  preemptNewest(plan);
  preempted.push_back(plan.preempted.front());
  return true;
}

int64_t Scheduler::maxContextTokens() const { return maxContextTokens_; }

Scheduler::Entry& Scheduler::entry(kv::SeqId seq) {
  auto it = entries_.find(seq);
  if (it == entries_.end()) throw std::invalid_argument(seqName(seq) + " is not scheduled");
  return it->second;
}

const Scheduler::Entry& Scheduler::entry(kv::SeqId seq) const {
  auto it = entries_.find(seq);
  if (it == entries_.end()) throw std::invalid_argument(seqName(seq) + " is not scheduled");
  return it->second;
}

void Scheduler::add(kv::SeqId seq, int32_t contextTokens, int32_t maxContextTokens,
                    const std::vector<int32_t>* tokens, bool front, kv::SeqWindow window) {
  if (contextTokens < 1 || (!window.on() && maxContextTokens < contextTokens) ||
      maxContextTokens < 1) {
    throw std::invalid_argument(seqName(seq) + ": needs 1 <= context <= max context tokens");
  }
  if (!window.on() && maxContextTokens > this->maxContextTokens()) {
    throw std::invalid_argument(seqName(seq) + " needs " + std::to_string(maxContextTokens) +
                                " tokens of KV memory; the pool holds " +
                                std::to_string(this->maxContextTokens()));
  }
  if (entries_.count(seq) != 0) throw std::invalid_argument(seqName(seq) + " is already scheduled");
  Entry fresh{seq, contextTokens, 0, maxContextTokens};
  fresh.tokens = tokens;
  fresh.window = window;
  auto [it, inserted] = entries_.emplace(seq, fresh);
  (void)inserted;
  try {
    if (front) {
      waiting_.push_front(&it->second);
    } else {
      waiting_.push_back(&it->second);
    }
  } catch (...) {
    entries_.erase(it);
    throw;
  }
}

void Scheduler::addFork(kv::SeqId parent, kv::SeqId child, const std::vector<int32_t>* tokens) {
  const Entry& p = entry(parent);
  if (p.where != Entry::Where::Running || p.computedTokens != p.contextTokens) {
    throw std::invalid_argument(seqName(parent) + " cannot be forked: it is not running with its "
                                "context computed");
  }
  if (entries_.count(child) != 0) throw std::invalid_argument(seqName(child) + " is already scheduled");
  Entry e{child, p.contextTokens, p.computedTokens, p.maxContextTokens};
  e.tokens = tokens;
  e.holdsMemory = true;
  auto [it, inserted] = entries_.emplace(child, e);
  (void)inserted;
  try {
    memory_.fork(parent, child);
    waiting_.push_front(&it->second);
  } catch (...) {
    memory_.release(child);
    entries_.erase(it);
    throw;
  }
}

bool Scheduler::releaseIdleMemory(const Entry* keep) {
  // note: a waiting request that holds memory (a forked choice) could otherwise keep the queue's
  // next request waiting forever behind it.
  for (auto it = waiting_.rbegin(); it != waiting_.rend(); ++it) {
    Entry& e = **it;
    if (&e == keep || !e.holdsMemory) continue;
    memory_.release(e.seq);
    e.holdsMemory = false;
    e.computedTokens = 0;
    e.contextTokens += e.shifted;
    e.shifted = 0;
    return true;
  }
  return false;
}

void Scheduler::shift(kv::SeqId seq, int32_t tokens) {
  Entry& e = entry(seq);
  if (tokens < 0 || tokens > e.computedTokens || !e.window.on()) {
    throw std::invalid_argument(seqName(seq) + " cannot move back by " + std::to_string(tokens));
  }
  e.contextTokens -= tokens;
  e.computedTokens -= tokens;
  e.shifted += tokens;
}

int32_t Scheduler::shiftedTokens(kv::SeqId seq) const { return entry(seq).shifted; }

bool Scheduler::atPositionLimit(kv::SeqId seq) const {
  const Entry& e = entry(seq);
  return e.holdsMemory && e.room() <= 0;
}

void Scheduler::appendToken(kv::SeqId seq) {
  Entry& e = entry(seq);
  if (!e.window.on() && e.contextTokens >= e.maxContextTokens) {
    throw std::invalid_argument(seqName(seq) + " is already at its maximum context");
  }
  ++e.contextTokens;
}

bool Scheduler::remove(kv::SeqId seq) {
  auto it = entries_.find(seq);
  if (it == entries_.end()) return false;
  Entry* e = &it->second;
  switch (e->where) {
    case Entry::Where::Running: std::erase(running_, e); break;
    case Entry::Where::Waiting: std::erase(waiting_, e); break;
  }
  memory_.release(seq);
  entries_.erase(it);
  return true;
}

bool Scheduler::isRunning(kv::SeqId seq) const {
  auto it = entries_.find(seq);
  return it != entries_.end() && it->second.where == Entry::Where::Running;
}

int32_t Scheduler::computedTokens(kv::SeqId seq) const { return entry(seq).computedTokens; }

std::span<const int32_t> Scheduler::prefixOf(const Entry& e) const {
  if (e.tokens == nullptr) return {};
  if (e.tokens->size() < static_cast<size_t>(e.contextTokens)) {
    throw std::logic_error(seqName(e.seq) + "'s token ids are shorter than its context");
  }
  return std::span<const int32_t>(*e.tokens).first(static_cast<size_t>(e.contextTokens));
}

std::deque<Scheduler::Entry*>::iterator Scheduler::nextToAdmit() {
  if (config_.policy == SchedulePolicy::Fcfs || waiting_.size() == 1) return waiting_.begin();
  // Lpm. A request overtaken too often goes first (the oldest such); otherwise the longest cached
  // prefix among the first kWindow waiting requests, the oldest on a tie. The window bounds the
  // lookups per admission.
  constexpr size_t kWindow = 128;
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
    if ((*it)->overtaken >= config_.maxOvertakes) return it;
  }
  auto best = waiting_.begin();
  int32_t bestTokens = -1;
  size_t seen = 0;
  for (auto it = waiting_.begin(); it != waiting_.end() && seen < kWindow; ++it, ++seen) {
    const Entry& e = **it;
    const int32_t cached =
        e.holdsMemory ? e.computedTokens : memory_.cachedPrefixTokens(prefixOf(e), e.window);
    if (cached > bestTokens) {
      best = it;
      bestTokens = cached;
    }
  }
  return best;
}

void Scheduler::preemptNewest(StepPlan& plan) {
  Entry* victim = running_.back();
  running_.pop_back();
  memory_.release(victim->seq);
  victim->computedTokens = 0;
  victim->contextTokens += victim->shifted;  // computed again from position 0
  victim->shifted = 0;
  victim->holdsMemory = false;
  victim->where = Entry::Where::Waiting;
  waiting_.push_front(victim);
  plan.preempted.push_back(victim->seq);
}

void Scheduler::plan(StepPlan& plan, Entry& e, int32_t n) {
  plan.chunks.push_back({e.seq, e.computedTokens, n, e.computedTokens + n == e.contextTokens});
  e.computedTokens += n;
  plan.numTokens += n;
}

StepPlan Scheduler::schedule() {
  StepPlan out;
  for (;;) {
    // Retrying after a forced preemption: the chunks planned so far were all undone by it (the
    // plan is empty whenever we get here), so only the preemptions carry over.
    out.chunks.clear();
    out.numTokens = 0;
    int32_t budget = config_.maxBatchedTokens;

    // 1. Decodes, oldest first; the newest running request yields its blocks when the pool is dry.
    for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
      Entry& e = *running_[i];
      if (e.contextTokens - e.computedTokens != 1 || e.chunkCap() < 1) continue;
      bool preemptedSelf = false;
      while (!memory_.tryAppend(e.seq, 1)) {
        if (releaseIdleMemory(nullptr)) continue;
        const bool self = running_.back() == &e;
        preemptNewest(out);
        if (self) {
          preemptedSelf = true;
          break;
        }
      }
      // note: the victims are always newer than e, so none of them was planned in this loop.
      if (preemptedSelf) break;
      plan(out, e, 1);
      --budget;
    }

    // 2. The next chunk of running requests still prefilling, as far as blocks allow.
    for (Entry* ep : running_) {
      Entry& e = *ep;
      const int32_t pending = e.contextTokens - e.computedTokens;
      if (pending <= 1 || budget == 0 || e.chunkCap() < 1) continue;
      int32_t n = std::min({pending, budget, e.chunkCap()});
      while (memory_.blocksNeededToAppend(e.seq, n) > memory_.freeBlocks() &&
             releaseIdleMemory(nullptr)) {
      }
      const int32_t free = memory_.freeBlocks();
      if (memory_.blocksNeededToAppend(e.seq, n) > free) {
        // The largest chunk that fits (blocks needed grow with n).
        int32_t lo = 0, hi = n - 1;
        while (lo < hi) {
          const int32_t mid = lo + (hi - lo + 1) / 2;
          if (memory_.blocksNeededToAppend(e.seq, mid) <= free) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        n = lo;
      }
      if (n <= 0 || !memory_.tryAppend(e.seq, n)) continue;
      plan(out, e, n);
      budget -= n;
    }

    // 3. Admission, each request starting on its cached prefix.
    while (!waiting_.empty() && budget > 0 &&
           static_cast<int32_t>(running_.size()) < config_.maxNumSeqs) {
      const auto pos = nextToAdmit();
      Entry& e = **pos;
      const std::span<const int32_t> prefix = prefixOf(e);
      const bool fromCache = !e.holdsMemory;
      int32_t total = 0;  // positions the request will hold after this step
      int32_t need = 0;
      if (e.holdsMemory) {
        total = e.computedTokens +
                std::min({e.contextTokens - e.computedTokens, budget, e.chunkCap()});
        if (total == e.computedTokens) break;  // a windowed request waiting for its shift
        need = memory_.blocksNeededToAppend(e.seq, total - e.computedTokens);
      } else {
        const int32_t bs = memory_.blockSizeTokens();
        const int32_t cached = std::min(memory_.cachedPrefixTokens(prefix, e.window),
                                        (e.contextTokens - 1) / bs * bs);
        total = cached + std::min(e.contextTokens - cached, budget);
        if (e.window.on()) total = std::min({total, e.maxContextTokens, cached + e.window.window});
        need = memory_.blocksNeededToAllocate(prefix, total, e.window);
      }
      const int32_t reserve = running_.empty() ? 0 : watermarkBlocks_;
      while (need + reserve > memory_.freeBlocks() && releaseIdleMemory(&e)) {
      }
      if (need + reserve > memory_.freeBlocks()) break;
      if (e.holdsMemory) {
        if (!memory_.tryAppend(e.seq, total - e.computedTokens)) break;
      } else {
        const int32_t cached =
            memory_.tryAllocateWithPrefix(e.seq, prefix, total, e.maxContextTokens, e.window);
        if (cached < 0) break;
        e.computedTokens = cached;
        e.holdsMemory = true;
      }
      for (auto it = waiting_.begin(); it != pos; ++it) ++(*it)->overtaken;
      waiting_.erase(pos);
      e.where = Entry::Where::Running;
      e.overtaken = 0;
      running_.push_back(&e);
      const int32_t n = total - e.computedTokens;
      plan(out, e, n);
      out.chunks.back().admitted = fromCache;
      budget -= n;
    }

    if (!out.chunks.empty() || running_.empty()) break;
    // Nothing could run although requests hold blocks (prefills waiting for blocks the others
    // hold): free the newest and plan again.
    preemptNewest(out);
  }
  return out;
}

void Scheduler::checkInvariants() const {
  auto fail = [](const std::string& what) { throw std::logic_error("scheduler: " + what); };
  if (running_.size() + waiting_.size() != entries_.size()) {
    fail("queues and entries disagree");
  }
  if (static_cast<int32_t>(running_.size()) > config_.maxNumSeqs) fail("too many running");
  auto check = [&](const auto& list, Entry::Where where, const char* name) {
    for (const Entry* e : list) {
      if (e->where != where) {
        fail(seqName(e->seq) + " is in the " + name + " list but not marked so");
      }
      if (e->holdsMemory != (e->computedTokens > 0)) {
        fail(seqName(e->seq) + " holds memory that disagrees with its computed tokens");
      }
      if (e->computedTokens > e->contextTokens) {
        fail(seqName(e->seq) + " computed past its context");
      }
      if (where != Entry::Where::Waiting && !e->holdsMemory) {
        fail(seqName(e->seq) + " is " + name + " without memory");
      }
    }
  };
  check(running_, Entry::Where::Running, "running");
  check(waiting_, Entry::Where::Waiting, "waiting");
  for (const auto& [seq, e] : entries_) {
    if (e.window.on() ? e.computedTokens > e.maxContextTokens
                      : e.contextTokens > e.maxContextTokens) {
      fail(seqName(seq) + " exceeds its max context");
    }
    if (e.shifted != 0 && !e.holdsMemory) fail(seqName(seq) + " is shifted without memory");
  }
}

}  // namespace cortex::engine
