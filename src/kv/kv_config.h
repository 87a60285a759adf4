// The shape and size of a KV cache: what a model states about its keys and values and what the
// engine chooses (block size, memory, storage format, layout). Kept apart from KVCache so the
// model can describe its cache without depending on the cache itself.
#pragma once

#include <cstdint>

#include "kv/paged_view.h"

namespace cortex::kv {

enum class KVLayout : uint8_t { LayerMajor, HeadMajor };
const char* toString(KVLayout layout);

struct KVCacheConfig {
  int32_t numLayers = 0;
  int32_t numKVHeads = 0;
  int32_t headDim = 0;
  int32_t blockSizeTokens = 16;
  // Give exactly one of the two: a number of blocks, or a byte budget for the whole arena
  // (numBlocks = floor(budget / bytesPerBlock)).
  int32_t numBlocks = 0;
  uint64_t memoryBudgetBytes = 0;
  KVDType dtype = KVDType::F16;
  KVLayout layout = KVLayout::LayerMajor;
  // Prefix caching: full blocks of computed tokens are kept, under a hash chained from the
  // sequence's start, for later sequences with the same tokens (KVCache::cacheComputedBlocks).
  bool prefixCaching = true;
  // Mixed into every block hash with the storage format and block size: whatever else decides a
  // block's content (the model). Caches with different seeds never share a hash.
  uint64_t prefixHashSeed = 0;
};

// Bytes of K and V that one token takes across all layers, and that one block takes. The one
// formula for these sizes: the cache sizes its arena with it, and anything else that sizes KV
// memory should call it rather than repeat it.
uint64_t bytesPerToken(const KVCacheConfig& config);
uint64_t bytesPerBlock(const KVCacheConfig& config);

}  // namespace cortex::kv
