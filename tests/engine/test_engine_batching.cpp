// The continuous-batching engine on the default model: concurrent greedy requests give exactly
// the outputs they give alone (batch-invariant kernels make exact equality the right check),
// also when a small pool forces preemptions; cancellation frees blocks; bad requests are refused.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "engine/generate.h"

namespace cortex::engine {
namespace {

const std::string kModel = std::string(CS_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Fixture : ::testing::Test {
  static void SetUpTestSuite() {
    ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " missing: run scripts/fetch_model.sh";
    model = model::LlamaModel::load(kModel).release();
    tokenizer = new model::Tokenizer(model::Tokenizer::fromGGUF(model->file()));
  }
  static void TearDownTestSuite() {
    delete tokenizer;
    delete model;
  }
  static RequestParams greedy(const std::string& prompt, int32_t maxTokens) {
    RequestParams p;
    p.promptTokens = tokenizer->encode(prompt, true, true);
    p.sampling.temperature = 0;
    p.maxTokens = maxTokens;
    return p;
  }
  // The single-request path (engine/generate.h) as the reference.
  static std::vector<int32_t> alone(const RequestParams& p) {
    kv::KVCache cache(model->kvCacheConfig(16, 64ull << 20));
    GenerateRequest g;
    g.promptTokens = p.promptTokens;
    g.sampling = p.sampling;
    g.maxTokens = p.maxTokens;
    return generate(*model, *tokenizer, cache, 1, g, nullptr).tokens;
  }
  static std::pair<std::vector<int32_t>, RequestEvent> collect(RequestStream& s) {
    std::vector<int32_t> tokens;
    for (;;) {
      auto e = s.next(std::chrono::seconds(120));
      if (!e) ADD_FAILURE() << "timed out";
      if (!e) return {tokens, {}};
      tokens.insert(tokens.end(), e->tokens.begin(), e->tokens.end());
      if (e->finished) return {tokens, *e};
    }
  }
  static inline model::LlamaModel* model = nullptr;
  static inline model::Tokenizer* tokenizer = nullptr;
};

const std::vector<std::string> kPrompts = {
    "The capital of France is", "Once upon a time", "def add(a, b):", "List three colors:",
    "The quick brown fox", "In 1969, humans", "Water boils at", "My favourite food is",
};

TEST_F(Fixture, ConcurrentGreedyEqualsAlone) {
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  c.maxBatchedTokens = 64;  // forces chunked prefill of the longer prompts next to decodes
  Engine engine(*model, *tokenizer, c);
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : kPrompts) streams.push_back(engine.submit(greedy(p, 12)));
  std::vector<std::vector<int32_t>> outputs;
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    auto [tokens, last] = collect(*streams[i]);
    outputs.push_back(tokens);
    EXPECT_TRUE(last.finishReason == FinishReason::Length || last.finishReason == FinishReason::Stop);
  }
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  // note: the references run after the engine is done: a model runs one forward at a time.
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ(outputs[i], alone(greedy(kPrompts[i], 12))) << kPrompts[i];
  }
}

TEST_F(Fixture, SmallPoolPreemptsAndStillMatches) {
  EngineConfig c;
  // 6 blocks of 16 tokens (f16: 30 layers x 2 x 3 heads x 64 dims x 2 bytes a token); four
  // requests of ~5 + 24 tokens need 8 blocks together: the pool runs dry mid-decode.
  c.kvCacheBytes = 6ull * 16 * 30 * 2 * 3 * 64 * 2;
  c.maxBatchedTokens = 32;
  Engine engine(*model, *tokenizer, c);
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (int i = 0; i < 4; ++i) streams.push_back(engine.submit(greedy(kPrompts[static_cast<size_t>(i)], 24)));
  std::vector<std::vector<int32_t>> outputs;
  for (int i = 0; i < 4; ++i) outputs.push_back(collect(*streams[static_cast<size_t>(i)]).first);
  EXPECT_GT(engine.stats().preemptions, 0u);
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(outputs[static_cast<size_t>(i)], alone(greedy(kPrompts[static_cast<size_t>(i)], 24)))
        << kPrompts[static_cast<size_t>(i)];
  }
}

TEST_F(Fixture, CancelFreesBlocks) {
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  Engine engine(*model, *tokenizer, c);
  RequestParams p = greedy("Tell me a long story about a dragon.", 2000);
  p.ignoreEos = true;
  auto s = engine.submit(p);
  auto first = s->next(std::chrono::seconds(60));
  ASSERT_TRUE(first.has_value());
  EXPECT_GT(engine.stats().kv.usedBlocks, 0);
  s->cancel();
  auto [tokens, last] = collect(*s);
  EXPECT_EQ(last.finishReason, FinishReason::Cancelled);
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  EXPECT_EQ(engine.stats().finishedCancelled, 1u);
}

TEST_F(Fixture, RefusesWhatCanNeverRun) {
  EngineConfig c;
  c.kvCacheBytes = 8ull << 20;
  Engine engine(*model, *tokenizer, c);
  auto kindOf = [&](RequestParams p) {
    try {
      engine.submit(std::move(p));
    } catch (const EngineError& e) {
      return e.kind();
    }
    ADD_FAILURE() << "accepted";
    return EngineError::Kind::ShuttingDown;
  };
  RequestParams empty;
  EXPECT_EQ(kindOf(empty), EngineError::Kind::InvalidRequest);
  RequestParams big = greedy("hi", 100000);
  EXPECT_EQ(kindOf(big), EngineError::Kind::TooLong);
  RequestParams badTemp = greedy("hi", 4);
  badTemp.sampling.temperature = -1;
  EXPECT_EQ(kindOf(badTemp), EngineError::Kind::InvalidRequest);
  RequestParams badId = greedy("hi", 4);
  badId.promptTokens.push_back(1 << 30);
  EXPECT_EQ(kindOf(badId), EngineError::Kind::InvalidRequest);
  engine.drain();
  EXPECT_EQ(kindOf(greedy("hi", 4)), EngineError::Kind::ShuttingDown);
}

TEST_F(Fixture, LogprobsAndPromptLogprobs) {
  EngineConfig c;
  c.kvCacheBytes = 16ull << 20;
  Engine engine(*model, *tokenizer, c);
  RequestParams p = greedy("The capital of France is", 3);
  p.topLogprobs = 2;
  p.promptLogprobs = true;
  auto s = engine.submit(p);
  std::vector<TokenLogprob> lps, prompt;
  for (;;) {
    auto e = s->next(std::chrono::seconds(60));
    ASSERT_TRUE(e.has_value());
    lps.insert(lps.end(), e->logprobs.begin(), e->logprobs.end());
    prompt.insert(prompt.end(), e->promptLogprobs.begin(), e->promptLogprobs.end());
    if (e->finished) break;
  }
  ASSERT_EQ(lps.size(), 3u);
  for (const auto& t : lps) {
    ASSERT_EQ(t.top.size(), 2u);
    EXPECT_EQ(t.top[0].first, t.token);  // greedy picks the most likely token
    EXPECT_LE(t.logprob, 0.0f);
    EXPECT_GE(t.top[0].second, t.top[1].second);
  }
  ASSERT_EQ(prompt.size(), p.promptTokens.size());
  EXPECT_TRUE(std::isnan(prompt[0].logprob));
  for (size_t i = 1; i < prompt.size(); ++i) {
    EXPECT_EQ(prompt[i].token, p.promptTokens[i]);
    EXPECT_LT(prompt[i].logprob, 0.0f);
  }
}

}  // namespace
}  // namespace cortex::engine
