// The MLX backend on the default model, against the CPU backend's float32 path and against itself:
//   - logits of every prompt position within 1e-4 of the CPU float32 path's (relative to the
//     largest logit). Both multiply the same weight values (MLX's affine groups hold the file's
//     scales and biases exactly) in float32 with float32 K/V; they differ only in summation order
//     (MLX's quantized matmul and attention against our kernels), ~1e-6 relative per dot
//     product, grown through 30 layers.
//     Measured: 5e-6.
//   - batch invariance on MLX's CPU device: a sequence's logits are bit-identical alone or next
//     to another sequence in the step, and whether its prompt is prefilled whole or in chunks of
//     7 (MLX's CPU kernels compute each row, and each sequence's attention, on its own). MLX's
//     GPU kernels make no such promise (not measured: no Apple GPU here).
//   - copies on write (a fork's shared, partly filled block) happen in the MLX arrays.
//   - the K/V arrays are updated in place step after step (no copy of an arena array), on the
//     default model and on Gemma 3, whose hybrid cache has layers of different groups in one slot.
//   - a storage type MLX does not read (q8) is refused when the runner is made.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "engine/model_runner.h"
#include "runner_test_util.h"
#include "mlx_backend/mlx_model.h"
#include "model/errors.h"
#include "model/tokenizer.h"

namespace cortex::engine {
namespace {

const std::string kModel = std::string(CS_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
const std::string kGemma = std::string(CS_SOURCE_DIR) + "/models/gemma-3-270m-q4_k_m.gguf";

class MlxBackendTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " missing: run scripts/fetch_model.sh";
    model = model::TransformerModel::load(kModel, model::Precision::F32).release();
    const auto tok = model::Tokenizer::fromGGUF(model->file());
    promptA = tok.encode("The history of the river is long. It rises in the mountains and runs "
                         "through forests and farmland to the sea.", true, true);
    promptB = tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n", true, true);
  }
  static void TearDownTestSuite() {
    delete model;
    model = nullptr;
  }
  static std::unique_ptr<kv::KVCache> newCache(kv::KVDType dtype = kv::KVDType::F32) {
    return std::make_unique<kv::KVCache>(model->kvCacheConfig(16, 64ull << 20, dtype));
  }
  static size_t vocab() { return static_cast<size_t>(model->hparams().nVocab); }

  static double relError(const std::vector<float>& a, const std::vector<float>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      num = std::max(num, std::abs(static_cast<double>(a[i]) - ref[i]));
      den = std::max(den, std::abs(static_cast<double>(ref[i])));
    }
    return num / den;
  }

  static inline model::TransformerModel* model = nullptr;
  static inline std::vector<int32_t> promptA, promptB;
};

TEST_F(MlxBackendTest, PrefillLogitsMatchTheCpuFloat32Path) {
  auto cpuCache = newCache();
  ModelRunner cpu(*model, *cpuCache, 2, Backend::Cpu);
  const std::vector<float> want = prefillRows(cpu, *cpuCache, promptA, 512);
  auto mlxCache = newCache();
  ModelRunner mlx(*model, *mlxCache, 2, Backend::Mlx);
  const std::vector<float> got = prefillRows(mlx, *mlxCache, promptA, 512);
  ASSERT_EQ(got.size(), promptA.size() * vocab());
  const double err = relError(got, want);
  std::printf("MLX vs CPU float32: max relative logit difference %.3g\n", err);
  EXPECT_LT(err, 1e-4);
}

TEST_F(MlxBackendTest, BatchedWithAnotherSequenceGivesTheSameBits) {
  auto c1 = newCache();
  ModelRunner alone(*model, *c1, 2, Backend::Mlx);
  const std::vector<float> want = prefillRows(alone, *c1, promptA, 512);

  auto c2 = newCache();
  ModelRunner both(*model, *c2, 2, Backend::Mlx);
  c2->allocateFor(1, static_cast<int32_t>(promptB.size()));
  c2->allocateFor(0, static_cast<int32_t>(promptA.size()));
  both.add(1, 0, promptB, true);
  both.add(0, 0, promptA, true);
  std::vector<float> logits;
  both.run(logits);
  const size_t off = promptB.size() * vocab();
  ASSERT_EQ(logits.size(), off + want.size());
  EXPECT_EQ(std::memcmp(want.data(), logits.data() + off, want.size() * 4), 0);

  // One decode token each, batched, against sequence 0's decode alone.
  const int32_t next = 42;
  c1->appendToken(0);
  alone.clear();
  alone.add(0, static_cast<int32_t>(promptA.size()), std::span<const int32_t>(&next, 1), false);
  std::vector<float> single;
  alone.run(single);
  c2->appendToken(1);
  c2->appendToken(0);
  both.clear();
  both.add(1, static_cast<int32_t>(promptB.size()), std::span<const int32_t>(&next, 1), false);
  both.add(0, static_cast<int32_t>(promptA.size()), std::span<const int32_t>(&next, 1), false);
  both.run(logits);
  ASSERT_EQ(logits.size(), 2 * vocab());
  EXPECT_EQ(std::memcmp(single.data(), logits.data() + vocab(), vocab() * 4), 0);
}

TEST_F(MlxBackendTest, ChunkedPrefillGivesTheSameBits) {
  auto c1 = newCache();
  ModelRunner whole(*model, *c1, 2, Backend::Mlx);
  const std::vector<float> want = prefillRows(whole, *c1, promptA, 512);
  auto c2 = newCache();
  ModelRunner chunked(*model, *c2, 2, Backend::Mlx);
  const std::vector<float> got = prefillRows(chunked, *c2, promptA, 7);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_EQ(std::memcmp(got.data(), want.data(), 4 * want.size()), 0)
      << "max relative logit difference " << relError(got, want);
}

TEST_F(MlxBackendTest, ForkCopiesTheSharedBlockInMlxArrays) {
  // 20 prompt tokens: the second block is shared and partly filled, so each fork's next token
  // makes a copy on write. Both forks then decode the same token: equal to the unforked decode.
  const std::vector<int32_t> prompt(promptA.begin(), promptA.begin() + 20);
  const int32_t next = 7;
  std::vector<float> want, logits;
  {
    auto c = newCache();
    ModelRunner r(*model, *c, 2, Backend::Mlx);
    prefillRows(r, *c, prompt, 512);
    c->appendToken(0);
    r.clear();
    r.add(0, 20, std::span<const int32_t>(&next, 1), false);
    r.run(want);
  }
  auto c = newCache();
  ModelRunner r(*model, *c, 2, Backend::Mlx);
  prefillRows(r, *c, prompt, 512);
  c->fork(0, 1);
  c->appendToken(0);
  c->appendToken(1);
  // The forks hold different last blocks now: a copy was made.
  ASSERT_NE(c->blockTable(0).back(), c->blockTable(1).back());
  r.clear();
  r.add(0, 20, std::span<const int32_t>(&next, 1), false);
  r.add(1, 20, std::span<const int32_t>(&next, 1), false);
  r.run(logits);
  ASSERT_EQ(logits.size(), 2 * vocab());
  EXPECT_EQ(std::memcmp(want.data(), logits.data(), vocab() * 4), 0);
  EXPECT_EQ(std::memcmp(want.data(), logits.data() + vocab(), vocab() * 4), 0);
}

TEST_F(MlxBackendTest, ArenaArraysAreUpdatedInPlace) {
  for (const std::string& path : {kModel, kGemma}) {
    ASSERT_TRUE(std::filesystem::exists(path)) << path << " missing: run scripts/fetch_model.sh";
    const auto m = model::TransformerModel::load(path, model::Precision::F32);
    kv::KVCache cache(m->kvCacheConfig(16, 32ull << 20, kv::KVDType::F16));
    mlxbackend::MlxModel mlx(*m, cache.arena(), cache.numBlocks());
    std::vector<float> logits;
    // One step of `tokens` at firstPos for sequence 0, resolved as the model runner does.
    auto step = [&](int32_t firstPos, const std::vector<int32_t>& tokens) {
      const auto n = static_cast<int32_t>(tokens.size());
      const std::vector<kv::StepSequence> plan{{0, firstPos, n}};
      model::ForwardBatch b;
      b.seqs.push_back({firstPos, n, 0, 0, false});
      b.tokens = tokens;
      for (int32_t i = 0; i < n; ++i) b.positions.push_back(firstPos + i);
      std::vector<int32_t> starts;
      cache.resolveStep(plan, b.slots, b.blockTables, starts);
      b.seqs[0].numBlocks = static_cast<int32_t>(b.blockTables.size()) / cache.numGroups();
      b.arena = cache.arena();
      mlx.forward(b, logits);
    };
    std::vector<int32_t> prompt;
    for (int32_t i = 0; i < 40; ++i) prompt.push_back(100 + 7 * i);
    cache.allocateFor(0, 40);
    step(0, prompt);
    for (int32_t i = 0; i < 3; ++i) {
      cache.appendToken(0);
      step(40 + i, {5});
    }
    EXPECT_EQ(mlx.arenaCopies(), 0) << path;
    EXPECT_EQ(logits.size(), static_cast<size_t>(m->hparams().nVocab));
  }
}

TEST_F(MlxBackendTest, RefusesInt8KvStorage) {
  auto c = newCache(kv::KVDType::Q8);
  try {
    ModelRunner r(*model, *c, 2, Backend::Mlx);
    FAIL() << "q8 storage accepted";
  } catch (const model::ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("q8"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace cortex::engine
