// What the prefix cache reports to the outside world as it changes: a full block was stored under
// its hash (it can now be hit), blocks were removed (evicted: their hashes no longer hit), or every
// cached block was dropped. These are the facts a KV-aware router needs to send a request to the
// server that already holds its prefix. The cache only records them; publishing them (over ZeroMQ,
// in vLLM's wire shape) is the server's business.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace cortex::kv {

struct KVEvent {
  enum class Kind : uint8_t { BlockStored, BlockRemoved, AllBlocksCleared };
  Kind kind = Kind::BlockStored;
  // BlockStored: the hashes of consecutive full blocks of one sequence, in logical order;
  // BlockRemoved: the hashes of evicted blocks. Empty for AllBlocksCleared.
  std::vector<uint64_t> blockHashes;
  // BlockStored only: the hash of the block before the first one (nullopt: the first block is the
  // start of a sequence), and the token ids of all stored blocks, blockSizeTokens per block.
  std::optional<uint64_t> parentHash;
  std::vector<int32_t> tokenIds;
  int32_t blockSizeTokens = 0;
};

}  // namespace cortex::kv
