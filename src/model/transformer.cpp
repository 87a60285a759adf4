#include "model/transformer.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <stdexcept>

#include "kernels/attention.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "kernels/quant.h"
#include "kernels/weights.h"
#include "model/errors.h"

namespace cortex::model {

namespace {

kernels::WeightType toWeightType(GGMLType type, const std::string& tensorName) {
  requireSupported(type, tensorName);
  switch (type) {
    case GGMLType::F32: return kernels::WeightType::F32;
    case GGMLType::F16: return kernels::WeightType::F16;
    case GGMLType::BF16: return kernels::WeightType::BF16;
    case GGMLType::Q8_0: return kernels::WeightType::Q8_0;
    case GGMLType::Q4_0: return kernels::WeightType::Q4_0;
    case GGMLType::Q4_1: return kernels::WeightType::Q4_1;
    case GGMLType::Q5_0: return kernels::WeightType::Q5_0;
    case GGMLType::Q5_1: return kernels::WeightType::Q5_1;
    case GGMLType::Q2_K: return kernels::WeightType::Q2_K;
    case GGMLType::Q3_K: return kernels::WeightType::Q3_K;
    case GGMLType::Q4_K: return kernels::WeightType::Q4_K;
    case GGMLType::Q5_K: return kernels::WeightType::Q5_K;
    case GGMLType::Q6_K: return kernels::WeightType::Q6_K;
    default: break;
  }
  throw ModelError("tensor '" + tensorName + "' has an unsupported type");
}

std::string dimsString(const std::vector<uint64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// A weight matrix as stored in the file, and its repacked copy when it takes the integer path.
struct Linear {
  kernels::WeightMatrix w;
  std::shared_ptr<const kernels::PackedWeights> packed;
};

// The input of one or more matmuls: float rows, quantized once on first use by a packed matrix.
class MatmulInput {
 public:
  MatmulInput(const float* x, int64_t rows, int64_t cols, kernels::QuantizedActivations& q)
      : x_(x), rows_(rows), cols_(cols), q_(q) {}

  void multiply(kernels::ThreadPool& pool, const Linear& m, float* y) {
    if (!m.packed) return kernels::matmul(pool, m.w, x_, rows_, y);
    if (!quantized_) {
      kernels::quantizeActivations(pool, x_, rows_, cols_, q_);
      quantized_ = true;
    }
    kernels::matmul(pool, *m.packed, q_, y);
  }

 private:
  const float* x_;
  int64_t rows_, cols_;
  kernels::QuantizedActivations& q_;
  bool quantized_ = false;
};

// y[t][i] += bias[i] for nTokens rows of n floats.
void addRowBias(float* y, const float* bias, int64_t nTokens, int64_t n) {
  for (int64_t t = 0; t < nTokens; ++t) kernels::addInPlace(y + t * n, bias, n);
}

}  // namespace

const char* toString(Precision p) { return p == Precision::Int8 ? "int8" : "f32"; }

Precision parsePrecision(const std::string& name) {
  if (name == "int8") return Precision::Int8;
  if (name == "f32") return Precision::F32;
  throw std::invalid_argument("precision '" + name + "' is not one of: int8, f32");
}

struct TransformerModel::Weights {
  struct Layer {
    const float* attnNorm = nullptr;
    Linear wq, wk, wv, wo;
    const float* bq = nullptr;  // Q/K/V biases (qkvBias)
    const float* bk = nullptr;
    const float* bv = nullptr;
    const float* qNorm = nullptr;  // per-head QK-norm weights, headDim each (qkNorm)
    const float* kNorm = nullptr;
    const float* postAttnNorm = nullptr;  // postNorms
    const float* ffnNorm = nullptr;
    Linear wGate, wUp, wDown;
    const float* postFfnNorm = nullptr;  // postNorms
  };
  kernels::WeightMatrix tokenEmbd;
  Linear output;
  kernels::QuantizedActivations actQ;
  const float* outputNorm = nullptr;
  const float* outputBias = nullptr;  // qwen2 files may have one
  std::vector<Layer> layers;
  std::unique_ptr<kernels::Rope> ropeGlobal;
  std::unique_ptr<kernels::Rope> ropeSwa;  // sliding-window layers, when the model has them
};

TransformerModel::TransformerModel(GGUFFile file, Precision precision)
    : file_(std::move(file)), precision_(precision), w_(std::make_unique<Weights>()) {}

TransformerModel::~TransformerModel() = default;

const char* toString(Architecture arch) {
  switch (arch) {
    case Architecture::Llama: return "llama";
    case Architecture::Qwen2: return "qwen2";
    case Architecture::Qwen3: return "qwen3";
    case Architecture::Gemma3: return "gemma3";
  }
  return "?";
}

std::optional<Architecture> parseArchitecture(std::string_view name) {
  for (Architecture a : {Architecture::Llama, Architecture::Qwen2, Architecture::Qwen3,
                         Architecture::Gemma3}) {
    if (name == toString(a)) return a;
  }
  return std::nullopt;
}

std::string supportedArchitectureNames() { return "llama, qwen2, qwen3, gemma3"; }

std::unique_ptr<TransformerModel> TransformerModel::load(const std::string& path,
                                                         Precision precision) {
  std::unique_ptr<TransformerModel> m(new TransformerModel(GGUFFile::open(path), precision));
  const GGUFFile& f = m->file_;
  const std::string where = "model " + path + ": ";
  const std::string archName = f.getString("general.architecture");
  const std::optional<Architecture> arch = parseArchitecture(archName);
  if (!arch) {
    throw ModelError(where + "architecture '" + archName +
                     "' is not supported yet (supported: " + supportedArchitectureNames() + ")");
  }
  // Hyperparameters live under the architecture's name: "gemma3.block_count".
  const std::string k = archName + ".";
  auto u32 = [&](const std::string& key) -> int32_t {
    const uint32_t v = f.getU32(key);
    if (v == 0 || v > (1u << 30)) {
      throw ModelError(where + key + " = " + std::to_string(v) + " is out of range");
    }
    return static_cast<int32_t>(v);
  };
  HParams& hp = m->hp_;
  hp.arch = *arch;
  hp.nLayers = u32(k + "block_count");
  hp.nEmbd = u32(k + "embedding_length");
  hp.nHead = u32(k + "attention.head_count");
  hp.nHeadKV = f.has(k + "attention.head_count_kv") ? u32(k + "attention.head_count_kv")
                                                     : hp.nHead;
  hp.nFF = u32(k + "feed_forward_length");
  hp.nCtxTrain = u32(k + "context_length");
  hp.headDim = f.has(k + "attention.key_length") ? u32(k + "attention.key_length")
                                                 : hp.nEmbd / hp.nHead;
  if (f.has(k + "attention.value_length") && u32(k + "attention.value_length") != hp.headDim) {
    throw ModelError(where + "key_length and value_length differ, which is not supported");
  }
  hp.nRot = f.has(k + "rope.dimension_count") ? u32(k + "rope.dimension_count") : hp.headDim;
  if (f.has(k + "rope.freq_base")) hp.ropeTheta = f.getF32(k + "rope.freq_base");
  hp.rmsEps = f.getF32(k + "attention.layer_norm_rms_epsilon");
  if (hp.nHead % hp.nHeadKV != 0) {
    throw ModelError(where + "head_count " + std::to_string(hp.nHead) +
                     " is not a multiple of head_count_kv " + std::to_string(hp.nHeadKV));
  }
  if (hp.nRot > hp.headDim || hp.nRot % 2 != 0 || hp.headDim % 8 != 0) {
    throw ModelError(where + "unsupported head shape (head dim " + std::to_string(hp.headDim) +
                     ", rope dims " + std::to_string(hp.nRot) + ")");
  }
  if (!(hp.rmsEps > 0.0f) || !(hp.ropeTheta > 0.0f)) {
    throw ModelError(where + "rms epsilon and rope freq_base must be positive");
  }
  // RoPE scaling: linear, or none. (YaRN and LongRoPE change attention itself.) Older files give
  // the linear factor as rope.scale_linear.
  const std::string scaling =
      f.has(k + "rope.scaling.type") ? f.getString(k + "rope.scaling.type") : "linear";
  if (scaling != "linear" && scaling != "none") {
    throw ModelError(where + "rope scaling '" + scaling + "' is not supported (supported: linear)");
  }
  const std::string factorKey =
      f.has(k + "rope.scaling.factor") ? k + "rope.scaling.factor" : k + "rope.scale_linear";
  if (scaling == "linear" && f.has(factorKey)) {
    const float factor = f.getF32(factorKey);
    if (!(factor > 0.0f)) throw ModelError(where + factorKey + " must be positive");
    hp.ropeFreqScale = 1.0f / factor;
  }
  if (f.has(k + "rope.scaling.attn_factor")) {
    hp.ropeAttnFactor = f.getF32(k + "rope.scaling.attn_factor");
    if (!(hp.ropeAttnFactor > 0.0f)) throw ModelError(where + "rope.scaling.attn_factor must be positive");
  }
  hp.attnScale = 1.0f / std::sqrt(static_cast<float>(hp.headDim));
  hp.ropeNeox = hp.arch != Architecture::Llama;
  hp.qkvBias = hp.arch == Architecture::Qwen2;
  hp.qkNorm = hp.arch == Architecture::Qwen3 || hp.arch == Architecture::Gemma3;
  if (hp.arch == Architecture::Gemma3) {
    hp.postNorms = true;
    hp.geglu = true;
    hp.embedScale = std::sqrt(static_cast<float>(hp.nEmbd));
    // Gemma 3 27B (62 layers) scales queries by the hidden size per head instead.
    if (hp.nLayers == 62) hp.attnScale = 1.0f / std::sqrt(static_cast<float>(hp.nEmbd / hp.nHead));
    if (f.has(k + "final_logit_softcapping")) {
      hp.finalLogitSoftcap = f.getF32(k + "final_logit_softcapping");
    }
    if (f.has(k + "attention.sliding_window")) {
      hp.slidingWindow = static_cast<int32_t>(f.getU32(k + "attention.sliding_window"));
    }
    if (hp.slidingWindow > 0) {
      // Which layers slide: an array of per-layer flags, or every layer but the last of each
      // group of n (default 6).
      hp.swaLayers.assign(static_cast<size_t>(hp.nLayers), 0);
      const GGUFValue* pattern = f.find(k + "attention.sliding_window_pattern");
      if (pattern != nullptr && pattern->isArray()) {
        const std::vector<int32_t> flags = f.getI32Array(k + "attention.sliding_window_pattern");
        if (flags.size() != hp.swaLayers.size()) {
          throw ModelError(where + "sliding_window_pattern has " + std::to_string(flags.size()) +
                           " entries for " + std::to_string(hp.nLayers) + " layers");
        }
        for (size_t l = 0; l < flags.size(); ++l) hp.swaLayers[l] = flags[l] != 0 ? 1 : 0;
      } else {
        const uint32_t n = pattern != nullptr ? f.getU32(k + "attention.sliding_window_pattern") : 6;
        for (int32_t l = 0; l < hp.nLayers; ++l) {
          hp.swaLayers[static_cast<size_t>(l)] =
              n == 0 || static_cast<uint32_t>(l) % n < n - 1 ? 1 : 0;
        }
      }
      if (f.has(k + "rope.freq_base_swa")) hp.ropeThetaSwa = f.getF32(k + "rope.freq_base_swa");
      if (!(hp.ropeThetaSwa > 0.0f)) throw ModelError(where + "rope.freq_base_swa must be positive");
    }
  }

  // A weight matrix with ggml dims {cols, rows}.
  auto matrix = [&](const std::string& name, int64_t cols, int64_t rows) {
    const GGUFTensorInfo& t = f.tensor(name);
    if (t.dims.size() != 2 || t.dims[0] != static_cast<uint64_t>(cols) ||
        t.dims[1] != static_cast<uint64_t>(rows)) {
      throw ModelError(where + "tensor '" + name + "' has shape " + dimsString(t.dims) +
                       ", expected [" + std::to_string(cols) + ", " + std::to_string(rows) + "]");
    }
    kernels::WeightMatrix w;
    w.data = t.data;
    w.type = toWeightType(t.type, name);
    w.rows = rows;
    w.cols = cols;
    try {
      kernels::validate(w);
    } catch (const std::invalid_argument& e) {
      throw ModelError(where + "tensor '" + name + "': " + e.what());
    }
    return w;
  };
  auto vector = [&](const std::string& name, int64_t n) {
    const GGUFTensorInfo& t = f.tensor(name);
    if (t.type != GGMLType::F32 || t.nElements != static_cast<uint64_t>(n)) {
      throw ModelError(where + "tensor '" + name + "' must be F32 with " + std::to_string(n) +
                       " elements, has " + std::string(ggmlTypeName(t.type)) + " " +
                       dimsString(t.dims));
    }
    return reinterpret_cast<const float*>(t.data);
  };

  // A matrix for the matmuls (repacked below when it takes the integer path).
  auto linear = [&](const std::string& name, int64_t cols, int64_t rows) {
    Linear l;
    l.w = matrix(name, cols, rows);
    return l;
  };

  const GGUFTensorInfo& embd = f.tensor("token_embd.weight");
  if (embd.dims.size() != 2) throw ModelError(where + "token_embd.weight is not a matrix");
  hp.nVocab = static_cast<int32_t>(embd.dims[1]);
  Weights& w = *m->w_;
  w.tokenEmbd = matrix("token_embd.weight", hp.nEmbd, hp.nVocab);
  w.output = f.findTensor("output.weight") != nullptr
                 ? linear("output.weight", hp.nEmbd, hp.nVocab)
                 : linear("token_embd.weight", hp.nEmbd, hp.nVocab);  // tied embeddings
  w.outputNorm = vector("output_norm.weight", hp.nEmbd);
  if (hp.qkvBias && f.findTensor("output.bias") != nullptr) w.outputBias = vector("output.bias", hp.nVocab);
  const int64_t qDim = static_cast<int64_t>(hp.nHead) * hp.headDim;
  const int64_t kvDim = static_cast<int64_t>(hp.nHeadKV) * hp.headDim;
  for (int32_t l = 0; l < hp.nLayers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    Weights::Layer layer;
    layer.attnNorm = vector(p + "attn_norm.weight", hp.nEmbd);
    layer.wq = linear(p + "attn_q.weight", hp.nEmbd, qDim);
    layer.wk = linear(p + "attn_k.weight", hp.nEmbd, kvDim);
    layer.wv = linear(p + "attn_v.weight", hp.nEmbd, kvDim);
    layer.wo = linear(p + "attn_output.weight", qDim, hp.nEmbd);
    if (hp.qkvBias) {
      layer.bq = vector(p + "attn_q.bias", qDim);
      layer.bk = vector(p + "attn_k.bias", kvDim);
      layer.bv = vector(p + "attn_v.bias", kvDim);
    }
    if (hp.qkNorm) {
      layer.qNorm = vector(p + "attn_q_norm.weight", hp.headDim);
      layer.kNorm = vector(p + "attn_k_norm.weight", hp.headDim);
    }
    layer.ffnNorm = vector(p + "ffn_norm.weight", hp.nEmbd);
    layer.wGate = linear(p + "ffn_gate.weight", hp.nEmbd, hp.nFF);
    layer.wUp = linear(p + "ffn_up.weight", hp.nEmbd, hp.nFF);
    layer.wDown = linear(p + "ffn_down.weight", hp.nFF, hp.nEmbd);
    if (hp.postNorms) {
      layer.postAttnNorm = vector(p + "post_attention_norm.weight", hp.nEmbd);
      layer.postFfnNorm = vector(p + "post_ffw_norm.weight", hp.nEmbd);
    }
    w.layers.push_back(layer);
  }
  // Llama 3's frequency factors (rope_freqs.weight) apply to every layer that has them.
  if (f.findTensor("rope_freqs.weight") != nullptr) {
    const float* factors = vector("rope_freqs.weight", hp.nRot / 2);
    hp.ropeFreqFactors.assign(factors, factors + hp.nRot / 2);
  }
  const kernels::RopeStyle style = hp.ropeNeox ? kernels::RopeStyle::Neox : kernels::RopeStyle::Normal;
  try {
    w.ropeGlobal = std::make_unique<kernels::Rope>(style, hp.nRot, hp.ropeTheta, hp.ropeFreqScale,
                                                   hp.ropeFreqFactors, hp.ropeAttnFactor);
    if (hp.slidingWindow > 0) {
      w.ropeSwa = std::make_unique<kernels::Rope>(style, hp.nRot, hp.ropeThetaSwa, 1.0,
                                                  hp.ropeFreqFactors, hp.ropeAttnFactor);
    }
  } catch (const std::invalid_argument& e) {
    throw ModelError(where + e.what());
  }
  if (precision == Precision::Int8) m->packWeights();
  return m;
}

void TransformerModel::packWeights() {
  // Every packable matrix in the order the forward pass reads them, once (tied embeddings share
  // one copy between the layers' head and the lookup), into one allocation.
  std::vector<Linear*> all;
  for (Weights::Layer& L : w_->layers) {
    for (Linear* l : {&L.wq, &L.wk, &L.wv, &L.wo, &L.wGate, &L.wUp, &L.wDown}) all.push_back(l);
  }
  all.push_back(&w_->output);
  std::vector<kernels::WeightMatrix> unique;
  std::map<const void*, size_t> index;
  for (Linear* l : all) {
    if (kernels::PackedWeights::packable(l->w.type) && index.emplace(l->w.data, unique.size()).second) {
      unique.push_back(l->w);
    }
  }
  std::vector<kernels::PackedWeights> packed = kernels::PackedWeights::packAll(unique);
  std::vector<std::shared_ptr<const kernels::PackedWeights>> shared;
  for (kernels::PackedWeights& p : packed) {
    shared.push_back(std::make_shared<const kernels::PackedWeights>(std::move(p)));
  }
  for (Linear* l : all) {
    const auto it = index.find(l->w.data);
    if (it != index.end()) l->packed = shared[it->second];
  }
}

kernels::WeightMatrix TransformerModel::weightMatrix(const std::string& name) const {
  const GGUFTensorInfo& t = file_.tensor(name);
  if (t.dims.size() != 2) throw ModelError("tensor '" + name + "' is not a matrix");
  kernels::WeightMatrix w;
  w.data = t.data;
  w.type = toWeightType(t.type, name);
  w.cols = static_cast<int64_t>(t.dims[0]);
  w.rows = static_cast<int64_t>(t.dims[1]);
  return w;
}

kv::KVCacheConfig TransformerModel::kvCacheConfig(int32_t blockSizeTokens, uint64_t memoryBudgetBytes,
                                            kv::KVDType dtype) const {
  kv::KVCacheConfig c;
  c.numLayers = hp_.nLayers;
  c.numKVHeads = hp_.nHeadKV;
  c.headDim = hp_.headDim;
  c.blockSizeTokens = blockSizeTokens;
  c.memoryBudgetBytes = memoryBudgetBytes;
  c.dtype = dtype;
  c.layerWindows.resize(static_cast<size_t>(hp_.nLayers));
  for (int32_t l = 0; l < hp_.nLayers; ++l) {
    c.layerWindows[static_cast<size_t>(l)] = hp_.isSlidingWindowLayer(l) ? hp_.slidingWindow : 0;
  }
  // The prefix cache's hashes must differ between models and between precisions (each computes
  // different K/V for the same tokens): a fingerprint of the file (its size, every tensor's name,
  // type and first bytes) and the precision. FNV-1a: speed and collisions hardly matter here.
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](const void* p, size_t n) {
    for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<const uint8_t*>(p)[i]) * 0x100000001b3ull;
  };
  const uint64_t size = file_.fileSizeBytes();
  mix(&size, sizeof size);
  mix(&precision_, sizeof precision_);
  for (const GGUFTensorInfo& t : file_.tensors()) {
    mix(t.name.data(), t.name.size());
    mix(&t.type, sizeof t.type);
    mix(t.data, std::min<size_t>(64, static_cast<size_t>(t.nBytes)));
  }
  c.prefixHashSeed = h;
  return c;
}

void TransformerModel::shiftKeys(const kv::KVArena& arena, std::span<const kv::BlockRows> rows,
                                 int32_t tokens) const {
  const HParams& hp = hp_;
  const Weights& w = *w_;
  std::vector<float> csGlobal(static_cast<size_t>(hp.nRot)), csSwa(csGlobal.size());
  w.ropeGlobal->rotation(-tokens, csGlobal.data());
  if (w.ropeSwa) w.ropeSwa->rotation(-tokens, csSwa.data());
  std::vector<float> row(static_cast<size_t>(hp.headDim));
  for (const kv::BlockRows& br : rows) {
    for (int32_t l = 0; l < hp.nLayers; ++l) {
      if (arena.groupOf(l) != br.group) continue;
      const float* cs = hp.isSlidingWindowLayer(l) ? csSwa.data() : csGlobal.data();
      for (int32_t h = 0; h < hp.nHeadKV; ++h) {
        for (int32_t r = 0; r < br.rows; ++r) {
          std::byte* at = arena.kBase + arena.rowByteOffset({br.block, r}, l, h);
          kv::loadRow(at, row.data(), hp.headDim, arena.dtype);
          kernels::ropeInPlace(row.data(), 1, 1, hp.headDim, cs, hp.nRot, w.ropeGlobal->style());
          kv::storeRow(row.data(), at, hp.headDim, arena.dtype);
        }
      }
    }
  }
}

void TransformerModel::resize(int64_t nTokens, int32_t maxContext, const kernels::ThreadPool& pool) {
  auto grow = [](std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  };
  const int64_t qDim = static_cast<int64_t>(hp_.nHead) * hp_.headDim;
  const int64_t kvDim = static_cast<int64_t>(hp_.nHeadKV) * hp_.headDim;
  grow(x_, nTokens * hp_.nEmbd);
  grow(xn_, nTokens * hp_.nEmbd);
  grow(q_, nTokens * qDim);
  grow(k_, nTokens * kvDim);
  grow(v_, nTokens * kvDim);
  grow(attn_, nTokens * qDim);
  grow(tmp_, nTokens * hp_.nEmbd);
  grow(gate_, nTokens * hp_.nFF);
  grow(up_, nTokens * hp_.nFF);
  grow(lastRows_, nTokens * hp_.nEmbd);
  grow(ropeGlobal_, nTokens * hp_.nRot);
  if (w_->ropeSwa) grow(ropeSwa_, nTokens * hp_.nRot);
  grow(scratch_, static_cast<int64_t>(kernels::pagedAttentionScratchFloats(pool, maxContext)));
}

void TransformerModel::validate(const ForwardBatch& batch, int64_t& nOutRows,
                          int32_t& maxContext) const {
  const HParams& hp = hp_;
  const kv::KVArena& a = batch.arena;
  if (a.numLayers != hp.nLayers || a.numKVHeads != hp.nHeadKV || a.headDim != hp.headDim ||
      a.places.size() != static_cast<size_t>(hp.nLayers) || a.numGroups < 1) {
    throw ModelError("forward: the KV arena has " + std::to_string(a.numLayers) + " layers x " +
                     std::to_string(a.numKVHeads) + " heads x " + std::to_string(a.headDim) +
                     " dims; this model needs " + std::to_string(hp.nLayers) + " x " +
                     std::to_string(hp.nHeadKV) + " x " + std::to_string(hp.headDim));
  }
  const size_t nTokens = batch.tokens.size();
  const auto G = static_cast<size_t>(a.numGroups);
  if (batch.positions.size() != nTokens || batch.slots.size() != nTokens * G) {
    throw ModelError("forward: tokens, positions and slots (one per KV group) differ in count");
  }
  nOutRows = 0;
  maxContext = 1;
  int64_t t = 0;
  for (const ForwardSequence& s : batch.seqs) {
    const int64_t end = static_cast<int64_t>(s.firstPos) + s.numTokens;
    if (s.numTokens < 1 || s.firstPos < 0 || end > hp.nCtxTrain) {
      throw ModelError("forward: positions [" + std::to_string(s.firstPos) + ", " +
                       std::to_string(end) + ") are empty or exceed the model's context of " +
                       std::to_string(hp.nCtxTrain) + " tokens");
    }
    if (s.tableStart < 0 || s.numBlocks * int64_t{a.blockSizeTokens} < end ||
        static_cast<size_t>(s.tableStart) + static_cast<size_t>(s.numBlocks) * G >
            batch.blockTables.size()) {
      throw ModelError("forward: a block table does not cover its sequence's positions");
    }
    for (int32_t i = 0; i < s.numTokens; ++i) {
      if (batch.positions[static_cast<size_t>(t + i)] != s.firstPos + i) {
        throw ModelError("forward: token positions are not consecutive within a sequence");
      }
    }
    t += s.numTokens;
    nOutRows += s.allLogits ? s.numTokens : 1;
    maxContext = std::max(maxContext, static_cast<int32_t>(end));
  }
  if (t != static_cast<int64_t>(nTokens)) {
    throw ModelError("forward: the sequences' token counts do not add up to the batch");
  }
  for (int32_t id : batch.tokens) {
    if (id < 0 || id >= hp.nVocab) {
      throw ModelError("forward: token id " + std::to_string(id) +
                       " is outside the vocabulary [0, " + std::to_string(hp.nVocab) + ")");
    }
  }
}

void TransformerModel::forward(const ForwardBatch& batch, kernels::ThreadPool& pool,
                         std::vector<float>& logits) {
  const HParams& hp = hp_;
  const Weights& w = *w_;
  // Validate the whole batch before touching the arena.
  int64_t nOutRows = 0;
  int32_t maxContext = 1;
  validate(batch, nOutRows, maxContext);
  const auto nTokens = static_cast<int64_t>(batch.tokens.size());
  if (nTokens == 0) {
    logits.clear();
    return;
  }
  resize(nTokens, maxContext, pool);

  const int64_t E = hp.nEmbd;
  const int64_t qDim = static_cast<int64_t>(hp.nHead) * hp.headDim;
  const int64_t kvDim = static_cast<int64_t>(hp.nHeadKV) * hp.headDim;
  const kv::KVArena& arena = batch.arena;
  float* x = x_.data();
  float* xn = xn_.data();

  for (int64_t t = 0; t < nTokens; ++t) {
    kernels::dequantizeRow(w.tokenEmbd, batch.tokens[static_cast<size_t>(t)], x + t * E);
  }
  if (hp.embedScale != 1.0f) {
    for (int64_t i = 0; i < nTokens * E; ++i) x[i] *= hp.embedScale;
  }
  // The batch's RoPE angles, once per kind of layer.
  w.ropeGlobal->angles(batch.positions.data(), nTokens, ropeGlobal_.data());
  if (w.ropeSwa) w.ropeSwa->angles(batch.positions.data(), nTokens, ropeSwa_.data());
  const kernels::RopeStyle ropeStyle = w.ropeGlobal->style();

  kernels::QuantizedActivations& actQ = w_->actQ;
  for (int32_t l = 0; l < hp.nLayers; ++l) {
    const Weights::Layer& L = w.layers[static_cast<size_t>(l)];
    // Attention block.
    kernels::rmsNorm(x, L.attnNorm, nTokens, E, hp.rmsEps, xn);
    {
      MatmulInput in(xn, nTokens, E, actQ);
      in.multiply(pool, L.wq, q_.data());
      in.multiply(pool, L.wk, k_.data());
      in.multiply(pool, L.wv, v_.data());
    }
    if (hp.qkvBias) {
      addRowBias(q_.data(), L.bq, nTokens, qDim);
      addRowBias(k_.data(), L.bk, nTokens, kvDim);
      addRowBias(v_.data(), L.bv, nTokens, kvDim);
    }
    if (hp.qkNorm) {
      kernels::rmsNorm(q_.data(), L.qNorm, nTokens * hp.nHead, hp.headDim, hp.rmsEps, q_.data());
      kernels::rmsNorm(k_.data(), L.kNorm, nTokens * hp.nHeadKV, hp.headDim, hp.rmsEps, k_.data());
    }
    const bool swa = hp.isSlidingWindowLayer(l);
    const float* angles = swa ? ropeSwa_.data() : ropeGlobal_.data();
    kernels::ropeInPlace(q_.data(), nTokens, hp.nHead, hp.headDim, angles, hp.nRot, ropeStyle);
    kernels::ropeInPlace(k_.data(), nTokens, hp.nHeadKV, hp.headDim, angles, hp.nRot, ropeStyle);
    // This layer's K/V go to its group's blocks, read through its group's tables.
    const int32_t group = arena.groupOf(l);
    for (int64_t t = 0; t < nTokens; ++t) {
      kv::writeKV(arena, batch.slots[static_cast<size_t>(t * arena.numGroups + group)], l,
                  k_.data() + t * kvDim, v_.data() + t * kvDim);
    }
    int64_t t0 = 0;
    for (const ForwardSequence& s : batch.seqs) {
      const kv::BlockId* table =
          batch.blockTables.data() + s.tableStart + static_cast<int64_t>(group) * s.numBlocks;
      const int32_t n = s.firstPos + s.numTokens;
      kernels::pagedAttention(pool, q_.data() + t0 * qDim, s.numTokens, s.firstPos, hp.nHead,
                              arena.kView(l, table, s.numBlocks, n),
                              arena.vView(l, table, s.numBlocks, n), hp.attnScale,
                              attn_.data() + t0 * qDim, scratch_.data(),
                              swa ? hp.slidingWindow : s.window, swa ? 0 : s.sinks);
      t0 += s.numTokens;
    }
    MatmulInput(attn_.data(), nTokens, qDim, actQ).multiply(pool, L.wo, tmp_.data());
    if (hp.postNorms) kernels::rmsNorm(tmp_.data(), L.postAttnNorm, nTokens, E, hp.rmsEps, tmp_.data());
    kernels::addInPlace(x, tmp_.data(), nTokens * E);
    // Feed-forward block (SwiGLU or GeGLU).
    kernels::rmsNorm(x, L.ffnNorm, nTokens, E, hp.rmsEps, xn);
    {
      MatmulInput in(xn, nTokens, E, actQ);
      in.multiply(pool, L.wGate, gate_.data());
      in.multiply(pool, L.wUp, up_.data());
    }
    if (hp.geglu) {
      kernels::geglu(gate_.data(), up_.data(), nTokens * hp.nFF, gate_.data());
    } else {
      kernels::swiglu(gate_.data(), up_.data(), nTokens * hp.nFF, gate_.data());
    }
    MatmulInput(gate_.data(), nTokens, hp.nFF, actQ).multiply(pool, L.wDown, tmp_.data());
    if (hp.postNorms) kernels::rmsNorm(tmp_.data(), L.postFfnNorm, nTokens, E, hp.rmsEps, tmp_.data());
    kernels::addInPlace(x, tmp_.data(), nTokens * E);
  }

  // Final norm and output head, only for the rows that want logits.
  float* rows = lastRows_.data();
  {
    int64_t t = 0;
    int64_t r = 0;
    for (const ForwardSequence& s : batch.seqs) {
      const int64_t n = s.numTokens;
      if (s.allLogits) {
        std::copy(x + t * E, x + (t + n) * E, rows + r * E);
        r += n;
      } else {
        std::copy(x + (t + n - 1) * E, x + (t + n) * E, rows + r * E);
        r += 1;
      }
      t += n;
    }
  }
  kernels::rmsNorm(rows, w.outputNorm, nOutRows, E, hp.rmsEps, rows);
  logits.resize(static_cast<size_t>(nOutRows * hp.nVocab));
  MatmulInput(rows, nOutRows, E, actQ).multiply(pool, w.output, logits.data());
  if (w.outputBias != nullptr) addRowBias(logits.data(), w.outputBias, nOutRows, hp.nVocab);
  if (hp.finalLogitSoftcap > 0.0f) {
    const float cap = hp.finalLogitSoftcap;
    for (float& v : logits) v = cap * std::tanh(v / cap);
  }
}

}  // namespace cortex::model
