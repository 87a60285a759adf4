// Executes one planned step on the model: the engine adds each scheduled chunk's tokens, the
// runner resolves every new token's KV slot and every sequence's block table under one KV lock
// (kv::KVCache::resolveStep), and a backend runs the forward pass on that resolved batch.
//
// The backend is the seam between the engine and the arithmetic. Two exist:
//   cpu  model::TransformerModel::forward: the kernels in src/kernels, K/V in the cache's arena;
//   mlx  mlxbackend::MlxModel (built with -DCS_WITH_MLX=ON): MLX arrays, K/V in MLX arrays
//        with the cache's block geometry (the cache's arena stays untouched).
// Both read the same resolved batch (slots and block tables from the same KV bookkeeping).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kv/kv_cache.h"
#include "model/forward_batch.h"
#include "model/transformer.h"

namespace cortex::engine {

enum class Backend { Cpu, Mlx };
const char* toString(Backend b);
// "cpu" or "mlx"; throws std::invalid_argument naming the accepted values otherwise.
Backend parseBackend(const std::string& name);
// Whether this build has the backend (mlx: configured with -DCS_WITH_MLX=ON).
bool backendAvailable(Backend b);

// A forward pass over a resolved batch (model::TransformerModel::forward's contract).
class ForwardBackend {
 public:
  virtual ~ForwardBackend() = default;
  virtual void forward(const model::ForwardBatch& batch, std::vector<float>& logits) = 0;
  // model::TransformerModel::shiftKeys's contract.
  virtual void shiftKeys(const kv::KVArena& arena, std::span<const kv::BlockRows> rows,
                         int32_t tokens) = 0;
};

class ModelRunner {
 public:
  // threads: the CPU backend's kernel threads (the caller's included); 0: one per core. The MLX
  // backend converts the model's weights here and takes over the cache's copies on write; it
  // throws model::ModelError when this build has no MLX or the cache's storage type is not one
  // MLX reads.
  ModelRunner(model::TransformerModel& model, kv::KVCache& cache, int threads,
              Backend backend = Backend::Cpu);
  ~ModelRunner();

  // Starts a new step (forgets the previous one's input).
  void clear();
  // Adds one sequence's chunk: `tokens` at positions [firstPos, firstPos + tokens.size()), which
  // the scheduler has reserved in the cache. allLogits: one logits row per token, else one for the
  // last token. A windowed sequence passes its window (kv::SeqWindow).
  void add(kv::SeqId seq, int32_t firstPos, std::span<const int32_t> tokens, bool allLogits,
           kv::SeqWindow win = {});
  // Moves windowed `seq`'s window back next to its sinks (kv::KVCache::shiftWindow) and
  // re-rotates the keys that moved; returns the positions it moved back by (0: none yet). Call
  // between steps. Throws KVError, or ModelError from a backend that cannot move keys (MLX).
  int32_t shiftWindow(kv::SeqId seq);
  // Runs the step and writes the logits rows in the order the chunks were added. Throws KVError
  // (a chunk's positions are not reserved) or ModelError; nothing is written to the cache then.
  void run(std::vector<float>& logits);
  int32_t numSequences() const { return static_cast<int32_t>(step_.size()); }

 private:
  kv::KVCache& cache_;
  std::unique_ptr<ForwardBackend> backend_;
  std::vector<kv::StepSequence> step_;
  std::vector<int32_t> tableStarts_;
  model::ForwardBatch batch_;
};

}  // namespace cortex::engine
