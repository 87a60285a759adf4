#include "engine/scheduler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace cortex::engine {

namespace {

std::string seqName(kv::SeqId seq) { return "request " + std::to_string(seq); }

}  // namespace

void BlockBudget::transfer(kv::SeqId, kv::SeqId, int32_t) {
  throw std::logic_error("this memory design cannot hand a sequence's positions over");
}

void PagedBlockBudget::transfer(kv::SeqId from, kv::SeqId to, int32_t keepTokens) {
  // note: fork + free leaves `to` the only owner of every block, so the cut below never falls in
  // a shared block.
  cache_.fork(from, to);
  cache_.freeFor(from);
  cache_.truncate(to, keepTokens);
}

Scheduler::Scheduler(const SchedulerConfig& config, BlockBudget& memory)
    : config_(config), memory_(memory) {
  if (config_.maxBatchedTokens < 1 || config_.maxNumSeqs < 1) {
    throw std::invalid_argument("max batched tokens and max sequences must be >= 1");
  }
  if (!(config_.watermarkFraction >= 0.0 && config_.watermarkFraction < 1.0)) {
    throw std::invalid_argument("the watermark fraction must be in [0, 1)");
  }
  watermarkBlocks_ = std::max(
      1, static_cast<int32_t>(std::floor(config_.watermarkFraction * memory_.totalBlocks())));
}

int64_t Scheduler::maxContextTokens() const {
  return int64_t{memory_.totalBlocks()} * memory_.blockSizeTokens();
}

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

void Scheduler::add(kv::SeqId seq, int32_t contextTokens, int32_t maxContextTokens) {
  if (contextTokens < 1 || maxContextTokens < contextTokens) {
    throw std::invalid_argument(seqName(seq) + ": needs 1 <= context <= max context tokens");
  }
  if (maxContextTokens > this->maxContextTokens()) {
    throw std::invalid_argument(seqName(seq) + " needs " + std::to_string(maxContextTokens) +
                                " tokens of KV memory; the pool holds " +
                                std::to_string(this->maxContextTokens()));
  }
  if (entries_.count(seq) != 0) throw std::invalid_argument(seqName(seq) + " is already scheduled");
  auto [it, inserted] = entries_.emplace(seq, Entry{seq, contextTokens, 0, maxContextTokens});
  (void)inserted;
  try {
    waiting_.push_back(&it->second);
  } catch (...) {
    entries_.erase(it);
    throw;
  }
}

void Scheduler::addReusing(kv::SeqId seq, int32_t contextTokens, int32_t maxContextTokens,
                           kv::SeqId parked, int32_t reuseTokens) {
  auto pit = entries_.find(parked);
  if (pit == entries_.end() || pit->second.where != Entry::Where::Parked) {
    throw std::invalid_argument(seqName(parked) + " is not parked");
  }
  if (reuseTokens < 1 || reuseTokens >= contextTokens ||
      reuseTokens > pit->second.computedTokens) {
    throw std::invalid_argument(seqName(seq) + ": cannot reuse " + std::to_string(reuseTokens) +
                                " positions of " + seqName(parked));
  }
  add(seq, contextTokens, maxContextTokens);
  Entry& e = entries_.at(seq);
  try {
    memory_.transfer(parked, seq, reuseTokens);
  } catch (...) {
    remove(seq);
    throw;
  }
  std::erase(parked_, &pit->second);
  entries_.erase(pit);
  e.computedTokens = reuseTokens;
  e.holdsMemory = true;
}

void Scheduler::park(kv::SeqId seq) {
  Entry& e = entry(seq);
  if (e.where != Entry::Where::Running) {
    throw std::invalid_argument(seqName(seq) + " is not running");
  }
  std::erase(running_, &e);
  e.where = Entry::Where::Parked;
  parked_.push_back(&e);
}

bool Scheduler::isParked(kv::SeqId seq) const {
  auto it = entries_.find(seq);
  return it != entries_.end() && it->second.where == Entry::Where::Parked;
}

bool Scheduler::releaseIdleMemory(const Entry* keep) {
  if (!parked_.empty()) {
    const kv::SeqId seq = parked_.front()->seq;
    parked_.pop_front();
    memory_.release(seq);
    entries_.erase(seq);
    return true;
  }
  // note: a waiting request admitted with reused positions holds blocks while it waits; if they
  // were never given back, the queue's head could wait forever behind it.
  for (auto it = waiting_.rbegin(); it != waiting_.rend(); ++it) {
    Entry& e = **it;
    if (&e == keep || !e.holdsMemory) continue;
    memory_.release(e.seq);
    e.holdsMemory = false;
    e.computedTokens = 0;
    return true;
  }
  return false;
}

void Scheduler::appendToken(kv::SeqId seq) {
  Entry& e = entry(seq);
  if (e.contextTokens >= e.maxContextTokens) {
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
    case Entry::Where::Parked: std::erase(parked_, e); break;
  }
  memory_.release(seq);
  entries_.erase(it);
  return true;
}

bool Scheduler::isRunning(kv::SeqId seq) const {
  return entry(seq).where == Entry::Where::Running;
}

int32_t Scheduler::computedTokens(kv::SeqId seq) const { return entry(seq).computedTokens; }

void Scheduler::preemptNewest(StepPlan& plan) {
  Entry* victim = running_.back();
  running_.pop_back();
  memory_.release(victim->seq);
  victim->computedTokens = 0;
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
      if (e.contextTokens - e.computedTokens != 1) continue;
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
      if (pending <= 1 || budget == 0) continue;
      int32_t n = std::min(pending, budget);
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

    // 3. Admission in arrival order, no overtaking.
    while (!waiting_.empty() && budget > 0 &&
           static_cast<int32_t>(running_.size()) < config_.maxNumSeqs) {
      Entry& e = *waiting_.front();
      const int32_t n = std::min(e.contextTokens - e.computedTokens, budget);
      const int32_t need = e.holdsMemory ? memory_.blocksNeededToAppend(e.seq, n)
                                         : memory_.blocksForTokens(n);
      const int32_t reserve = running_.empty() ? 0 : watermarkBlocks_;
      while (need + reserve > memory_.freeBlocks() && releaseIdleMemory(&e)) {
      }
      if (need + reserve > memory_.freeBlocks()) break;
      const bool ok = e.holdsMemory ? memory_.tryAppend(e.seq, n)
                                    : memory_.tryAllocate(e.seq, n, e.maxContextTokens);
      if (!ok) break;
      e.holdsMemory = true;
      waiting_.pop_front();
      e.where = Entry::Where::Running;
      running_.push_back(&e);
      plan(out, e, n);
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
  if (running_.size() + waiting_.size() + parked_.size() != entries_.size()) {
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
  check(parked_, Entry::Where::Parked, "parked");
  for (const auto& [seq, e] : entries_) {
    if (e.contextTokens > e.maxContextTokens) fail(seqName(seq) + " exceeds its max context");
  }
}

}  // namespace cortex::engine
