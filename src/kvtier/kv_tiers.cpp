#include "kvtier/kv_tiers.h"

#include <algorithm>
#include <chrono>
#include <iostream>
#include <stdexcept>

#include "kvtier/block_record.h"

namespace cortex::kvtier {

KVTiers::KVTiers(kv::KVCache& cache, std::vector<std::unique_ptr<BlockStore>> stores,
                 Options options)
    : cache_(cache), stores_(std::move(stores)), options_(std::move(options)) {
  if (stores_.empty()) throw std::invalid_argument("KV tiers: no tier given");
  if (!cache_.prefixCaching()) {
    throw std::invalid_argument("KV tiers keep cached prefix blocks: prefix caching must be on");
  }
  // Header, tokens, payload and checksum of one record (block_record.h).
  recordBytes_ = 64 + static_cast<size_t>(cache_.blockSizeTokens()) * 4 +
                 cache_.blockPayloadBytes() + 8;
  counters_.resize(stores_.size());
  failing_.assign(stores_.size(), false);
  cache_.recordNewBlocks(true);
  thread_ = std::thread([this] { run(); });
}

KVTiers::~KVTiers() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
  cache_.recordNewBlocks(false);
}

void KVTiers::warn(const std::string& message) const {
  if (options_.warn) {
    options_.warn(message);
  } else {
    std::cerr << "warning: " << message << "\n";
  }
}

void KVTiers::storeNewBlocks() {
  scratch_.clear();
  cache_.takeNewBlocks(scratch_);
  if (scratch_.empty()) return;
  {
    std::lock_guard lock(mu_);
    for (kv::KVCache::ExportedBlock& b : scratch_) {
      if (pendingBytes_ + b.payload.size() > options_.maxPendingStoreBytes) {
        ++droppedStores_;
        continue;
      }
      pendingBytes_ += b.payload.size();
      storeQueue_.push_back(std::move(b));
      ++storesQueued_;
    }
  }
  scratch_.clear();
  cv_.notify_all();
}

KVTiers::Ticket KVTiers::startLoad(std::span<const int32_t> tokens, int32_t firstBlock,
                                   int32_t endBlock, bool afterStores) {
  const auto B = static_cast<size_t>(cache_.blockSizeTokens());
  if (firstBlock < 0 || endBlock <= firstBlock || tokens.size() < endBlock * B) {
    throw std::invalid_argument("KV tiers: blocks [" + std::to_string(firstBlock) + ", " +
                                std::to_string(endBlock) + ") are not in a prefix of " +
                                std::to_string(tokens.size()) + " tokens");
  }
  auto job = std::make_shared<LoadJob>();
  job->tokens.assign(tokens.begin(), tokens.begin() + static_cast<long>(endBlock * B));
  job->firstBlock = firstBlock;
  job->endBlock = endBlock;
  {
    std::lock_guard lock(mu_);
    job->ticket = nextTicket_++;
    job->afterStore = afterStores ? storesQueued_ : 0;
    loads_.emplace(job->ticket, job);
    loadQueue_.push_back(job);
  }
  cv_.notify_all();
  return job->ticket;
}

bool KVTiers::finishLoad(Ticket ticket, std::vector<TierHit>& hits) {
  std::shared_ptr<LoadJob> job;
  {
    std::lock_guard lock(mu_);
    auto it = loads_.find(ticket);
    if (it == loads_.end()) return true;  // nothing to wait for
    if (!it->second->done) return false;
    job = std::move(it->second);
    loads_.erase(it);
  }
  if (job->blocks.empty()) return true;
  std::vector<kv::KVCache::TierBlock> blocks;
  blocks.reserve(job->blocks.size());
  for (const LoadedBlock& b : job->blocks) {
    blocks.push_back({b.index, b.group, b.record.data() + b.payloadOffset});
  }
  int32_t installed = 0;
  try {
    installed = cache_.installTierBlocks(job->tokens, blocks);
  } catch (const kv::KVError& e) {
    warn(std::string("KV tiers: loaded blocks not installed: ") + e.what());
    return true;
  }
  const int32_t B = cache_.blockSizeTokens();
  const int32_t end = job->firstBlock + installed;
  for (const LoadedBlock& b : job->blocks) {
    if (b.index >= end || b.group != 0) continue;
    if (!hits.empty() && hits.back().tier == b.tier &&
        hits.back().firstToken + hits.back().tokens == b.index * B) {
      hits.back().tokens += B;
    } else {
      hits.push_back({b.tier, b.index * B, B});
    }
  }
  return true;
}

void KVTiers::cancelLoad(Ticket ticket) {
  std::lock_guard lock(mu_);
  loads_.erase(ticket);
}

void KVTiers::setRecomputeRate(double tokensPerSecond) {
  std::lock_guard lock(mu_);
  recomputeRate_ = tokensPerSecond;
}

void KVTiers::flush() {
  std::unique_lock lock(mu_);
  idle_.wait(lock, [&] { return stopping_ || (storeQueue_.empty() && !storing_); });
}

TiersStats KVTiers::stats() const {
  TiersStats s;
  {
    std::lock_guard lock(mu_);
    s.tiers = counters_;
    s.droppedStores = droppedStores_;
    s.pendingStoreBytes = pendingBytes_;
    s.recomputeTokensPerSecond = recomputeRate_;
  }
  for (size_t t = 0; t < stores_.size(); ++t) {
    s.tiers[t].name = stores_[t]->name();
    s.tiers[t].up = stores_[t]->up();
    s.tiers[t].bytesStored = stores_[t]->bytesStored();
  }
  return s;
}

void KVTiers::run() {
  for (;;) {
    std::shared_ptr<LoadJob> job;
    kv::KVCache::ExportedBlock block;
    {
      std::unique_lock lock(mu_);
      const auto work = [&] { return stopping_ || !loadQueue_.empty() || !storeQueue_.empty(); };
      if (!cv_.wait_for(lock, std::chrono::seconds(1), work)) {
        lock.unlock();
        for (auto& s : stores_) {
          if (!s->up()) s->probe();
        }
        continue;
      }
      if (stopping_) break;
      // A waiting request comes before write-through, unless it waits for those writes.
      if (!loadQueue_.empty() &&
          (loadQueue_.front()->afterStore <= storesDone_ || storeQueue_.empty())) {
        job = std::move(loadQueue_.front());
        loadQueue_.pop_front();
        if (loads_.count(job->ticket) == 0) continue;  // cancelled
      } else {
        block = std::move(storeQueue_.front());
        storeQueue_.pop_front();
        storing_ = true;
      }
    }
    if (job) {
      load(*job);
      {
        std::lock_guard lock(mu_);
        job->done = true;
      }
      if (options_.onLoadDone) options_.onLoadDone();
      continue;
    }
    store(block);
    std::lock_guard lock(mu_);
    pendingBytes_ -= block.payload.size();
    ++storesDone_;
    storing_ = false;
    if (storeQueue_.empty()) idle_.notify_all();
  }
  std::lock_guard lock(mu_);
  storeQueue_.clear();
  pendingBytes_ = 0;
  idle_.notify_all();
}

void KVTiers::store(const kv::KVCache::ExportedBlock& block) {
  const std::vector<std::byte> record = encodeBlockRecord(cache_.hashRoot(), block);
  for (size_t t = 0; t < stores_.size(); ++t) {
    std::string error;
    const bool ok = stores_[t]->put(block.key, record, error);
    bool warnNow = false;
    {
      std::lock_guard lock(mu_);
      ++(ok ? counters_[t].storedBlocks : counters_[t].storeErrors);
      warnNow = !ok && !failing_[t];
      failing_[t] = !ok;
    }
    if (warnNow) {
      warn(std::string("KV tier ") + stores_[t]->name() + ": cannot store blocks (" + error +
           "); requests go on without it");
    }
  }
}

bool KVTiers::worthReading(size_t t, int32_t blocks) const {
  std::lock_guard lock(mu_);
  const double readRate = counters_[t].readBytesPerSecond;
  if (readRate <= 0 || recomputeRate_ <= 0) return true;
  const double readSeconds = static_cast<double>(blocks) * cache_.numGroups() *
                             static_cast<double>(recordBytes_) / readRate;
  const double computeSeconds =
      static_cast<double>(blocks) * cache_.blockSizeTokens() / recomputeRate_;
  return readSeconds < computeSeconds;
}

void KVTiers::load(LoadJob& job) {
  const std::vector<uint64_t> chain = cache_.blockHashes(job.tokens);
  const int32_t G = cache_.numGroups();
  int32_t cur = job.firstBlock;
  for (size_t t = 0; t < stores_.size() && cur < job.endBlock; ++t) {
    std::vector<uint64_t> keys;
    for (int32_t i = cur; i < job.endBlock; ++i) {
      for (int32_t g = 0; g < G; ++g) {
        keys.push_back(cache_.tierKey(chain[static_cast<size_t>(i)], g));
      }
    }
    const std::vector<uint8_t> present = stores_[t]->contains(keys);
    int32_t run = 0;
    while (cur + run < job.endBlock) {
      const auto at = static_cast<size_t>(run) * static_cast<size_t>(G);
      if (!std::all_of(present.begin() + static_cast<long>(at),
                       present.begin() + static_cast<long>(at + static_cast<size_t>(G)),
                       [](uint8_t p) { return p != 0; })) {
        break;
      }
      ++run;
    }
    if (run == 0) continue;
    if (!worthReading(t, run)) {
      std::lock_guard lock(mu_);
      ++counters_[t].skippedLoads;
      continue;
    }
    cur += readRun(job, t, chain, cur, run);
  }
}

int32_t KVTiers::readRun(LoadJob& job, size_t t, const std::vector<uint64_t>& chain,
                         int32_t from, int32_t count) {
  using Clock = std::chrono::steady_clock;
  const auto B = static_cast<size_t>(cache_.blockSizeTokens());
  const int32_t G = cache_.numGroups();
  BlockStore& store = *stores_[t];
  const auto started = Clock::now();
  uint64_t bytes = 0;
  int32_t got = 0;
  for (int32_t i = from; i < from + count; ++i) {
    const auto index = static_cast<size_t>(i);
    bool whole = true;
    for (int32_t g = 0; g < G && whole; ++g) {
      const uint64_t key = cache_.tierKey(chain[index], g);
      Fetched f = store.get(key);
      if (f.status == Fetched::Status::Missing) {
        std::lock_guard lock(mu_);
        ++counters_[t].lostRecords;
        whole = false;
        break;
      }
      if (f.status == Fetched::Status::Failed) {
        bool warnNow = false;
        {
          std::lock_guard lock(mu_);
          ++counters_[t].readErrors;
          warnNow = !failing_[t];
          failing_[t] = true;
        }
        if (warnNow) {
          warn(std::string("KV tier ") + store.name() + ": cannot read blocks (" + f.error +
               "); computing them instead");
        }
        whole = false;
        break;
      }
      ExpectedBlock expect;
      expect.hashRoot = cache_.hashRoot();
      expect.key = key;
      expect.parent = index == 0 ? cache_.hashRoot() : chain[index - 1];
      expect.index = i;
      expect.group = g;
      expect.tokens = std::span<const int32_t>(job.tokens).subspan(index * B, B);
      expect.payloadBytes = cache_.blockPayloadBytes();
      std::span<const std::byte> payload;
      const std::string bad = checkBlockRecord(f.bytes, expect, payload);
      if (!bad.empty()) {
        store.remove(key);
        {
          std::lock_guard lock(mu_);
          ++counters_[t].badRecords;
        }
        warn(std::string("KV tier ") + store.name() + ": record " + std::to_string(key) +
             " refused and deleted: " + bad);
        whole = false;
        break;
      }
      bytes += f.bytes.size();
      LoadedBlock& b = job.blocks.emplace_back();
      b.index = i;
      b.group = g;
      b.tier = static_cast<int32_t>(t);
      b.payloadOffset = static_cast<size_t>(payload.data() - f.bytes.data());
      b.record = std::move(f.bytes);
    }
    if (!whole) {
      while (!job.blocks.empty() && job.blocks.back().index == i) job.blocks.pop_back();
      break;
    }
    ++got;
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - started).count();
  std::lock_guard lock(mu_);
  TierCounters& c = counters_[t];
  c.loadedBlocks += static_cast<uint64_t>(got) * static_cast<uint64_t>(G);
  c.loadedBytes += bytes;
  if (got > 0) {
    failing_[t] = false;
    if (seconds > 0) {
      const double rate = static_cast<double>(bytes) / seconds;
      c.readBytesPerSecond =
          c.readBytesPerSecond <= 0 ? rate : 0.7 * c.readBytesPerSecond + 0.3 * rate;
    }
  }
  return got;
}

}  // namespace cortex::kvtier
