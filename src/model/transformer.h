// The decoder-only transformer: weights read in place from a GGUF file, a batch-first forward pass,
// float32 activations. One implementation serves the architectures named by
// general.architecture, which differ only in switches read from the file:
//   llama   RMSNorm, SwiGLU, RoPE on adjacent pairs (optionally Llama 3's per-frequency factors
//           from rope_freqs.weight, or linear scaling);
//   qwen2   llama plus Q/K/V biases, RoPE on split halves (NeoX);
//   qwen3   llama plus per-head RMSNorm of Q and K before RoPE (QK-norm), NeoX RoPE;
//   gemma3  embeddings scaled by sqrt(hidden), QK-norm, RMSNorm after attention and after the
//           FFN, GeGLU (tanh GELU), NeoX RoPE with its own base on sliding-window layers, and
//           sliding-window attention on the layers the pattern marks (5 of every 6 by default).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kv/kv_config.h"
#include "model/forward_batch.h"
#include "model/gguf.h"

namespace cortex::kernels {
class ThreadPool;
struct WeightMatrix;
}  // namespace cortex::kernels

namespace cortex::model {

enum class Architecture { Llama, Qwen2, Qwen3, Gemma3 };
// general.architecture's name for it ("llama", "qwen2", "qwen3", "gemma3").
const char* toString(Architecture arch);
// The architecture named `name`, or nullopt when CortexStream does not run it.
std::optional<Architecture> parseArchitecture(std::string_view name);
// "llama, qwen2, qwen3, gemma3", for messages.
std::string supportedArchitectureNames();

struct HParams {
  Architecture arch = Architecture::Llama;
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
  // RoPE: NeoX pairing (i, i + nRot/2) instead of adjacent pairs; linear position scale (1 / the
  // file's rope.scaling.factor) of the global layers; Llama 3's per-frequency divisors
  // (rope_freqs.weight, nRot/2 values; empty when absent).
  bool ropeNeox = false;
  float ropeFreqScale = 1.0f;
  float ropeAttnFactor = 1.0f;  // rope.scaling.attn_factor: multiplies cos and sin
  std::vector<float> ropeFreqFactors;
  // Sliding-window attention: a query at position p on a layer with swaLayers[l] sees keys
  // (p - slidingWindow, p]. 0 means every layer is global.
  int32_t slidingWindow = 0;
  std::vector<uint8_t> swaLayers;  // per layer, 1 = sliding window
  float ropeThetaSwa = 10000.0f;   // RoPE base of the sliding-window layers
  float attnScale = 0.0f;          // query scale (1/sqrt(headDim) for most models)
  float embedScale = 1.0f;         // token embeddings are multiplied by this (Gemma: sqrt(hidden))
  float finalLogitSoftcap = 0.0f;  // logits = cap * tanh(logits / cap) when > 0
  bool qkvBias = false;            // attn_{q,k,v}.bias (and output.bias when present)
  bool qkNorm = false;             // attn_{q,k}_norm.weight, per head
  bool postNorms = false;          // post_attention_norm / post_ffw_norm
  bool geglu = false;              // GELU(gate) * up instead of SiLU(gate) * up

  bool isSlidingWindowLayer(int32_t layer) const {
    return slidingWindow > 0 && swaLayers[static_cast<size_t>(layer)] != 0;
  }
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
  // Maps the GGUF file and checks everything the forward pass relies on: a supported
  // architecture (llama, qwen2, qwen3, gemma3), hyperparameters present and consistent, every tensor present with the expected shape and a
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
  // Re-rotates the keys stored in `rows` (blocks of a windowed sequence whose positions moved
  // back by `tokens`: kv::KVCache::shiftWindow) in every layer of their group, with each layer's
  // RoPE, so that they read as keys at their new positions. Values carry no position.
  void shiftKeys(const kv::KVArena& arena, std::span<const kv::BlockRows> rows,
                 int32_t tokens) const;
  // The checks forward() makes before touching the arena (ModelError), for another runner of the
  // same model: nOutRows is the number of logits rows, maxContext the longest sequence.
  void validate(const ForwardBatch& batch, int64_t& nOutRows, int32_t& maxContext) const;
  // The file's weight matrix `name` as the kernels read it (type, rows, cols; checked at load
  // for the tensors the forward pass uses), for a runner that converts the weights.
  kernels::WeightMatrix weightMatrix(const std::string& name) const;
  ~TransformerModel();

 private:
  struct Weights;  // the weight matrices and RoPE table (kernel types stay out of this header)

  TransformerModel(GGUFFile file, Precision precision);
  void resize(int64_t nTokens, int32_t maxContext, const kernels::ThreadPool& pool);
  // Repacks the Q4_0/Q4_1/Q8_0 matrices for the integer path (Precision::Int8).
  void packWeights();

  GGUFFile file_;
  Precision precision_;
  HParams hp_;
  std::unique_ptr<Weights> w_;

  // Activation buffers, grown on demand and reused (no allocation in steady state).
  std::vector<float> x_, xn_, q_, k_, v_, attn_, tmp_, gate_, up_, scratch_, lastRows_;
  std::vector<float> ropeGlobal_, ropeSwa_;  // the batch's RoPE angles per kind of layer
};

}  // namespace cortex::model
