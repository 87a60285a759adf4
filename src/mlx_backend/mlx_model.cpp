#include "mlx_backend/mlx_model.h"

#include <mlx/mlx.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "common/half.h"
#include "kernels/ops.h"
#include "kernels/weights.h"
#include "model/errors.h"

namespace cortex::mlxbackend {

namespace mx = mlx::core;

namespace {

constexpr int kGroup = 32;  // MLX's quantization group: one ggml Q4_0/Q4_1/Q8_0 block

int32_t i32(int64_t v) { return static_cast<int32_t>(v); }

// A weight matrix [rows (outputs), cols (inputs)]: affine-quantized (bits 4 or 8, float32 scale
// and bias per group of 32) or float16.
struct Linear {
  mx::array w;
  std::optional<mx::array> scales, biases;
  int bits = 0;  // 0: w is float16

  mx::array apply(const mx::array& x) const {
    if (bits != 0) return mx::quantized_matmul(x, w, *scales, biases, true, kGroup, bits, "affine");
    return mx::matmul(x, mx::transpose(mx::astype(w, mx::float32)));
  }
};

// The file's Q4_0 / Q4_1 / Q8_0 blocks as MLX affine groups: value = scale * q + bias with
// unsigned q (4 bits: q in [0, 15]; 8 bits: q in [0, 255]). Q4_1 is exactly that (scale d,
// bias m); Q4_0 stores d * (q - 8), so bias = -8 d; Q8_0 stores d * s for signed s, so
// q = s + 128 and bias = -128 d. Every scale and bias is the file's fp16 value (or -8 / -128
// times it), exact in float32. MLX packs 32 / bits values per uint32, element i of a row at bits
// [bits * (i % (32 / bits)), ...) of word i / (32 / bits).
Linear quantizedLinear(const kernels::WeightMatrix& m) {
  const int bits = m.type == kernels::WeightType::Q8_0 ? 8 : 4;
  const int64_t groups = m.cols / kGroup;
  const int64_t wordsPerRow = m.cols * bits / 32;
  std::vector<uint32_t> words(static_cast<size_t>(m.rows * wordsPerRow), 0);
  std::vector<float> scales(static_cast<size_t>(m.rows * groups)), biases(scales.size());
  uint8_t q[kGroup];
  for (int64_t r = 0; r < m.rows; ++r) {
    const auto* row = reinterpret_cast<const uint8_t*>(m.rowPtr(r));
    for (int64_t g = 0; g < groups; ++g) {
      float scale = 0, bias = 0;
      uint16_t h = 0;
      if (m.type == kernels::WeightType::Q4_1) {
        const uint8_t* b = row + g * 20;
        std::memcpy(&h, b, 2);
        scale = halfToFloat(h);
        std::memcpy(&h, b + 2, 2);
        bias = halfToFloat(h);
        for (int j = 0; j < 16; ++j) {
          q[j] = b[4 + j] & 0xF;
          q[j + 16] = static_cast<uint8_t>(b[4 + j] >> 4);
        }
      } else if (m.type == kernels::WeightType::Q4_0) {
        const uint8_t* b = row + g * 18;
        std::memcpy(&h, b, 2);
        scale = halfToFloat(h);
        bias = -8.0f * scale;
        for (int j = 0; j < 16; ++j) {
          q[j] = b[2 + j] & 0xF;
          q[j + 16] = static_cast<uint8_t>(b[2 + j] >> 4);
        }
      } else {
        const uint8_t* b = row + g * 34;
        std::memcpy(&h, b, 2);
        scale = halfToFloat(h);
        bias = -128.0f * scale;
        for (int j = 0; j < 32; ++j) {
          q[j] = static_cast<uint8_t>(static_cast<int>(static_cast<int8_t>(b[2 + j])) + 128);
        }
      }
      scales[static_cast<size_t>(r * groups + g)] = scale;
      biases[static_cast<size_t>(r * groups + g)] = bias;
      const int perWord = 32 / bits;
      uint32_t* w = words.data() + r * wordsPerRow + g * kGroup / perWord;
      for (int j = 0; j < kGroup; ++j) {
        w[j / perWord] |= static_cast<uint32_t>(q[j]) << (bits * (j % perWord));
      }
    }
  }
  const mx::Shape wShape{i32(m.rows), i32(wordsPerRow)}, sShape{i32(m.rows), i32(groups)};
  return Linear{mx::array(words.begin(), wShape, mx::uint32),
                mx::array(scales.begin(), sShape, mx::float32),
                mx::array(biases.begin(), sShape, mx::float32), bits};
}

// Any other type, every row dequantized by the kernels' reference: F32 and BF16 matrices keep
// their type (exact), the rest (F16, Q5_0/Q5_1, the K-quants) become float16.
Linear floatLinear(const kernels::WeightMatrix& m) {
  const mx::Shape shape{i32(m.rows), i32(m.cols)};
  std::vector<float> rows(static_cast<size_t>(m.rows * m.cols));
  for (int64_t r = 0; r < m.rows; ++r) kernels::dequantizeRow(m, r, rows.data() + r * m.cols);
  if (m.type == kernels::WeightType::F32) {
    return Linear{mx::array(rows.begin(), shape, mx::float32), std::nullopt, std::nullopt, 0};
  }
  const bool bf16 = m.type == kernels::WeightType::BF16;
  std::vector<uint16_t> bits(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    bits[i] = bf16 ? floatToBf16(rows[i]) : floatToHalf(rows[i]);
  }
  // The bits are IEEE binary16 or bfloat16: reinterpret the uint16 array.
  const mx::array raw(bits.begin(), shape, mx::uint16);
  return Linear{mx::view(raw, bf16 ? mx::bfloat16 : mx::float16), std::nullopt, std::nullopt, 0};
}

Linear convert(const kernels::WeightMatrix& m) {
  const bool affine = m.type == kernels::WeightType::Q4_0 || m.type == kernels::WeightType::Q4_1 ||
                      m.type == kernels::WeightType::Q8_0;
  return affine && m.cols % kGroup == 0 ? quantizedLinear(m) : floatLinear(m);
}

mx::array vec(const model::TransformerModel& model, const std::string& name) {
  const model::GGUFTensorInfo& t = model.file().tensor(name);
  const auto* p = reinterpret_cast<const float*>(t.data);
  return mx::array(p, mx::Shape{i32(static_cast<int64_t>(t.nElements))}, mx::float32);
}

mx::Dtype kvType(kv::KVDType t) {
  switch (t) {
    case kv::KVDType::F16: return mx::float16;
    case kv::KVDType::BF16: return mx::bfloat16;
    case kv::KVDType::F32: return mx::float32;
    case kv::KVDType::Q8: break;
  }
  throw model::ModelError(
      "the MLX backend stores K/V as f16, bf16 or f32; --kv-dtype q8 needs --backend cpu");
}

mx::array i32Array(const std::vector<int32_t>& v) {
  return mx::array(v.begin(), mx::Shape{i32(static_cast<int64_t>(v.size()))}, mx::int32);
}

}  // namespace

struct MlxModel::Impl {
  struct Layer {
    mx::array attnNorm;
    Linear wq, wk, wv, wo;
    std::optional<mx::array> bq, bk, bv, qNorm, kNorm, postAttnNorm, postFfnNorm;
    mx::array ffnNorm;
    Linear wGate, wUp, wDown;
  };

  // MLX's default streams belong to threads; the engine builds this model on one thread and runs
  // it on another, so it has its own stream, made the default of whichever thread calls in.
  mx::Stream stream;
  const model::TransformerModel& model;
  const model::HParams& hp;
  kv::KVArena geometry;  // the CPU cache's geometry (its addresses are not used)
  int32_t numBlocks;
  mx::Dtype kvDtype;
  kernels::WeightMatrix tokenEmbd;
  std::vector<Layer> layers;
  mx::array outputNorm;
  Linear output;
  std::optional<mx::array> outputBias;
  kernels::Rope ropeGlobal;
  std::optional<kernels::Rope> ropeSwa;
  std::vector<mx::array> kArena, vArena;  // per slot: [numBlocks, heads, blockTokens, headDim]
  std::mutex copyMu;
  std::vector<std::pair<kv::BlockId, kv::BlockId>> pendingCopies;  // guarded by copyMu
  int64_t arenaCopies = 0;

  Impl(const model::TransformerModel& m, const kv::KVArena& arena, int32_t blocks)
      : stream(useOwnStream()),
        model(m),
        hp(m.hparams()),
        geometry(arena),
        numBlocks(blocks),
        kvDtype(kvType(arena.dtype)),
        tokenEmbd(m.weightMatrix("token_embd.weight")),
        outputNorm(vec(m, "output_norm.weight")),
        output(convert(m.file().findTensor("output.weight") != nullptr
                           ? m.weightMatrix("output.weight")
                           : m.weightMatrix("token_embd.weight"))),
        ropeGlobal(hp.ropeNeox ? kernels::RopeStyle::Neox : kernels::RopeStyle::Normal, hp.nRot,
                   hp.ropeTheta, hp.ropeFreqScale, hp.ropeFreqFactors, hp.ropeAttnFactor) {
    if (hp.slidingWindow > 0) {
      ropeSwa.emplace(ropeGlobal.style(), hp.nRot, hp.ropeThetaSwa, 1.0, hp.ropeFreqFactors,
                      hp.ropeAttnFactor);
    }
    if (hp.qkvBias && m.file().findTensor("output.bias") != nullptr) {
      outputBias = vec(m, "output.bias");
    }
    std::vector<mx::array> all{outputNorm, output.w};
    for (int32_t l = 0; l < hp.nLayers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      auto lin = [&](const std::string& n) { return convert(m.weightMatrix(p + n)); };
      auto opt = [&](bool on, const std::string& n) -> std::optional<mx::array> {
        if (!on) return std::nullopt;
        return vec(m, p + n);
      };
      layers.push_back(Layer{vec(m, p + "attn_norm.weight"), lin("attn_q.weight"),
                             lin("attn_k.weight"), lin("attn_v.weight"),
                             lin("attn_output.weight"), opt(hp.qkvBias, "attn_q.bias"),
                             opt(hp.qkvBias, "attn_k.bias"), opt(hp.qkvBias, "attn_v.bias"),
                             opt(hp.qkNorm, "attn_q_norm.weight"),
                             opt(hp.qkNorm, "attn_k_norm.weight"),
                             opt(hp.postNorms, "post_attention_norm.weight"),
                             opt(hp.postNorms, "post_ffw_norm.weight"),
                             vec(m, p + "ffn_norm.weight"), lin("ffn_gate.weight"),
                             lin("ffn_up.weight"), lin("ffn_down.weight")});
    }
    const mx::Shape shape{numBlocks, arena.numKVHeads, arena.blockSizeTokens, arena.headDim};
    for (int32_t s = 0; s < arena.layersPerBlock; ++s) {
      kArena.push_back(mx::zeros(shape, kvDtype));
      vArena.push_back(mx::zeros(shape, kvDtype));
    }
    mx::eval(kArena);
    mx::eval(vArena);
  }

  // RoPE on x [T, heads, headDim] with the batch's cos and sin [T, 1, rot/2].
  mx::array rope(const mx::array& x, const mx::array& c, const mx::array& s) const {
    const int32_t T = x.shape(0), H = x.shape(1), D = hp.headDim, rot = hp.nRot, half = rot / 2;
    std::vector<mx::array> parts;
    if (ropeGlobal.style() == kernels::RopeStyle::Neox) {
      const mx::array a = mx::slice(x, {0, 0, 0}, {T, H, half});
      const mx::array b = mx::slice(x, {0, 0, half}, {T, H, rot});
      parts.push_back(a * c - b * s);
      parts.push_back(a * s + b * c);
    } else {
      const mx::array pairs = mx::reshape(mx::slice(x, {0, 0, 0}, {T, H, rot}), {T, H, half, 2});
      const mx::array a = mx::slice(pairs, {0, 0, 0, 0}, {T, H, half, 1});
      const mx::array b = mx::slice(pairs, {0, 0, 0, 1}, {T, H, half, 2});
      const mx::array c4 = mx::expand_dims(c, 3), s4 = mx::expand_dims(s, 3);
      parts.push_back(mx::reshape(mx::concatenate({a * c4 - b * s4, a * s4 + b * c4}, 3),
                                  {T, H, rot}));
    }
    if (rot < D) parts.push_back(mx::slice(x, {0, 0, rot}, {T, H, D}));
    return parts.size() == 1 ? parts[0] : mx::concatenate(parts, 2);
  }

  // What one sequence's attention reads in one group for one window: the blocks from the first
  // one a query sees, and the mask of (query, key) pairs when some are hidden.
  struct KeyRange {
    int32_t group = 0, window = 0;
    int32_t keyStart = 0;  // position of the first gathered key
    int32_t numKeys = 0;
    std::optional<mx::array> table;  // [blocks]
    std::optional<mx::array> mask;   // [1, 1, T, numKeys] bool
  };

  KeyRange keyRange(const model::ForwardBatch& batch, const model::ForwardSequence& s, int32_t group,
                    int32_t window) const {
    const int32_t B = geometry.blockSizeTokens;
    const int32_t end = s.firstPos + s.numTokens;
    const int32_t firstVisible = window > 0 ? std::max(0, s.firstPos - window + 1) : 0;
    const int32_t startBlock = firstVisible / B;
    const int32_t endBlock = (end + B - 1) / B;
    KeyRange r;
    r.group = group;
    r.window = window;
    r.keyStart = startBlock * B;
    r.numKeys = end - r.keyStart;
    const kv::BlockId* table = batch.blockTables.data() + s.tableStart +
                               static_cast<int64_t>(group) * s.numBlocks;
    std::vector<int32_t> ids(table + startBlock, table + endBlock);
    for (int32_t id : ids) {
      if (id < 0 || id >= numBlocks) {
        throw model::ModelError("forward: a block table entry a query reads is not a block");
      }
    }
    r.table = i32Array(ids);
    bool hidden = false;
    std::vector<uint8_t> mask(static_cast<size_t>(s.numTokens) * static_cast<size_t>(r.numKeys));
    for (int32_t i = 0; i < s.numTokens; ++i) {
      const int32_t qp = s.firstPos + i;
      for (int32_t j = 0; j < r.numKeys; ++j) {
        const int32_t kp = r.keyStart + j;
        const bool see = kp <= qp && (window == 0 || kp > qp - window);
        mask[static_cast<size_t>(i) * static_cast<size_t>(r.numKeys) + static_cast<size_t>(j)] =
            see ? 1 : 0;
        hidden = hidden || !see;
      }
    }
    if (hidden) {
      r.mask = mx::array(mask.begin(), mx::Shape{1, 1, s.numTokens, r.numKeys}, mx::bool_);
    }
    return r;
  }

  // One sequence's keys or values for attention, [1, heads, numKeys, headDim] float32.
  mx::array gather(const mx::array& arena, const KeyRange& r) const {
    const int32_t H = geometry.numKVHeads, B = geometry.blockSizeTokens, D = geometry.headDim;
    const int32_t nb = r.table->shape(0);
    mx::array g = mx::transpose(mx::take(arena, *r.table, 0), {1, 0, 2, 3});
    g = mx::reshape(g, {1, H, nb * B, D});
    g = mx::slice(g, {0, 0, 0, 0}, {1, H, r.numKeys, D});
    return mx::astype(g, mx::float32);
  }

  static mx::Stream useOwnStream() {
    const mx::Stream s = mx::new_thread_unsafe_stream(mx::Device::cpu);
    mx::set_default_stream(s);
    return s;
  }

  void applyPendingCopies() {
    std::vector<std::pair<kv::BlockId, kv::BlockId>> copies;
    {
      std::lock_guard lock(copyMu);
      copies.swap(pendingCopies);
    }
    const int32_t H = geometry.numKVHeads, B = geometry.blockSizeTokens, D = geometry.headDim;
    for (const auto& [from, to] : copies) {
      for (std::vector<mx::array>* half : {&kArena, &vArena}) {
        for (mx::array& a : *half) {
          // Evaluated one at a time so the arena array is updated in place.
          mx::array src = mx::take(a, mx::array({from}, {1}), 0);
          mx::eval(src);
          a = mx::scatter(a, {mx::array({to}, {1})}, mx::reshape(src, {1, 1, H, B, D}), {0});
          mx::eval(a);
        }
      }
    }
  }

  void forward(const model::ForwardBatch& batch, std::vector<float>& logits) {
    int64_t nOutRows = 0;
    int32_t maxContext = 1;
    model.validate(batch, nOutRows, maxContext);
    mx::set_default_stream(stream);
    const auto nTokens = static_cast<int64_t>(batch.tokens.size());
    if (nTokens == 0) {
      logits.clear();
      return;
    }
    applyPendingCopies();
    const int32_t T = i32(nTokens), E = hp.nEmbd, Hq = hp.nHead, Hkv = hp.nHeadKV,
                  D = hp.headDim, G = geometry.numGroups;
    // Inputs computed on the host: embeddings, RoPE angles, slots, output rows.
    std::vector<float> x0(static_cast<size_t>(nTokens * E));
    for (int64_t t = 0; t < nTokens; ++t) {
      kernels::dequantizeRow(tokenEmbd, batch.tokens[static_cast<size_t>(t)], x0.data() + t * E);
    }
    if (hp.embedScale != 1.0f) {
      for (float& v : x0) v *= hp.embedScale;
    }
    mx::array x(x0.begin(), mx::Shape{T, E}, mx::float32);
    auto angles = [&](const kernels::Rope& rope) {
      std::vector<float> cs(static_cast<size_t>(nTokens * hp.nRot));
      rope.angles(batch.positions.data(), nTokens, cs.data());
      const mx::array all(cs.begin(), mx::Shape{T, 1, hp.nRot}, mx::float32);
      const int32_t half = hp.nRot / 2;
      return std::pair{mx::slice(all, {0, 0, 0}, {T, 1, half}),
                       mx::slice(all, {0, 0, half}, {T, 1, hp.nRot})};
    };
    const auto [cosG, sinG] = angles(ropeGlobal);
    std::optional<std::pair<mx::array, mx::array>> swaAngles;
    if (ropeSwa) swaAngles = angles(*ropeSwa);
    std::vector<mx::array> blockIdx, offsetIdx;  // per group, [T]
    for (int32_t g = 0; g < G; ++g) {
      std::vector<int32_t> b(static_cast<size_t>(T)), o(static_cast<size_t>(T));
      for (int32_t t = 0; t < T; ++t) {
        const kv::TokenSlot slot = batch.slots[static_cast<size_t>(t) * static_cast<size_t>(G) +
                                               static_cast<size_t>(g)];
        if (slot.block < 0 || slot.block >= numBlocks) {
          throw model::ModelError("forward: a token's KV slot is not a block of the arena");
        }
        b[static_cast<size_t>(t)] = slot.block;
        o[static_cast<size_t>(t)] = slot.offset;
      }
      blockIdx.push_back(i32Array(b));
      offsetIdx.push_back(i32Array(o));
    }
    std::vector<int32_t> outRows;
    {
      int32_t t = 0;
      for (const model::ForwardSequence& s : batch.seqs) {
        for (int32_t i = s.allLogits ? 0 : s.numTokens - 1; i < s.numTokens; ++i) {
          outRows.push_back(t + i);
        }
        t += s.numTokens;
      }
    }
    // What each sequence's attention reads, per (group, window) some layer has: all of it made
    // (and checked) before the first layer updates an arena array, so a bad batch leaves the
    // arrays as they were.
    std::vector<std::vector<KeyRange>> ranges(batch.seqs.size());
    auto findRange = [&](size_t seq, int32_t group, int32_t window) -> const KeyRange* {
      for (const KeyRange& r : ranges[seq]) {
        if (r.group == group && r.window == window) return &r;
      }
      return nullptr;
    };
    for (int32_t l = 0; l < hp.nLayers; ++l) {
      const int32_t group = geometry.places[static_cast<size_t>(l)].group;
      const int32_t window = hp.isSlidingWindowLayer(l) ? hp.slidingWindow : 0;
      for (size_t i = 0; i < batch.seqs.size(); ++i) {
        if (findRange(i, group, window) == nullptr) {
          ranges[i].push_back(keyRange(batch, batch.seqs[i], group, window));
        }
      }
    }
    std::vector<const void*> before;
    for (const mx::array& a : kArena) before.push_back(a.data<void>());

    for (int32_t l = 0; l < hp.nLayers; ++l) {
      const Layer& L = layers[static_cast<size_t>(l)];
      mx::array h = mx::fast::rms_norm(x, L.attnNorm, hp.rmsEps);
      mx::array q = L.wq.apply(h), k = L.wk.apply(h), v = L.wv.apply(h);
      if (hp.qkvBias) {
        q = q + *L.bq;
        k = k + *L.bk;
        v = v + *L.bv;
      }
      q = mx::reshape(q, {T, Hq, D});
      k = mx::reshape(k, {T, Hkv, D});
      v = mx::reshape(v, {T, Hkv, D});
      if (hp.qkNorm) {
        q = mx::fast::rms_norm(q, *L.qNorm, hp.rmsEps);
        k = mx::fast::rms_norm(k, *L.kNorm, hp.rmsEps);
      }
      const bool swa = hp.isSlidingWindowLayer(l);
      const mx::array& c = swa ? swaAngles->first : cosG;
      const mx::array& sn = swa ? swaAngles->second : sinG;
      q = rope(q, c, sn);
      k = rope(k, c, sn);
      // This layer's K/V go to its group's blocks: one scatter per half.
      const kv::KVLayerPlace place = geometry.places[static_cast<size_t>(l)];
      const auto slot = static_cast<size_t>(place.slot);
      const auto g = static_cast<size_t>(place.group);
      const std::vector<mx::array> idx{blockIdx[g], offsetIdx[g]};
      kArena[slot] = mx::scatter(kArena[slot], idx,
                                 mx::reshape(mx::astype(k, kvDtype), {T, 1, Hkv, 1, D}), {0, 2});
      vArena[slot] = mx::scatter(vArena[slot], idx,
                                 mx::reshape(mx::astype(v, kvDtype), {T, 1, Hkv, 1, D}), {0, 2});
      // Attention, one sequence at a time, through its block table.
      std::vector<mx::array> outs;
      int32_t t0 = 0;
      for (size_t i = 0; i < batch.seqs.size(); ++i) {
        const model::ForwardSequence& s = batch.seqs[i];
        const KeyRange& r = *findRange(i, place.group, swa ? hp.slidingWindow : 0);
        mx::array qs = mx::slice(q, {t0, 0, 0}, {t0 + s.numTokens, Hq, D});
        qs = mx::expand_dims(mx::transpose(qs, {1, 0, 2}), 0);
        mx::array o = r.mask ? mx::fast::scaled_dot_product_attention(
                                   qs, gather(kArena[slot], r), gather(vArena[slot], r),
                                   hp.attnScale, "array", *r.mask)
                             : mx::fast::scaled_dot_product_attention(
                                   qs, gather(kArena[slot], r), gather(vArena[slot], r),
                                   hp.attnScale);
        outs.push_back(mx::reshape(mx::transpose(mx::squeeze(o, 0), {1, 0, 2}),
                                   {s.numTokens, Hq * D}));
        t0 += s.numTokens;
      }
      mx::array attn = outs.size() == 1 ? outs[0] : mx::concatenate(outs, 0);
      mx::array y = L.wo.apply(attn);
      if (hp.postNorms) y = mx::fast::rms_norm(y, *L.postAttnNorm, hp.rmsEps);
      x = x + y;
      // Feed-forward: SwiGLU or GeGLU (tanh GELU).
      h = mx::fast::rms_norm(x, L.ffnNorm, hp.rmsEps);
      const mx::array gate = L.wGate.apply(h), up = L.wUp.apply(h);
      mx::array act = [&] {
        if (!hp.geglu) return gate * mx::sigmoid(gate);
        const float k0 = std::sqrt(2.0f / static_cast<float>(M_PI));
        return 0.5f * gate * (1.0f + mx::tanh(k0 * (gate + 0.044715f * gate * gate * gate)));
      }();
      y = L.wDown.apply(act * up);
      if (hp.postNorms) y = mx::fast::rms_norm(y, *L.postFfnNorm, hp.rmsEps);
      x = x + y;
    }
    mx::array rows = mx::take(x, i32Array(outRows), 0);
    rows = mx::fast::rms_norm(rows, outputNorm, hp.rmsEps);
    mx::array out = output.apply(rows);
    if (outputBias) out = out + *outputBias;
    if (hp.finalLogitSoftcap > 0.0f) {
      const float cap = hp.finalLogitSoftcap;
      out = cap * mx::tanh(out / cap);
    }
    out = mx::astype(out, mx::float32);
    std::vector<mx::array> targets{out};
    targets.insert(targets.end(), kArena.begin(), kArena.end());
    targets.insert(targets.end(), vArena.begin(), vArena.end());
    mx::eval(targets);
    for (size_t s = 0; s < kArena.size(); ++s) {
      if (kArena[s].data<void>() != before[s]) {
        ++arenaCopies;
        break;
      }
    }
    logits.resize(static_cast<size_t>(nOutRows) * static_cast<size_t>(hp.nVocab));
    std::memcpy(logits.data(), out.data<float>(), logits.size() * sizeof(float));
  }
};

MlxModel::MlxModel(const model::TransformerModel& model, const kv::KVArena& arena,
                   int32_t numBlocks)
    : impl_(std::make_unique<Impl>(model, arena, numBlocks)) {}

MlxModel::~MlxModel() = default;

void MlxModel::copyBlock(kv::BlockId from, kv::BlockId to) {
  std::lock_guard lock(impl_->copyMu);
  impl_->pendingCopies.emplace_back(from, to);
}

void MlxModel::forward(const model::ForwardBatch& batch, std::vector<float>& logits) {
  try {
    impl_->forward(batch, logits);
  } catch (const std::invalid_argument& e) {  // MLX reports shape and type errors this way
    throw model::ModelError(std::string("MLX: ") + e.what());
  }
}

int64_t MlxModel::arenaCopies() const { return impl_->arenaCopies; }

}  // namespace cortex::mlxbackend
