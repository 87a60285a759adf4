// The shape and size of a KV cache: what a model states about its keys and values and what the
// engine chooses (block size, memory, storage format, layout). Kept apart from KVCache so the
// model can describe its cache without depending on the cache itself.
#pragma once

#include <cstdint>
#include <vector>

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
  // The most the pool may grow to while in use (KVCache::resize), in bytes: address space for it
  // is reserved up front, memory is committed only for the blocks in use. 0: the pool's size.
  uint64_t maxMemoryBytes = 0;
  KVDType dtype = KVDType::F16;
  KVLayout layout = KVLayout::LayerMajor;
  // Prefix caching: full blocks of computed tokens are kept, under a hash chained from the
  // sequence's start, for later sequences with the same tokens (KVCache::cacheComputedBlocks).
  bool prefixCaching = true;
  // Mixed into every block hash with the storage format and block size: whatever else decides a
  // block's content (the model). Caches with different seeds never share a hash.
  uint64_t prefixHashSeed = 0;
  // Each layer's sliding window in tokens: a query at position p reads only keys in (p - W, p].
  // 0 (or an empty list) means the layer reads every earlier position.
  std::vector<int32_t> layerWindows;
  // Hybrid cache: layers are grouped by window (kvGroups) and a windowed group gives back, as a
  // sequence grows, the blocks its window no longer sees. Off: every layer keeps every position.
  bool hybrid = true;
};

// A sequence that keeps only part of its positions (StreamingLLM): its first `sinks` positions
// for good (attention sinks) and the last `window`; blocks that fall wholly between the two go
// back to the pool as it grows, so its memory is bounded by sinks + window + one step. Applies to
// the layers that read every position (global groups); sliding-window layers keep their own
// window. window 0: the sequence keeps every position (sinks must be 0 then).
struct SeqWindow {
  int32_t window = 0;
  int32_t sinks = 0;
  bool on() const { return window > 0; }
};

// How the cache groups layers (the hybrid KV cache). All groups hold the same number of layers,
// layersPerGroup, so one physical block (a page: B tokens of K and V for layersPerGroup layers) can
// serve any group, and all groups draw from one pool. Layers with equal windows share groups, in
// layer order; layersPerGroup is the greatest common divisor of the counts of layers per window,
// so no group is padded. Without windows (or with hybrid off) there is one group of all layers and
// a block holds every layer, as in a plain paged cache.
struct KVGroup {
  int32_t window = 0;           // 0: global (keeps every position)
  std::vector<int32_t> layers;  // layersPerGroup layer indices, ascending
};

struct KVGroups {
  int32_t layersPerGroup = 0;
  std::vector<KVGroup> groups;        // global groups first, then windowed ones by window
  std::vector<KVLayerPlace> places;   // per layer: its group and its slot inside the group's pages
};

// Throws KVError{InvalidArgument} for a window list whose size is not numLayers or that holds a
// negative window.
KVGroups kvGroups(const KVCacheConfig& config);

// Bytes of one block (a page of layersPerGroup layers, K and V). The one formula for KV sizes: the
// cache sizes its arena with these, and anything else that sizes KV memory should call them
// rather than repeat them.
uint64_t bytesPerBlock(const KVCacheConfig& config);
// Blocks that one sequence holds at most on its way to `tokens` positions when at most
// `stepTokens` of them are computed per forward step: every position in global groups, the
// window plus the step's positions in windowed ones.
int64_t blocksForSequence(const KVCacheConfig& config, int64_t tokens, int32_t stepTokens);
uint64_t bytesForSequence(const KVCacheConfig& config, int64_t tokens, int32_t stepTokens);
// Blocks that a sequence with `win` (on) holds at most, however long it runs: its sink blocks and
// its window's blocks in global groups, each sliding-window group's own window.
int64_t blocksForWindowedSequence(const KVCacheConfig& config, SeqWindow win, int32_t stepTokens);

}  // namespace cortex::kv
