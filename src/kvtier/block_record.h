// The bytes a lower tier keeps for one KV block, and their check when they come back.
//
// Format (version 1; integers little-endian as the host stores them, which every supported
// machine is):
//   char[8]  "CSKVBLK1"
//   u32      version (1)
//   u64      the cache's hash root (model fingerprint, KV format, block size, shape, groups)
//   u64      key: the block's hash in the pool (KVCache::tierKey)
//   u64      parent: the chained hash of the blocks before it
//   u32 x 4  logical index, group, block tokens B, payload bytes p
//   i32 x B  token ids
//   p bytes  K/V payload (KVCache::copyBlockOut's layout)
//   u64      XXH3-64 of every byte before it
// A record read back is trusted only when every field matches what the reader expects for that
// key (its own hash root, the prefix's tokens and parent, its block size and payload size) and
// the checksum holds: a truncated, damaged or foreign record is refused with the reason.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kv/kv_cache.h"

namespace cortex::kvtier {

std::vector<std::byte> encodeBlockRecord(uint64_t hashRoot, const kv::KVCache::ExportedBlock& b);

// What the reader expects of the record under one key.
struct ExpectedBlock {
  uint64_t hashRoot = 0;
  uint64_t key = 0;
  uint64_t parent = 0;
  int32_t index = 0;
  int32_t group = 0;
  std::span<const int32_t> tokens;  // the block's token ids in the reader's prefix
  size_t payloadBytes = 0;
};

// Empty when `record` is the block `expect` describes, with `payload` pointing into it;
// otherwise why not (and `payload` is left empty).
std::string checkBlockRecord(std::span<const std::byte> record, const ExpectedBlock& expect,
                             std::span<const std::byte>& payload);

}  // namespace cortex::kvtier
