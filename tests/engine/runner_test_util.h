// Helpers for tests that drive a ModelRunner directly.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "engine/model_runner.h"

namespace cortex::engine {

// Allocates sequence 0 for `prompt` and prefills it in chunks of `chunk` tokens, one step each;
// returns the logits rows of every position, in order.
inline std::vector<float> prefillRows(ModelRunner& runner, kv::KVCache& cache,
                                      const std::vector<int32_t>& prompt, int32_t chunk) {
  cache.allocateFor(0, static_cast<int32_t>(prompt.size()));
  std::vector<float> all, logits;
  for (size_t p = 0; p < prompt.size(); p += static_cast<size_t>(chunk)) {
    const size_t n = std::min(prompt.size() - p, static_cast<size_t>(chunk));
    runner.clear();
    runner.add(0, static_cast<int32_t>(p), std::span<const int32_t>(prompt.data() + p, n), true);
    runner.run(logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

}  // namespace cortex::engine
