// The Llama transformer: weights read in place from a GGUF file, a batch-first forward pass,
// float32 activations.
//
// One forward() call advances a batch of sequences, each with its own number of new tokens
// (prompt chunks and single decode tokens together), so every weight matrix is read once per step
// for the whole batch. The batch arrives resolved (forward_batch.h): each new token's K/V are
// written to its slot and attention reads each sequence's K/V in place through its block table,
// with causal masking. The model never touches the KV cache's bookkeeping.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kv/kv_config.h"
#include "model/forward_batch.h"
#include "model/gguf.h"

namespace cortex::kernels {
class ThreadPool;
}  // namespace cortex::kernels

namespace cortex::model {

struct HParams {
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

// How the weight matrices are multiplied (kernels/quant.h):
//   Int8: Q4_0, Q4_1 and Q8_0 matrices are repacked at load and multiplied with integer dot
//         products against activations quantized to int8 per token and block of 32 (other
//         types take the float path); the default, and the fastest.
//   F32:  every matrix is dequantized in registers and multiplied in float32 against float32
//         activations (the path checked against the float64 reference at 1e-3).
// Both are batch-invariant: a token's logits do not depend on its batch, chunking or threads.
enum class Precision { Int8, F32 };
const char* toString(Precision p);
// "int8" or "f32"; throws std::invalid_argument naming the accepted values otherwise.
Precision parsePrecision(const std::string& name);

class TransformerModel {
 public:
  // Maps the GGUF file and checks everything the forward pass relies on: architecture "llama",
  // hyperparameters present and consistent, every tensor present with the expected shape and a
  // supported type. Throws ModelError naming the file and the problem. With Precision::Int8 the
  // quantized matrices are repacked here (a copy of their size in memory, made once).
  static std::unique_ptr<TransformerModel> load(const std::string& path,
                                          Precision precision = Precision::Int8);

  const HParams& hparams() const { return hp_; }
  const GGUFFile& file() const { return file_; }
  Precision precision() const { return precision_; }

  // A KV cache configuration for this model's shape (layers, KV heads, head dim).
  kv::KVCacheConfig kvCacheConfig(int32_t blockSizeTokens, uint64_t memoryBudgetBytes,
                                  kv::KVDType dtype = kv::KVDType::F16) const;

  // Runs the batch and writes logits: one row of nVocab floats per new token of a sequence with
  // allLogits, else one row for its last token, in batch order. Throws ModelError, with nothing
  // written to the KV arena, for a batch that does not fit this model: a token id outside the
  // vocabulary, a position beyond the trained context, inconsistent counts, or an arena of another
  // shape. The kernels run on `pool`'s threads. Not reentrant: one forward at a time per model (it
  // reuses internal buffers).
  void forward(const ForwardBatch& batch, kernels::ThreadPool& pool, std::vector<float>& logits);
  ~TransformerModel();

 private:
  struct Weights;  // the weight matrices and RoPE table (kernel types stay out of this header)

  TransformerModel(GGUFFile file, Precision precision);
  void resize(int64_t nTokens, int32_t maxContext, const kernels::ThreadPool& pool);
  // Repacks the Q4_0/Q4_1/Q8_0 matrices for the integer path (Precision::Int8).
  void packWeights();
  void validate(const ForwardBatch& batch, int64_t& nOutRows, int32_t& maxContext) const;

  GGUFFile file_;
  Precision precision_;
  HParams hp_;
  std::unique_ptr<Weights> w_;

  // Activation buffers, grown on demand and reused (no allocation in steady state).
  std::vector<float> x_, xn_, q_, k_, v_, attn_, tmp_, gate_, up_, scratch_, lastRows_;
};

}  // namespace cortex::model
