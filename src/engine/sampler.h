// Token sampling: penalties, temperature, top-k, top-p, min-p, seeded randomness.
//
// Each request owns one Sampler (its own RNG, seeded from the request's seed), so its output does
// not depend on what else runs. Order of operations (as vLLM): repetition / presence / frequency
// penalties on the logits, then temperature below kGreedyBelowTemperature -> greedy argmax (as
// vLLM: dividing by a tinier temperature would overflow to inf and NaN); else divide by temperature,
// softmax, keep the top-k, then the smallest set whose probability reaches top-p, then drop tokens
// below min-p times the largest probability, renormalise and draw.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

namespace cortex::engine {

// Temperatures below this sample greedily.
inline constexpr float kGreedyBelowTemperature = 1e-5f;

struct SamplingParams {
  float temperature = 1.0f;        // 0 (or below kGreedyBelowTemperature) = greedy; must be >= 0
  int32_t topK = 0;                // 0 = off (all tokens)
  float topP = 1.0f;               // (0, 1]
  float minP = 0.0f;               // [0, 1]
  float repetitionPenalty = 1.0f;  // > 0; 1 = off; applies to prompt and generated tokens
  float presencePenalty = 0.0f;    // [-2, 2]; generated tokens only (OpenAI semantics)
  float frequencyPenalty = 0.0f;   // [-2, 2]; generated tokens only
  uint64_t seed = 0;

  // Empty when valid, else a message naming the first bad field and its range.
  std::string validate() const;
};

class Sampler {
 public:
  // promptTokens feed the repetition penalty. vocabSize > 0.
  Sampler(const SamplingParams& params, int32_t vocabSize, std::span<const int32_t> promptTokens);

  // Picks the next token from one row of vocabSize logits (the row is modified by penalties).
  // Deterministic for a given seed and sequence of calls.
  int32_t sample(float* logits);
  // Records a generated token (for the penalties). sample() does not call it: the caller decides
  // what was accepted.
  void accept(int32_t token);

 private:
  void applyPenalties(float* logits) const;

  SamplingParams params_;
  int32_t vocabSize_;
  std::mt19937_64 rng_;
  std::unordered_map<int32_t, int32_t> generatedCounts_;
  std::vector<uint8_t> seen_;  // prompt or generated, for the repetition penalty
  std::vector<int32_t> candidates_;
  std::vector<float> probs_;
};

}  // namespace cortex::engine
