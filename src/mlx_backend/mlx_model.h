// The transformer's forward pass on MLX (Apple's array framework; its CPU build runs on Linux, the
// same code runs on a Mac's GPU). It is the second model runner behind the engine's seam: the
// engine, scheduler and KV bookkeeping are the same; only the arithmetic and where K/V live change.
//
// Weights are converted once: Q4_0, Q4_1 and Q8_0 matrices become MLX affine-quantized matrices
// with groups of 32 (4 or 8 bits, float32 scale and bias per group, exactly the file's values);
// F32 and BF16 matrices keep their type; every other type is dequantized to float16.
// Activations are float32.
//
// K/V live in MLX arrays with the KV cache's block geometry: per layer slot, K and V of shape
// [numBlocks, heads, blockTokens, headDim] in the cache's storage type (f16 or bf16). The cache's
// block ids, slots and tables index them exactly as they index the CPU arena, so the KV cache's
// bookkeeping (block pool, prefix caching, hybrid groups, windows) is unchanged. A step writes its
// new K/V with one scatter per layer and reads each sequence's blocks through its block table with
// one gather per layer; the graph is built lazily and evaluated once per step.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kv/paged_view.h"
#include "model/forward_batch.h"
#include "model/transformer.h"

namespace cortex::mlxbackend {

class MlxModel {
 public:
  // Converts `model`'s weights and allocates K/V arrays for an arena of `arena`'s geometry with
  // `numBlocks` blocks. Throws model::ModelError for a storage type MLX does not read (q8).
  MlxModel(const model::TransformerModel& model, const kv::KVArena& arena, int32_t numBlocks);
  ~MlxModel();
  MlxModel(const MlxModel&) = delete;
  MlxModel& operator=(const MlxModel&) = delete;

  // Makes block `to` a copy of block `from` (every slot, K and V) before the next forward reads
  // it (the KV cache's copy on write). Thread-safe; applied at the start of the next forward.
  void copyBlock(kv::BlockId from, kv::BlockId to);

  // The same contract as model::TransformerModel::forward: validates the whole batch first
  // (model::ModelError, nothing written), then writes K/V and the logits rows.
  void forward(const model::ForwardBatch& batch, std::vector<float>& logits);

  // Steps whose K/V writes had to copy an arena array instead of updating it in place (a cost,
  // never a correctness matter: MLX arrays are values).
  int64_t arenaCopies() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cortex::mlxbackend
