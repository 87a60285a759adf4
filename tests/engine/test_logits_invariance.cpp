// Batch invariance of the forward pass on the default model, for both precisions, on the
// instruction-set level this process runs (CORTEXSTREAM_ISA; ctest runs this file once per level
// and a level the CPU lacks is skipped): a token's logits are bit-identical whether its prompt is
// prefilled whole on one thread, in chunks of 7 on two or three threads, or in one step next to
// another sequence, and a decode step gives the same row alone or batched.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "engine/model_runner.h"
#include "runner_test_util.h"
#include "kernels/isa.h"
#include "model/tokenizer.h"

namespace cortex::engine {
namespace {

const std::string kModel = std::string(CS_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

class Invariance : public ::testing::TestWithParam<model::Precision> {
 protected:
  static void SetUpTestSuite() {
    const char* env = std::getenv("CORTEXSTREAM_ISA");
    if (env != nullptr && *env != '\0') {
      const auto isa = kernels::parseIsa(env);
      ASSERT_TRUE(isa.has_value()) << env;
      if (!kernels::cpuSupports(*isa)) return;  // every test skips itself
    }
    ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " missing: run scripts/fetch_model.sh";
    for (model::Precision p : {model::Precision::Int8, model::Precision::F32}) {
      models[static_cast<int>(p)] = model::TransformerModel::load(kModel, p).release();
    }
    const auto tok = model::Tokenizer::fromGGUF(models[0]->file());
    promptA = tok.encode("The history of the river is long. It rises in the mountains and runs "
                         "through forests and farmland to the sea.", true, true);
    promptB = tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n", true, true);
  }
  static void TearDownTestSuite() {
    for (auto*& m : models) {
      delete m;
      m = nullptr;
    }
  }
  void SetUp() override {
    if (models[0] == nullptr) GTEST_SKIP() << "this CPU lacks the requested kernel level";
  }
  model::TransformerModel& model() { return *models[static_cast<int>(GetParam())]; }
  std::unique_ptr<kv::KVCache> newCache() {
    return std::make_unique<kv::KVCache>(model().kvCacheConfig(16, 64ull << 20));
  }
  size_t vocab() { return static_cast<size_t>(model().hparams().nVocab); }

  static inline model::TransformerModel* models[2] = {nullptr, nullptr};
  static inline std::vector<int32_t> promptA, promptB;
};

// Rows of every prompt position of `prompt`, prefilled in chunks of `chunk` on `threads` threads.
std::vector<float> prefillRows(model::TransformerModel& m, kv::KVCache& cache,
                               const std::vector<int32_t>& prompt, int32_t chunk, int threads) {
  ModelRunner runner(m, cache, threads);
  return prefillRows(runner, cache, prompt, chunk);
}

bool sameBits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, 4 * n) == 0; }

TEST_P(Invariance, PrefillChunksAndThreadsGiveTheSameBits) {
  auto c1 = newCache();
  const std::vector<float> whole = prefillRows(model(), *c1, promptA, 512, 1);
  ASSERT_EQ(whole.size(), promptA.size() * vocab());
  for (int threads : {2, 3}) {
    auto c = newCache();
    const std::vector<float> chunked = prefillRows(model(), *c, promptA, 7, threads);
    ASSERT_TRUE(sameBits(whole.data(), chunked.data(), whole.size())) << threads << " threads";
  }
}

TEST_P(Invariance, BatchedWithAnotherSequenceGivesTheSameBits) {
  auto c1 = newCache();
  const std::vector<float> alone = prefillRows(model(), *c1, promptA, 512, 2);
  // One step: B's prompt, then A's prompt; then one decode token for each, in one step and alone.
  auto c = newCache();
  ModelRunner runner(model(), *c, 2);
  c->allocateFor(1, static_cast<int32_t>(promptB.size()));
  c->allocateFor(0, static_cast<int32_t>(promptA.size()));
  runner.add(1, 0, promptB, true);
  runner.add(0, 0, promptA, true);
  std::vector<float> logits;
  runner.run(logits);
  const size_t off = promptB.size() * vocab();
  ASSERT_EQ(logits.size(), off + alone.size());
  ASSERT_TRUE(sameBits(alone.data(), logits.data() + off, alone.size()));

  const int32_t next = 42;
  c->appendToken(0);
  c->appendToken(1);
  runner.clear();
  runner.add(1, static_cast<int32_t>(promptB.size()), std::span<const int32_t>(&next, 1), false);
  runner.add(0, static_cast<int32_t>(promptA.size()), std::span<const int32_t>(&next, 1), false);
  runner.run(logits);
  const std::vector<float> batchedDecode(logits.begin() + static_cast<long>(vocab()),
                                         logits.end());
  auto c2 = newCache();
  prefillRows(model(), *c2, promptA, 512, 1);
  ModelRunner single(model(), *c2, 1);
  c2->appendToken(0);
  single.add(0, static_cast<int32_t>(promptA.size()), std::span<const int32_t>(&next, 1), false);
  single.run(logits);
  ASSERT_EQ(logits.size(), vocab());
  ASSERT_TRUE(sameBits(logits.data(), batchedDecode.data(), vocab()));
}

INSTANTIATE_TEST_SUITE_P(Precisions, Invariance,
                         ::testing::Values(model::Precision::Int8, model::Precision::F32),
                         [](const auto& p) { return std::string(model::toString(p.param)); });

}  // namespace
}  // namespace cortex::engine
