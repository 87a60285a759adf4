// The input of one forward step, fully resolved: token ids, their positions, the KV slot each new
// token's keys and values go to, and each sequence's block table for attention to read through.
// The engine fills it once per step (one KV lock for the whole batch, kv::KVCache::resolveStep);
// the model only reads it, so the forward pass never calls KV bookkeeping.
#pragma once

#include <cstdint>
#include <vector>

#include "kv/paged_view.h"

namespace cortex::model {

// One sequence's part of the batch.
struct ForwardSequence {
  int32_t firstPos = 0;    // position of its first new token; earlier positions hold K/V
  int32_t numTokens = 0;   // new tokens, >= 1
  // Its block tables, one per KV group (arena.numGroups): group g's is
  // blockTables[tableStart + g * numBlocks, tableStart + (g + 1) * numBlocks).
  int32_t tableStart = 0;
  int32_t numBlocks = 0;   // covers positions [0, firstPos + numTokens)
  bool allLogits = false;  // logits for every new token (scoring), else for the last one only
  // A windowed sequence (kv::SeqWindow): the layers that read every position read only keys
  // [0, sinks) and the last `window` ones (0: every key).
  int32_t window = 0;
  int32_t sinks = 0;
};

struct ForwardBatch {
  kv::KVArena arena;                // where K/V live (the cache's arena)
  std::vector<ForwardSequence> seqs;
  // Per new token, all sequences concatenated in order:
  std::vector<int32_t> tokens;      // token ids
  std::vector<int32_t> positions;   // absolute positions
  std::vector<kv::TokenSlot> slots; // where its K/V are written: arena.numGroups per token, the
                                    // token's slot in group g at [token * numGroups + g]
  std::vector<kv::BlockId> blockTables;

  void clear() {
    seqs.clear();
    tokens.clear();
    positions.clear();
    slots.clear();
    blockTables.clear();
  }
};

}  // namespace cortex::model
