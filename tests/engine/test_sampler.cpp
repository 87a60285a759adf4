// Sampler: greedy, truncation rules, penalties, and seeded reproducibility.
#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>

namespace cortex::engine {
namespace {

std::vector<float> logitsOf(std::initializer_list<float> l) { return std::vector<float>(l); }

int32_t once(SamplingParams p, std::vector<float> logits, std::vector<int32_t> prompt = {}) {
  Sampler s(p, static_cast<int32_t>(logits.size()), prompt);
  return s.sample(logits.data());
}

TEST(Sampler, TemperatureZeroIsArgmaxFirstOnTies) {
  SamplingParams p;
  p.temperature = 0;
  EXPECT_EQ(once(p, logitsOf({1, 3, 2, 3})), 1);
  EXPECT_EQ(once(p, logitsOf({NAN, -1, -2})), 1);
}

TEST(Sampler, TemperaturesBelowTheThresholdAreGreedy) {
  SamplingParams p;
  for (float t : {1e-45f, 1e-30f, 5e-6f}) {
    p.temperature = t;
    for (uint64_t seed = 0; seed < 20; ++seed) {
      p.seed = seed;
      EXPECT_EQ(once(p, logitsOf({1, 3, 2.9f, 3.5f, 0})), 3) << t;
    }
  }
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  SamplingParams p;
  p.topK = 1;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    p.seed = seed;
    EXPECT_EQ(once(p, logitsOf({0.1f, 0.2f, 0.15f})), 1);
  }
  p.topK = 0;
  p.topP = 1e-6f;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    p.seed = seed;
    EXPECT_EQ(once(p, logitsOf({0.1f, 0.2f, 0.15f})), 1);
  }
}

// Draw many samples and compare frequencies with the expected distribution.
std::map<int32_t, double> frequencies(SamplingParams p, const std::vector<float>& logits, int n) {
  Sampler s(p, static_cast<int32_t>(logits.size()), {});
  std::map<int32_t, double> f;
  for (int i = 0; i < n; ++i) {
    std::vector<float> row = logits;
    f[s.sample(row.data())] += 1.0 / n;
  }
  return f;
}

TEST(Sampler, FrequenciesFollowSoftmaxAtTemperature) {
  SamplingParams p;
  p.temperature = 2.0f;
  p.seed = 123;
  const std::vector<float> logits = {0, 1, 2, 3};
  const auto f = frequencies(p, logits, 40000);
  double z = 0;
  for (float l : logits) z += std::exp(l / 2.0);
  for (int32_t t = 0; t < 4; ++t) {
    const double expected = std::exp(logits[t] / 2.0) / z;
    // 40000 draws: standard error <= 0.0025; 4 sigma.
    EXPECT_NEAR(f.count(t) ? f.at(t) : 0.0, expected, 0.01) << "token " << t;
  }
}

TEST(Sampler, TopPKeepsTheSmallestSufficientPrefix) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.topP = 0.7f;  // probabilities ~0.64, 0.24, 0.09, 0.03: keeps the first two
  p.seed = 5;
  const auto f = frequencies(p, {3, 2, 1, 0}, 20000);
  EXPECT_EQ(f.count(2), 0u);
  EXPECT_EQ(f.count(3), 0u);
  EXPECT_NEAR(f.at(0), 0.6439 / (0.6439 + 0.2369), 0.015);
}

TEST(Sampler, TopPOverALargeVocabulary) {
  // 5000 tokens, one dominant: the incremental head sort must still find the prefix.
  std::vector<float> logits(5000, 0.0f);
  logits[4321] = 20.0f;
  SamplingParams p;
  p.topP = 0.9f;
  p.seed = 9;
  EXPECT_EQ(once(p, logits), 4321);
  // Flat distribution, top-p 0.5: about half the vocabulary survives.
  std::vector<float> flat(5000);
  for (size_t i = 0; i < flat.size(); ++i) flat[i] = static_cast<float>(i) * 1e-4f;
  const auto f = frequencies(p = SamplingParams{1.0f, 0, 0.5f}, flat, 500);
  for (const auto& [t, _] : f) EXPECT_GE(t, 2400) << t;
}

TEST(Sampler, MinPDropsUnlikelyTokens) {
  SamplingParams p;
  p.minP = 0.3f;  // relative to the top probability: exp(-1) = 0.37 stays, exp(-2) = 0.14 goes
  p.seed = 1;
  const auto f = frequencies(p, {2, 1, 0, -5}, 5000);
  EXPECT_GT(f.at(0), 0.5);
  EXPECT_GT(f.at(1), 0.1);
  EXPECT_EQ(f.count(2), 0u);
  EXPECT_EQ(f.count(3), 0u);
}

TEST(Sampler, PenaltiesSteerAwayFromSeenTokens) {
  SamplingParams p;
  p.temperature = 0;
  p.repetitionPenalty = 2.0f;  // 3 / 2 = 1.5 < 2
  EXPECT_EQ(once(p, logitsOf({3, 2, 0}), {0}), 1);
  p.repetitionPenalty = 1.0f;
  p.presencePenalty = 1.5f;
  Sampler s(p, 3, {});
  std::vector<float> row = {3, 2, 0};
  EXPECT_EQ(s.sample(row.data()), 0);
  s.accept(0);  // generated once: 3 - 1.5 < 2
  row = {3, 2, 0};
  EXPECT_EQ(s.sample(row.data()), 1);
  p.presencePenalty = 0;
  p.frequencyPenalty = 0.4f;
  Sampler f(p, 3, {});
  for (int i = 0; i < 2; ++i) f.accept(0);  // 3 - 0.8 = 2.2 > 2
  row = {3, 2, 0};
  EXPECT_EQ(f.sample(row.data()), 0);
  f.accept(0);  // 3 - 1.2 < 2
  row = {3, 2, 0};
  EXPECT_EQ(f.sample(row.data()), 1);
}

TEST(Sampler, SameSeedSameSequenceDifferentSeedDiffers) {
  std::vector<float> logits(1000);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(static_cast<float>(i));
  auto draw = [&](uint64_t seed) {
    SamplingParams p;
    p.seed = seed;
    p.topK = 50;
    Sampler s(p, 1000, {});
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) {
      std::vector<float> row = logits;
      out.push_back(s.sample(row.data()));
    }
    return out;
  };
  EXPECT_EQ(draw(42), draw(42));
  EXPECT_NE(draw(42), draw(43));
}

TEST(Sampler, ValidationNamesTheField) {
  SamplingParams p;
  EXPECT_EQ(p.validate(), "");
  p.temperature = -1;
  EXPECT_NE(p.validate().find("temperature"), std::string::npos);
  p = {};
  p.topP = 0;
  EXPECT_NE(p.validate().find("top_p"), std::string::npos);
  p = {};
  p.minP = 2;
  EXPECT_NE(p.validate().find("min_p"), std::string::npos);
  p = {};
  p.topK = -1;
  EXPECT_NE(p.validate().find("top_k"), std::string::npos);
  p = {};
  p.presencePenalty = 3;
  EXPECT_NE(p.validate().find("presence_penalty"), std::string::npos);
}

}  // namespace
}  // namespace cortex::engine
