// BlockStore: one tier below the KV pool (local disk, Redis). It keeps opaque block records (the
// bytes of block_record.h) under 64-bit keys, the cache's per-group block hashes, which already
// cover the model, the KV format and the tokens up to the block's end. A store is called from one
// thread (the tier worker, kv_tiers.h); only its counters may be read from others.
//
// A store never throws for what happens to its medium (a missing or unreadable file, a dropped
// connection): those are a miss or a failure with a message, and the caller falls back to
// recomputing. Whether a record's bytes are sound is the caller's check (block_record.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace cortex::kvtier {

struct Fetched {
  enum class Status { Found, Missing, Failed } status = Status::Missing;
  std::vector<std::byte> bytes;  // the record, when Found
  std::string error;             // why, when Failed
};

class BlockStore {
 public:
  virtual ~BlockStore() = default;
  // "disk" or "redis": the tier's label in metrics and messages.
  virtual const char* name() const = 0;
  // For each key, whether the store holds it now (1) or not (0); a later get may still miss (the
  // record expired or was deleted meanwhile). All 0 when the store cannot be reached.
  virtual std::vector<uint8_t> contains(std::span<const uint64_t> keys) = 0;
  // The record under `key`. A hit counts as a use for the store's eviction order.
  virtual Fetched get(uint64_t key) = 0;
  // Stores a record under `key`; a key already held keeps its record and counts as a use. False,
  // with `error` set, when it could not be stored.
  virtual bool put(uint64_t key, std::span<const std::byte> record, std::string& error) = 0;
  // Drops the record under `key` (one found damaged); no-op when there is none.
  virtual void remove(uint64_t key) = 0;
  // Whether the medium answers now (the Redis connection is up; the folder is usable). Any thread.
  virtual bool up() const = 0;
  // When down, tries to reach the medium again (as the next operation would); returns up().
  virtual bool probe() = 0;
  // Bytes of records this store holds, as far as it knows (the disk tier's files; 0 where the
  // store cannot tell). Any thread.
  virtual uint64_t bytesStored() const = 0;
};

}  // namespace cortex::kvtier
