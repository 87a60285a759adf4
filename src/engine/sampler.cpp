#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <limits>

namespace cortex::engine {

std::string SamplingParams::validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return "temperature must be a finite number >= 0";
  }
  if (topK < 0) return "top_k must be >= 0 (0 disables it)";
  if (!(topP > 0.0f && topP <= 1.0f)) return "top_p must be in (0, 1]";
  if (!(minP >= 0.0f && minP <= 1.0f)) return "min_p must be in [0, 1]";
  if (!(repetitionPenalty > 0.0f) || !std::isfinite(repetitionPenalty)) {
    return "repetition_penalty must be > 0";
  }
  if (!(presencePenalty >= -2.0f && presencePenalty <= 2.0f)) {
    return "presence_penalty must be in [-2, 2]";
  }
  if (!(frequencyPenalty >= -2.0f && frequencyPenalty <= 2.0f)) {
    return "frequency_penalty must be in [-2, 2]";
  }
  return {};
}

Sampler::Sampler(const SamplingParams& params, int32_t vocabSize,
                 std::span<const int32_t> promptTokens)
    : params_(params), vocabSize_(vocabSize), rng_(params.seed) {
  if (params_.repetitionPenalty != 1.0f) {
    seen_.assign(static_cast<size_t>(vocabSize), 0);
    for (int32_t t : promptTokens) {
      if (t >= 0 && t < vocabSize) seen_[static_cast<size_t>(t)] = 1;
    }
  }
}

void Sampler::accept(int32_t token) {
  if (token < 0 || token >= vocabSize_) return;
  ++generatedCounts_[token];
  if (!seen_.empty()) seen_[static_cast<size_t>(token)] = 1;
}

void Sampler::applyPenalties(float* logits) const {
  if (params_.repetitionPenalty != 1.0f) {
    const float p = params_.repetitionPenalty;
    for (int32_t t = 0; t < vocabSize_; ++t) {
      if (seen_[static_cast<size_t>(t)] == 0) continue;
      logits[t] = logits[t] > 0 ? logits[t] / p : logits[t] * p;
    }
  }
  if (params_.presencePenalty != 0.0f || params_.frequencyPenalty != 0.0f) {
    for (const auto& [t, count] : generatedCounts_) {
      logits[t] -= params_.presencePenalty + params_.frequencyPenalty * static_cast<float>(count);
    }
  }
}

int32_t Sampler::sample(float* logits) {
  applyPenalties(logits);
  if (params_.temperature < kGreedyBelowTemperature) {
    // Greedy: the first maximum, NaNs skipped.
    int32_t best = 0;
    for (int32_t t = 1; t < vocabSize_; ++t) {
      if (logits[t] > logits[best] || std::isnan(logits[best])) best = t;
    }
    return best;
  }
  const size_t V = static_cast<size_t>(vocabSize_);
  // Unnormalised probabilities at the temperature: e[t] = exp((logit - max) / T), so e = 1 at
  // the top and p[t] / p[max] = e[t] (what min-p compares against).
  float maxLogit = -INFINITY;
  for (size_t t = 0; t < V; ++t) maxLogit = std::max(maxLogit, logits[t]);
  probs_.resize(V);
  const float invT = 1.0f / params_.temperature;
  for (size_t t = 0; t < V; ++t) {
    probs_[t] = std::isnan(logits[t]) ? 0.0f : std::exp((logits[t] - maxLogit) * invT);
  }
  const float* e = probs_.data();
  // Descending probability, ties by id: a total order, so results never depend on the sort.
  auto higher = [e](int32_t a, int32_t b) { return e[a] > e[b] || (e[a] == e[b] && a < b); };

  candidates_.resize(V);
  std::iota(candidates_.begin(), candidates_.end(), 0);
  size_t keep = V;
  if (params_.topK > 0 && static_cast<size_t>(params_.topK) < V) {
    keep = static_cast<size_t>(params_.topK);
    std::nth_element(candidates_.begin(), candidates_.begin() + static_cast<long>(keep) - 1,
                     candidates_.end(), higher);
  }
  size_t sorted = 0;  // candidates_[0, sorted) are in descending order
  if (params_.topP < 1.0f) {
    // The shortest prefix (in descending order) whose mass, normalised over the top-k set,
    // reaches top-p. Sort a growing head only: the prefix is usually short.
    double z = 0;
    for (size_t i = 0; i < keep; ++i) z += e[candidates_[i]];
    const double target = params_.topP * z;
    double cum = 0;
    size_t n = 0;
    for (size_t head = 64;; head *= 4) {
      const size_t h = std::min(head, keep);
      std::partial_sort(candidates_.begin() + static_cast<long>(sorted),
                        candidates_.begin() + static_cast<long>(h),
                        candidates_.begin() + static_cast<long>(keep), higher);
      sorted = h;
      while (n < sorted && cum < target) cum += e[candidates_[n++]];
      if (cum >= target || sorted == keep) break;
    }
    keep = std::max<size_t>(n, 1);
  }
  if (params_.minP > 0.0f) {
    // min-p keeps tokens with p >= minP * p[max], i.e. e >= minP; the top token always stays.
    auto below = [&](int32_t t) { return e[t] < params_.minP; };
    if (sorted >= keep) {
      while (keep > 1 && below(candidates_[keep - 1])) --keep;
    } else {
      keep = static_cast<size_t>(std::partition(candidates_.begin(),
                                                       candidates_.begin() + static_cast<long>(keep),
                                                       [&](int32_t t) { return !below(t); }) -
                                 candidates_.begin());
      keep = std::max<size_t>(keep, 1);
    }
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += e[candidates_[i]];
  // A uniform draw in [0, kept) from the top 53 bits: the same on every platform for a seed.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * kept;
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += e[candidates_[i]];
    if (u < cum) return candidates_[i];
  }
  return candidates_[keep - 1];
}

}  // namespace cortex::engine
