// KVTiers: the tiers below the KV pool (local disk, Redis) and the worker thread that writes
// cached blocks to them and reads them back.
//
// Writing (write-through): every block the prefix cache hashes is copied out of the arena on the
// engine's thread (storeNewBlocks, a memcpy per block) and queued; the worker encodes it
// (block_record.h) and puts it in every tier. So a prefix computed once is in the tiers while it
// is still in the pool: a restarted server finds it on disk, and another server finds it in Redis.
// The queue holds at most maxPendingStoreBytes; blocks beyond are dropped and counted.
//
// Reading: for a new request, the engine asks for the blocks of its prompt beyond what the pool
// holds (startLoad) and the request waits in its own loading state while the worker reads them:
// tier by tier (disk before Redis), the longest run of whole blocks (every layer group) the tier
// holds, each record checked against the prefix before it is kept. A tier's hit is read only when
// that is faster than computing it: the worker measures each tier's read rate and the engine
// reports its prefill rate (setRecomputeRate); until both are known it reads. finishLoad then
// installs the blocks in the pool as cached blocks, where the request's admission finds them like
// any prefix hit. Loading stops at the first block a tier cannot give (missing, unreachable,
// damaged: a damaged record is deleted from its tier), and the rest is computed, so no tier
// failure ever fails a request.
//
// A tier that is down (a failed write or read, a lost connection) is probed by the worker once a
// second while it is idle, so it comes back (and `up` says so) without waiting for traffic.
//
// Threads: storeNewBlocks, startLoad, finishLoad, cancelLoad and setRecomputeRate come from the
// engine's thread; stats and flush from any.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "kv/kv_cache.h"
#include "kvtier/block_store.h"

namespace cortex::kvtier {

struct TierCounters {
  std::string name;               // "disk", "redis"
  bool up = false;                // the medium answers (BlockStore::up)
  uint64_t bytesStored = 0;       // BlockStore::bytesStored
  uint64_t storedBlocks = 0;      // records put (written, or found there already)
  uint64_t storeErrors = 0;       // puts that failed
  uint64_t loadedBlocks = 0;      // records read back and verified
  uint64_t loadedBytes = 0;
  uint64_t readErrors = 0;        // reads that failed (I/O, connection)
  uint64_t lostRecords = 0;       // records the tier listed but no longer had (deleted, expired)
  uint64_t badRecords = 0;        // records refused (damaged, truncated, foreign) and deleted
  uint64_t skippedLoads = 0;      // hits left to compute because reading would take longer
  double readBytesPerSecond = 0;  // measured read rate (0: not measured yet)
};

struct TiersStats {
  std::vector<TierCounters> tiers;  // in lookup order
  uint64_t droppedStores = 0;       // blocks not written: the queue was full
  uint64_t pendingStoreBytes = 0;   // copied out, not written yet
  double recomputeTokensPerSecond = 0;
};

// A run of a request's prompt that one tier served: tokens [firstToken, firstToken + tokens).
struct TierHit {
  int32_t tier = 0;  // index into TiersStats::tiers
  int32_t firstToken = 0;
  int32_t tokens = 0;
};

class KVTiers {
 public:
  struct Options {
    uint64_t maxPendingStoreBytes = 256ull << 20;
    // Where warnings go (a tier failing, a damaged record); stderr by default.
    std::function<void(const std::string&)> warn;
    // Called on the worker when a load is done (it must only signal, e.g. wake the engine).
    std::function<void()> onLoadDone;
  };
  using Ticket = uint64_t;

  // `stores` in lookup order (at least one). The cache must keep prefix caching on and outlive
  // this; recording of new blocks is turned on here.
  KVTiers(kv::KVCache& cache, std::vector<std::unique_ptr<BlockStore>> stores, Options options);
  // Stops the worker; stores still queued are dropped.
  ~KVTiers();
  KVTiers(const KVTiers&) = delete;
  KVTiers& operator=(const KVTiers&) = delete;

  // Queues the blocks hashed since the last call for every tier.
  void storeNewBlocks();
  // Starts reading blocks [firstBlock, endBlock) of the prefix `tokens` (at least endBlock
  // blocks long) from the tiers. With afterStores, the read waits until every block queued for
  // writing before it is written (a swapped-out request reads back what it just wrote);
  // otherwise it goes before them.
  Ticket startLoad(std::span<const int32_t> tokens, int32_t firstBlock, int32_t endBlock,
                   bool afterStores = false);
  // False while the load runs. When it is done: installs the blocks it read as cached blocks
  // (as many whole blocks as the pool's free blocks allow), appends what each tier served to
  // `hits`, forgets the ticket and returns true.
  bool finishLoad(Ticket ticket, std::vector<TierHit>& hits);
  // Forgets a load (its request went away); no-op for an unknown ticket.
  void cancelLoad(Ticket ticket);
  // The engine's measured prefill rate, for the read-or-compute decision.
  void setRecomputeRate(double tokensPerSecond);
  // Waits until every queued block is written.
  void flush();
  TiersStats stats() const;

 private:
  struct LoadedBlock {
    int32_t index = 0;
    int32_t group = 0;
    int32_t tier = 0;
    std::vector<std::byte> record;
    size_t payloadOffset = 0;
  };
  struct LoadJob {
    Ticket ticket = 0;
    std::vector<int32_t> tokens;  // the prefix, endBlock whole blocks
    int32_t firstBlock = 0;
    int32_t endBlock = 0;
    bool done = false;
    uint64_t afterStore = 0;  // stores to finish first (storesQueued_ when it was started)
    std::vector<LoadedBlock> blocks;  // index order
  };
  void run();
  void load(LoadJob& job);
  void store(const kv::KVCache::ExportedBlock& block);
  // Reads blocks [from, from + count) of `job` from tier t; returns how many whole blocks it got.
  int32_t readRun(LoadJob& job, size_t t, const std::vector<uint64_t>& chain, int32_t from,
                  int32_t count);
  bool worthReading(size_t t, int32_t blocks) const;
  void warn(const std::string& message) const;

  kv::KVCache& cache_;
  std::vector<std::unique_ptr<BlockStore>> stores_;
  Options options_;
  size_t recordBytes_ = 0;  // one encoded record (estimate for the read-or-compute decision)

  mutable std::mutex mu_;
  std::condition_variable cv_;       // work for the worker
  std::condition_variable idle_;     // the store queue ran empty
  bool stopping_ = false;
  bool storing_ = false;             // the worker is writing a block
  std::deque<kv::KVCache::ExportedBlock> storeQueue_;
  std::deque<std::shared_ptr<LoadJob>> loadQueue_;
  std::unordered_map<Ticket, std::shared_ptr<LoadJob>> loads_;
  Ticket nextTicket_ = 1;
  std::vector<TierCounters> counters_;  // name/up/bytesStored filled in by stats()
  std::vector<bool> failing_;           // per tier: the last operation failed (warn once)
  uint64_t droppedStores_ = 0;
  uint64_t storesQueued_ = 0;  // blocks ever queued for writing
  uint64_t storesDone_ = 0;    // of those, written (or failed)
  uint64_t pendingBytes_ = 0;
  double recomputeRate_ = 0;
  std::vector<kv::KVCache::ExportedBlock> scratch_;  // engine thread
  std::thread thread_;
};

}  // namespace cortex::kvtier
