// The continuous-batching engine on the default model: concurrent requests (greedy, and seeded
// sampling) give exactly the outputs they give alone (batch-invariant kernels make exact equality
// the right check), also when a small pool forces preemptions, and the tests check that they
// really shared steps; cancellation frees blocks; bad requests are refused; a failure injected
// into a step ends the requests it concerns and the engine goes on.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <iostream>
#include <filesystem>

#include "engine/generate.h"

namespace cortex::engine {
namespace {

const std::string kModel = std::string(CS_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

struct Fixture : ::testing::Test {
  static void SetUpTestSuite() {
    ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " missing: run scripts/fetch_model.sh";
    model = model::TransformerModel::load(kModel).release();
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
  // The reference: the request alone on its own engine (nothing else in any step).
  static std::vector<int32_t> alone(const RequestParams& p) {
    EngineConfig c;
    c.kvCacheBytes = 64ull << 20;
    Engine engine(*model, *tokenizer, c);
    const GenerateResult r = generate(engine, p);
    EXPECT_EQ(engine.stats().peakStepSequences, 1);
    return r.tokens;
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
  static inline model::TransformerModel* model = nullptr;
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
  EXPECT_GT(engine.stats().peakStepSequences, 1);  // they did run in the same steps
  // note: the references run after the engine is done: a model runs one forward at a time.
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ(outputs[i], alone(greedy(kPrompts[i], 12))) << kPrompts[i];
  }
}

TEST_F(Fixture, SeededSamplingIsTheSameAloneUnderLoadAndUnderPreemption) {
  auto sampled = [](size_t i) {
    RequestParams p = greedy(kPrompts[i], 16);
    p.sampling.temperature = 0.9f;
    p.sampling.topP = 0.95f;
    p.sampling.seed = 1000 + i;
    p.ignoreEos = true;
    return p;
  };
  for (const uint64_t kvBytes : {64ull << 20, 6ull * 16 * 30 * 2 * 3 * 64 * 2}) {
    EngineConfig c;
    c.kvCacheBytes = kvBytes;  // the second pool is small enough to force preemptions
    c.maxBatchedTokens = 32;
    Engine engine(*model, *tokenizer, c);
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (size_t i = 0; i < 4; ++i) streams.push_back(engine.submit(sampled(i)));
    std::vector<std::vector<int32_t>> outputs;
    for (size_t i = 0; i < 4; ++i) outputs.push_back(collect(*streams[i]).first);
    EXPECT_GT(engine.stats().peakStepSequences, 1);
    if (kvBytes < (1u << 20)) {
      EXPECT_GT(engine.stats().preemptions, 0u);
    }
    for (size_t i = 0; i < 4; ++i) EXPECT_EQ(outputs[i], alone(sampled(i))) << kPrompts[i];
  }
}

TEST_F(Fixture, AFailedForwardEndsItsRequestsAndTheEngineGoesOn) {
  std::atomic<int> forwards{0};
  EngineHooks hooks;
  hooks.beforeForward = [&](std::span<const kv::SeqId>) {
    if (++forwards == 3) throw std::runtime_error("injected forward failure");
  };
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  Engine engine(*model, *tokenizer, c, hooks);
  auto a = engine.submit(greedy(kPrompts[0], 8));
  auto b = engine.submit(greedy(kPrompts[1], 8));
  auto [ta, la] = collect(*a);
  auto [tb, lb] = collect(*b);
  EXPECT_EQ(la.finishReason, FinishReason::Error);
  EXPECT_EQ(lb.finishReason, FinishReason::Error);
  EXPECT_NE(la.error.find("injected forward failure"), std::string::npos) << la.error;
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  // The engine still serves, and what it serves is right.
  auto [tokens, last] = collect(*engine.submit(greedy(kPrompts[2], 8)));
  EXPECT_EQ(last.finishReason, FinishReason::Length);
  EXPECT_EQ(tokens, alone(greedy(kPrompts[2], 8)));
  EXPECT_EQ(engine.stats().finishedError, 2u);
}

TEST_F(Fixture, AFailedSampleEndsOnlyThatRequest) {
  std::atomic<kv::SeqId> victim{0};
  EngineHooks hooks;
  hooks.beforeSample = [&](kv::SeqId seq) {
    if (seq == victim.load()) throw std::runtime_error("injected sampling failure");
  };
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  Engine engine(*model, *tokenizer, c, hooks);
  auto a = engine.submit(greedy(kPrompts[0], 8));
  RequestParams p = greedy(kPrompts[1], 8);
  auto b = engine.submit(p);
  victim = b->id();
  auto [ta, la] = collect(*a);
  auto [tb, lb] = collect(*b);
  EXPECT_EQ(lb.finishReason, FinishReason::Error);
  EXPECT_NE(lb.error.find("injected sampling failure"), std::string::npos) << lb.error;
  EXPECT_EQ(la.finishReason, FinishReason::Length);
  EXPECT_EQ(ta, alone(greedy(kPrompts[0], 8)));
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
}

TEST_F(Fixture, AConversationsNextTurnFindsItsHistoryCachedAndAnswersTheSame) {
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  Engine engine(*model, *tokenizer, c);
  RequestParams turn1 =
      greedy("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n", 12);
  const GenerateResult r1 = generate(engine, turn1);
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  EXPECT_GT(engine.stats().kv.cachedBlocks, 0);  // kept, evictable
  // The next turn: the whole conversation so far, then a new user message.
  RequestParams turn2 = turn1;
  turn2.promptTokens.insert(turn2.promptTokens.end(), r1.tokens.begin(), r1.tokens.end());
  const std::vector<int32_t> more = tokenizer->encode(
      "\n<|im_start|>user\nAnd another?<|im_end|>\n<|im_start|>assistant\n", false, true);
  turn2.promptTokens.insert(turn2.promptTokens.end(), more.begin(), more.end());
  const EngineStats before = engine.stats();
  auto stream = engine.submit(turn2);
  auto [tokens, last] = collect(*stream);
  // Every full block turn 1 computed (its prompt and all its tokens but the last, which was
  // sampled and never fed back) is found; only the rest is computed.
  const auto computed1 = static_cast<int32_t>(turn1.promptTokens.size() + r1.tokens.size() - 1);
  const int32_t cached = computed1 / c.blockSizeTokens * c.blockSizeTokens;
  EXPECT_EQ(last.cachedTokens, cached);
  const EngineStats after = engine.stats();
  EXPECT_EQ(after.prefixCacheHits - before.prefixCacheHits, static_cast<uint64_t>(cached));
  EXPECT_EQ(after.prefixCacheQueries - before.prefixCacheQueries, turn2.promptTokens.size());
  EXPECT_EQ(after.promptTokens - before.promptTokens, turn2.promptTokens.size() - cached);
  // The same answer as computing the whole conversation from scratch.
  EXPECT_EQ(tokens, alone(turn2));
}

TEST_F(Fixture, CachingOnAndOffGiveTheSameTokensUnder20RequestsAndPreemption) {
  const std::string system =
      "<|im_start|>system\nYou are a helpful assistant who answers in one short sentence, "
      "names sources when asked, and never makes up facts.<|im_end|>\n<|im_start|>user\n";
  const std::vector<std::string> questions = {
      "Where is Paris?", "What is water?", "Name a planet.", "Who wrote Hamlet?",
      "What is two plus two?", "Name a river.", "What colour is the sky?", "Name a fruit.",
      "Where is Rome?", "What is fire?", "Name a metal.", "Name a bird."};
  auto run = [&](bool caching, EngineStats& stats) {
    EngineConfig c;
    c.kvCacheBytes = 0;
    c.prefixCaching = caching;
    c.maxBatchedTokens = 64;
    // A pool of 16 blocks of 16 tokens: 20 requests of ~60 tokens cannot all hold their blocks.
    c.kvCacheBytes = 16 * kv::bytesPerBlock(model->kvCacheConfig(16, 1, c.kvDtype));
    Engine engine(*model, *tokenizer, c);
    // 20 requests at once (as 20 clients would send them): each question, then some of them
    // again with a number, so the second ones can hit the first ones' blocks.
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (size_t i = 0; i < 20; ++i) {
      std::string q = questions[i % questions.size()];
      if (i >= questions.size()) q += " (" + std::to_string(i) + ")";
      streams.push_back(
          engine.submit(greedy(system + q + "<|im_end|>\n<|im_start|>assistant\n", 16)));
    }
    std::vector<std::vector<int32_t>> out;
    for (auto& s : streams) out.push_back(collect(*s).first);
    stats = engine.stats();
    EXPECT_EQ(stats.kv.usedBlocks, 0);
    return out;
  };
  EngineStats on, off;
  const auto withCache = run(true, on);
  const auto without = run(false, off);
  EXPECT_EQ(withCache, without);
  EXPECT_GT(on.prefixCacheHits, 0u);
  EXPECT_GT(on.preemptions + off.preemptions, 0u);
  EXPECT_EQ(off.prefixCacheHits, 0u);
  EXPECT_LT(on.promptTokens, off.promptTokens);
}

TEST_F(Fixture, NChoicesShareOnePrefillAndEachSamplesItsOwnStream) {
  RequestParams p = greedy("Write a short poem about the sea:", 10);
  p.sampling.temperature = 0.9f;
  p.sampling.seed = 42;
  p.n = 4;
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  Engine engine(*model, *tokenizer, c);
  auto stream = engine.submit(p);
  std::vector<std::vector<int32_t>> choices(4);
  int32_t finished = 0;
  while (auto e = stream->next(std::chrono::seconds(120))) {
    ASSERT_GE(e->index, 0);
    ASSERT_LT(e->index, 4);
    auto& t = choices[static_cast<size_t>(e->index)];
    t.insert(t.end(), e->tokens.begin(), e->tokens.end());
    finished += e->finished ? 1 : 0;
  }
  EXPECT_EQ(finished, 4);
  EXPECT_EQ(engine.stats().promptTokens, p.promptTokens.size());  // prefilled once
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  // Choice i is exactly the request alone with seed 42 + i (batch-invariant numerics).
  for (int32_t i = 0; i < 4; ++i) {
    RequestParams one = p;
    one.n = 1;
    one.sampling.seed = 42 + static_cast<uint64_t>(i);
    EXPECT_EQ(choices[static_cast<size_t>(i)], alone(one)) << "choice " << i;
  }
  EXPECT_NE(choices[0], choices[1]);
}

// The KV blocks an n = 8 request holds at its peak, against 8 separate requests for the same
// prompt submitted together (printed for the record; the shared prompt must make n = 8 smaller).
// Prefix caching is off in both: separate requests admitted after the first one's prefill would
// share its full blocks through the cache, and how many do depends on timing.
TEST_F(Fixture, NEightHoldsFewerBlocksThanEightRequests) {
  RequestParams p = greedy(
      "Summarise the history of the printing press in Europe, from Gutenberg's workshop in "
      "Mainz to the spread of presses across the continent, in a few sentences:", 24);
  p.sampling.temperature = 0.8f;
  auto peakBlocks = [&](int32_t n, int32_t requests) {
    EngineConfig c;
    c.kvCacheBytes = 64ull << 20;
    c.prefixCaching = false;
    std::atomic<int32_t> peak{0};
    Engine* self = nullptr;
    EngineHooks hooks;
    hooks.beforeForward = [&](std::span<const kv::SeqId>) {
      peak = std::max(peak.load(), self->stats().kv.usedBlocks);
    };
    Engine engine(*model, *tokenizer, c, hooks);
    self = &engine;
    std::vector<std::shared_ptr<RequestStream>> streams;
    RequestParams q = p;
    q.n = n;
    for (int32_t i = 0; i < requests; ++i) streams.push_back(engine.submit(q));
    for (auto& s : streams) {
      while (s->next(std::chrono::seconds(120))) {
      }
    }
    return peak.load();
  };
  const int32_t shared = peakBlocks(8, 1);
  const int32_t separate = peakBlocks(1, 8);
  std::cout << "peak KV blocks: n = 8: " << shared << ", 8 requests: " << separate << "\n";
  EXPECT_LT(shared, separate);
}

TEST_F(Fixture, BestOfReturnsTheMostLikelyCandidates) {
  RequestParams p = greedy("My favourite animal is", 6);
  p.sampling.temperature = 1.0f;
  p.sampling.seed = 7;
  p.n = 2;
  p.bestOf = 4;
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  std::vector<std::vector<int32_t>> got(2);
  {
    Engine engine(*model, *tokenizer, c);
    auto stream = engine.submit(p);
    while (auto e = stream->next(std::chrono::seconds(120))) {
      ASSERT_TRUE(e->finished);  // each choice comes whole
      got[static_cast<size_t>(e->index)] = e->tokens;
    }
  }
  // The candidates are the requests alone with seeds 7..10; rank them by cumulative logprob.
  std::vector<std::pair<double, std::vector<int32_t>>> ranked;
  for (int32_t i = 0; i < 4; ++i) {
    RequestParams one = p;
    one.n = 1;
    one.bestOf = 0;
    one.sampling.seed = 7 + static_cast<uint64_t>(i);
    one.topLogprobs = 0;
    Engine engine(*model, *tokenizer, c);
    auto s = engine.submit(one);
    double sum = 0;
    std::vector<int32_t> tokens;
    while (auto e = s->next(std::chrono::seconds(120))) {
      for (const auto& l : e->logprobs) sum += l.logprob;
      tokens.insert(tokens.end(), e->tokens.begin(), e->tokens.end());
    }
    ranked.emplace_back(sum, tokens);
  }
  std::stable_sort(ranked.begin(), ranked.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  EXPECT_EQ(got[0], ranked[0].second);
  EXPECT_EQ(got[1], ranked[1].second);
}

TEST_F(Fixture, ScoringWithoutGeneratingGivesPromptLogprobsOnly) {
  EngineConfig c;
  c.kvCacheBytes = 16ull << 20;
  c.maxBatchedTokens = 4;  // the prompt is scored across several chunks
  Engine engine(*model, *tokenizer, c);
  RequestParams p = greedy("The capital of France is Paris.", 0);
  p.promptLogprobs = true;
  const GenerateResult r = generate(engine, p);
  EXPECT_TRUE(r.tokens.empty());
  EXPECT_EQ(r.finishReason, FinishReason::Length);
  ASSERT_EQ(r.promptLogprobs.size(), p.promptTokens.size());
  for (size_t i = 1; i < r.promptLogprobs.size(); ++i) EXPECT_LT(r.promptLogprobs[i].logprob, 0.0f);
  RequestParams bad = greedy("hi", 0);
  EXPECT_THROW(engine.submit(bad), EngineError);  // max tokens 0 needs prompt logprobs
}

constexpr uint64_t kBlockBytes = 16ull * 30 * 2 * 3 * 64 * 2;  // f16: 16 tokens of K and V

// A fresh, empty folder for a disk tier, removed with the object.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name)
      : path(std::filesystem::temp_directory_path() /
             (name + "-" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
              "-" + std::to_string(reinterpret_cast<uintptr_t>(this)))) {
    std::filesystem::remove_all(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
};

TEST_F(Fixture, SmallPoolPreemptsAndStillMatches) {
  // Recompute, then swap (blocks read back from a disk tier): the same tokens.
  for (PreemptionMode mode : {PreemptionMode::Recompute, PreemptionMode::Swap}) {
    EngineConfig c;
    // 6 blocks of 16 tokens; four requests of ~5 + 24 tokens need 8 blocks together: the pool
    // runs dry mid-decode.
    c.kvCacheBytes = 6 * kBlockBytes;
    c.maxBatchedTokens = 32;
    c.preemptionMode = mode;
    TempDir dir("cs-swap");
    if (mode == PreemptionMode::Swap) c.kvTiers.diskDir = dir.path.string();
    Engine engine(*model, *tokenizer, c);
    std::vector<std::shared_ptr<RequestStream>> streams;
    for (int i = 0; i < 4; ++i) streams.push_back(engine.submit(greedy(kPrompts[static_cast<size_t>(i)], 24)));
    std::vector<std::vector<int32_t>> outputs;
    for (int i = 0; i < 4; ++i) outputs.push_back(collect(*streams[static_cast<size_t>(i)]).first);
    EXPECT_GT(engine.stats().preemptions, 0u) << toString(mode);
    EXPECT_GT(engine.stats().peakStepSequences, 1);
    EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
    EXPECT_EQ(engine.stats().swapped, 0);
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(outputs[static_cast<size_t>(i)], alone(greedy(kPrompts[static_cast<size_t>(i)], 24)))
          << kPrompts[static_cast<size_t>(i)] << " " << toString(mode);
    }
  }
}

TEST_F(Fixture, WindowedRequestsRunPastTheContextInBoundedMemoryAndMatchThemselves) {
  // Positions stop at 128 and the window (32 tokens, 4 sinks) moves back by 80 positions there,
  // so 165 tokens move it once (the cache tests move windows many times). The first pool holds
  // 20 blocks (320 tokens); a windowed request holds at most 6.
  auto windowed = [](size_t i, int32_t maxTokens) {
    RequestParams p = greedy(kPrompts[i], maxTokens);
    p.ignoreEos = true;
    p.kvWindow = 32;
    p.kvSinks = 4;
    return p;
  };
  auto config = [](uint64_t blocks) {
    EngineConfig c;
    c.kvCacheBytes = blocks * kBlockBytes;
    c.maxBatchedTokens = 32;
    c.maxModelLen = 128;
    return c;
  };
  std::vector<int32_t> reference;
  {
    Engine engine(*model, *tokenizer, config(20));
    EXPECT_THROW(engine.submit(greedy(kPrompts[0], 160)), EngineError) << "too long without";
    RequestParams wide = windowed(0, 160);
    wide.kvWindow = 48;  // 4 + 2 x 48 + 2 blocks > 128
    EXPECT_THROW(engine.submit(wide), EngineError);
    RequestParams two = windowed(0, 160);
    two.n = 2;
    EXPECT_THROW(engine.submit(two), EngineError);
    auto [tokens, last] = collect(*engine.submit(windowed(0, 160)));
    EXPECT_EQ(last.finishReason, FinishReason::Length);
    ASSERT_EQ(tokens.size(), 160u);
    EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
    EXPECT_EQ(engine.stats().peakStepSequences, 1);
    reference = tokens;
  }
  // Until a query first skips a position (position sinks + window = 36), it is full attention.
  RequestParams plain = greedy(kPrompts[0], 30);
  plain.ignoreEos = true;
  const std::vector<int32_t> full = alone(plain);
  ASSERT_EQ(full.size(), 30u);
  EXPECT_TRUE(std::equal(full.begin(), full.end(), reference.begin()));
  // Beside other requests (windowed and not), and in a pool small enough to preempt them: the
  // same tokens.
  for (const uint64_t blocks : {64u, 7u}) {
    Engine engine(*model, *tokenizer, config(blocks));
    auto s0 = engine.submit(windowed(0, 160));
    auto s1 = engine.submit(windowed(1, 80));
    auto s2 = engine.submit(greedy(kPrompts[2], 20));
    EXPECT_EQ(collect(*s0).first, reference) << blocks << " blocks";
    collect(*s1);
    collect(*s2);
    EXPECT_GT(engine.stats().peakStepSequences, 1);
    if (blocks == 7u) {
      EXPECT_GT(engine.stats().preemptions, 0u);
    }
    EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  }
}

TEST_F(Fixture, ShiftedKeysEqualKeysComputedAtTheirNewPositions) {
  // Layer 0's keys depend only on the token and its position: the keys of tokens computed at
  // positions 32.. and moved back by 32 (RoPE by -32) must be those of the same tokens computed
  // at 0.. (to rounding: f32 exact up to the rotation's float error, f16 up to two roundings).
  const std::vector<int32_t> text = tokenizer->encode("The quick brown fox jumps over the lazy "
                                                      "dog while the cat sleeps in the sun", true,
                                                      false);
  ASSERT_GE(text.size(), 16u);
  const auto n = static_cast<int32_t>(text.size());
  for (const kv::KVDType dtype : {kv::KVDType::F32, kv::KVDType::F16, kv::KVDType::Q8}) {
    EngineConfig c;
    c.kvDtype = dtype;
    kv::KVCache cache(kvCacheConfigFor(*model, c, 32 * kBlockBytes));
    ModelRunner runner(*model, cache, 2);
    std::vector<float> logits;
    cache.allocateFor(1, n);
    runner.clear();
    runner.add(1, 0, text, false);
    runner.run(logits);
    // Sequence 2: 32 other tokens, then the same text, with a window of 16 and no sinks.
    std::vector<int32_t> shifted(32, text[3]);
    shifted.insert(shifted.end(), text.begin(), text.end());
    const kv::SeqWindow win{16, 0};
    cache.allocateFor(2, 32 + n, win);
    runner.clear();
    runner.add(2, 0, shifted, false, win);
    runner.run(logits);
    ASSERT_EQ(runner.shiftWindow(2), 32) << kv::toString(dtype);
    ASSERT_EQ(cache.usedTokens(2), n);
    const kv::PagedKVView a = cache.getKView(1, 0), b = cache.getKView(2, 0);
    const auto rows = static_cast<size_t>(a.numKVHeads) * static_cast<size_t>(n) *
                      static_cast<size_t>(a.headDim);
    std::vector<float> ka(rows), kb(rows);
    kv::gather(a, ka.data());
    kv::gather(b, kb.data());
    float amax = 0, worst = 0;
    for (size_t i = 0; i < rows; ++i) {
      amax = std::max(amax, std::fabs(ka[i]));
      worst = std::max(worst, std::fabs(ka[i] - kb[i]));
    }
    // q8 stores the moved row again with a new scale: within a step of the 8-bit grid.
    const float tolerance = dtype == kv::KVDType::F32 ? 1e-5f : dtype == kv::KVDType::F16 ? 2e-3f
                                                                                          : 2e-2f;
    EXPECT_LE(worst, tolerance * amax) << kv::toString(dtype) << " max |k| " << amax;
    EXPECT_GT(amax, 0.0f);
  }
}

TEST_F(Fixture, ADiskTierServesAPromptThePoolForgot) {
  TempDir dir("cs-tier");
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  c.kvTiers.diskDir = dir.path.string();
  Engine engine(*model, *tokenizer, c);
  std::string text;
  for (int i = 0; i < 12; ++i) text += "Sentence number " + std::to_string(i) + " is here. ";
  const RequestParams p = greedy(text, 4);
  const auto n = static_cast<int32_t>(p.promptTokens.size());
  const std::vector<int32_t> first = generate(engine, p).tokens;
  engine.flushKVTiers();
  EXPECT_GT(engine.resetPrefixCache(), 0);
  auto stream = engine.submit(p);
  auto [tokens, last] = collect(*stream);
  EXPECT_EQ(tokens, first);
  EXPECT_EQ(last.cachedTokens, (n - 1) / 16 * 16);
  const EngineStats s = engine.stats();
  ASSERT_EQ(s.tierHitTokens.size(), 1u);
  EXPECT_EQ(s.tierHitTokens[0], static_cast<uint64_t>(last.cachedTokens));
  EXPECT_EQ(s.tiers.tiers[0].name, "disk");
  EXPECT_EQ(s.tiers.tiers[0].badRecords, 0u);
}

TEST_F(Fixture, ResizingUnderLoadKeepsEveryRequest) {
  EngineConfig c;
  c.kvCacheBytes = 16 * kBlockBytes;
  c.kvCacheMaxBytes = 64 * kBlockBytes;
  c.maxBatchedTokens = 64;
  Engine engine(*model, *tokenizer, c);
  std::vector<std::shared_ptr<RequestStream>> streams;
  for (const auto& p : kPrompts) streams.push_back(engine.submit(greedy(p, 40)));
  // Too small for the requests accepted (up to ~50 tokens: 4 blocks each); out of range.
  EXPECT_THROW(engine.resizeKvCache(2 * kBlockBytes), EngineError);
  EXPECT_THROW(engine.resizeKvCache(65 * kBlockBytes), EngineError);
  EXPECT_EQ(engine.resizeKvCache(64 * kBlockBytes).blocks, 64);
  const KvResize shrunk = engine.resizeKvCache(5 * kBlockBytes);
  EXPECT_EQ(shrunk.blocks, 5);
  EXPECT_EQ(engine.stats().kv.totalBlocks, 5);
  EXPECT_LE(engine.stats().kv.usedBlocks, 5);
  EXPECT_EQ(engine.resizeKvCache(40 * kBlockBytes + 100).bytes, 40 * kBlockBytes);
  std::vector<std::vector<int32_t>> outputs;
  for (auto& s : streams) outputs.push_back(collect(*s).first);
  EXPECT_EQ(engine.stats().kv.usedBlocks, 0);
  EXPECT_EQ(engine.stats().kv.totalBlocks, 40);
  // note: after every request is done; two engines must not run one model at the same time.
  for (size_t i = 0; i < kPrompts.size(); ++i) {
    EXPECT_EQ(outputs[i], alone(greedy(kPrompts[i], 40))) << kPrompts[i];
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

// The HTTP front end learns of events through the stream's callback instead of waiting on it:
// events pushed after it is set are announced, and nothing is announced once the callback is
// cleared (the server clears it before its event loop goes away).
TEST_F(Fixture, NotifyAnnouncesEventsUntilCleared) {
  EngineConfig c;
  c.kvCacheBytes = 64ull << 20;
  Engine engine(*model, *tokenizer, c);
  RequestParams p = greedy("Tell me a long story about a dragon.", 24);
  p.ignoreEos = true;
  auto s = engine.submit(p);
  auto first = s->next(std::chrono::seconds(60));  // the callback is set after this event
  ASSERT_TRUE(first.has_value());
  std::atomic<int> announced{0};
  s->setNotify([&announced] { ++announced; });
  int events = 1;
  for (;;) {
    auto e = s->next(std::chrono::seconds(60));
    ASSERT_TRUE(e.has_value());
    ++events;
    if (e->finished) break;
  }
  EXPECT_GE(announced.load(), 1);
  EXPECT_LE(announced.load(), events - 1);

  auto s2 = engine.submit(p);
  std::atomic<int> late{0};
  s2->setNotify([&late] { ++late; });
  s2->setNotify({});
  const int atClear = late.load();
  auto [tokens, last] = collect(*s2);
  EXPECT_EQ(last.finishReason, FinishReason::Length);
  EXPECT_EQ(late.load(), atClear);
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
