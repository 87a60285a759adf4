// The Llama transformer over the paged KV cache: weights read in place from a GGUF file, a
// batch-first forward pass, float32 activations.
//
// One forward() call advances a batch of sequences, each with its own number of new tokens
// (prompt chunks and single decode tokens together), so every weight matrix is read once per step
// for the whole batch. Each new token's K/V go into the cache through its slot; attention reads
// each sequence's K/V in place through its paged view, with causal masking.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "kernels/weights.h"
#include "kv/kv_cache.h"
#include "model/gguf.h"

namespace cortex::model {

struct LlamaHParams {
  int32_t nLayers = 0;
  int32_t nEmbd = 0;      // hidden size
  int32_t nHead = 0;      // query heads
  int32_t nHeadKV = 0;    // key/value heads (grouped-query attention)
  int32_t headDim = 0;
  int32_t nRot = 0;       // RoPE dimensions per head (<= headDim)
  int32_t nFF = 0;        // feed-forward hidden size
  int32_t nVocab = 0;
  int32_t nCtxTrain = 0;  // context length the model was trained for (tokens)
  float ropeTheta = 10000.0f;
  float rmsEps = 1e-5f;
};

// New tokens of one sequence in a batch. Positions [firstPos, firstPos + tokens.size()) must
// already be reserved in the cache (allocateFor / appendTokens); earlier positions must hold K/V.
struct BatchSequence {
  kv::SeqId seq = 0;
  std::span<const int32_t> tokens;
  int32_t firstPos = 0;
  bool allLogits = false;  // logits for every new token (scoring), else for the last one only
};

class LlamaModel {
 public:
  // Maps the GGUF file and checks everything the forward pass relies on: architecture "llama",
  // hyperparameters present and consistent, every tensor present with the expected shape and a
  // supported type. Throws ModelError naming the file and the problem.
  static std::unique_ptr<LlamaModel> load(const std::string& path);

  const LlamaHParams& hparams() const { return hp_; }
  const GGUFFile& file() const { return file_; }

  // A KV cache configuration for this model's shape (layers, KV heads, head dim).
  kv::KVCacheConfig kvCacheConfig(int32_t blockSizeTokens, uint64_t memoryBudgetBytes,
                                  kv::KVDType dtype = kv::KVDType::F16) const;

  // Runs the batch and writes logits: one row of nVocab floats per new token of a sequence with
  // allLogits, else one row for its last token, in batch order. Throws ModelError for a token id
  // outside the vocabulary or a position beyond the trained context, and kv::KVError for a
  // sequence whose positions are not reserved; nothing is written to the cache in those cases.
  // Not reentrant: one forward at a time per model (it reuses internal buffers).
  void forward(std::span<const BatchSequence> batch, kv::KVCache& cache,
               std::vector<float>& logits);

 private:
  struct Layer {
    const float* attnNorm = nullptr;
    kernels::WeightMatrix wq, wk, wv, wo;
    const float* ffnNorm = nullptr;
    kernels::WeightMatrix wGate, wUp, wDown;
  };

  explicit LlamaModel(GGUFFile file);
  void resize(int64_t nTokens, int32_t maxContext);

  GGUFFile file_;
  LlamaHParams hp_;
  kernels::WeightMatrix tokenEmbd_;
  kernels::WeightMatrix output_;
  const float* outputNorm_ = nullptr;
  std::vector<Layer> layers_;
  std::unique_ptr<kernels::RopeTable> rope_;

  // Activation buffers, grown on demand and reused (no allocation in steady state).
  std::vector<float> x_, xn_, q_, k_, v_, attn_, tmp_, gate_, up_, scratch_, lastRows_;
  std::vector<int32_t> positions_;
  std::vector<kv::TokenSlot> slots_;
};

}  // namespace cortex::model
