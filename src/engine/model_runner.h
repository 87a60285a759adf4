// Executes one planned step on the model: the engine adds each scheduled chunk's tokens, the
// runner resolves every new token's KV slot and every sequence's block table under one KV lock
// (kv::KVCache::resolveStep), and runs the forward pass on that resolved batch.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/thread_pool.h"
#include "kv/kv_cache.h"
#include "model/forward_batch.h"
#include "model/transformer.h"

namespace cortex::engine {

class ModelRunner {
 public:
  // threads: the kernel threads of the runner's own pool (the caller's included); 0: one per core.
  ModelRunner(model::TransformerModel& model, kv::KVCache& cache, int threads)
      : model_(model), cache_(cache), pool_(threads) {}

  // Starts a new step (forgets the previous one's input).
  void clear();
  // Adds one sequence's chunk: `tokens` at positions [firstPos, firstPos + tokens.size()), which
  // the scheduler has reserved in the cache. allLogits: one logits row per token, else one for the
  // last token.
  void add(kv::SeqId seq, int32_t firstPos, std::span<const int32_t> tokens, bool allLogits);
  // Runs the step and writes the logits rows in the order the chunks were added. Throws KVError
  // (a chunk's positions are not reserved) or ModelError; nothing is written to the cache then.
  void run(std::vector<float>& logits);
  int32_t numSequences() const { return static_cast<int32_t>(step_.size()); }

 private:
  model::TransformerModel& model_;
  kv::KVCache& cache_;
  kernels::ThreadPool pool_;
  std::vector<kv::StepSequence> step_;
  std::vector<int32_t> tableStarts_;
  model::ForwardBatch batch_;
};

}  // namespace cortex::engine
