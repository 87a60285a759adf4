// The local-disk tier: one file per block record in a folder, at most `capacityBytes` of them,
// evicted least recently used first.
//
// Files are named "<namespace>-<key as 16 hex digits>.kvblock"; the namespace (the cache's hash
// root in hex) keeps models and KV formats apart in one folder, and files of other namespaces are
// left alone and not counted. At construction the folder is created if missing and scanned: the
// files already there (a previous run's) are indexed, oldest modification first in the LRU order,
// and evicted beyond the capacity; temporary files left by a crashed write are deleted. A record is
// written to a temporary file and renamed into place, so a reader never sees half a file; a put
// makes the folder again if it was deleted. The index lives in memory: a file deleted behind the
// store's back is a miss when read (and leaves the index), never an error that stops anything.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <list>
#include <string>
#include <unordered_map>

#include "kvtier/block_store.h"

namespace cortex::kvtier {

class DiskStore final : public BlockStore {
 public:
  // Throws std::runtime_error when the folder cannot be created or read, and
  // std::invalid_argument for a capacity of 0.
  DiskStore(std::filesystem::path dir, uint64_t capacityBytes, std::string nameSpace);

  const char* name() const override { return "disk"; }
  std::vector<uint8_t> contains(std::span<const uint64_t> keys) override;
  Fetched get(uint64_t key) override;
  bool put(uint64_t key, std::span<const std::byte> record, std::string& error) override;
  void remove(uint64_t key) override;
  bool up() const override { return up_.load(); }
  // Down after a failed write: up again once the folder exists (or can be made) and is a folder.
  bool probe() override;
  uint64_t bytesStored() const override { return bytes_.load(); }

  // The file that holds (or would hold) `key`'s record. For tests and tools.
  std::filesystem::path pathFor(uint64_t key) const;
  size_t numRecords() const { return index_.size(); }

 private:
  struct Entry {
    uint64_t bytes = 0;
    std::list<uint64_t>::iterator lru;  // position in lru_ (front: least recently used)
  };
  void scan();                       // indexes the folder's records at construction
  void touch(Entry& e);
  void forget(uint64_t key);         // leaves the index; the file stays
  void erase(uint64_t key);          // forgets and deletes the file
  void evictBeyond(uint64_t limit);  // least recently used first, until bytes_ <= limit

  std::filesystem::path dir_;
  uint64_t capacity_;
  std::string ns_;
  std::unordered_map<uint64_t, Entry> index_;
  std::list<uint64_t> lru_;
  std::atomic<uint64_t> bytes_{0};
  std::atomic<bool> up_{true};
};

}  // namespace cortex::kvtier
