#include "engine/model_runner.h"

namespace cortex::engine {

void ModelRunner::clear() {
  step_.clear();
  batch_.clear();
}

void ModelRunner::add(kv::SeqId seq, int32_t firstPos, std::span<const int32_t> tokens,
                      bool allLogits) {
  const auto n = static_cast<int32_t>(tokens.size());
  step_.push_back({seq, firstPos, n});
  batch_.seqs.push_back({firstPos, n, 0, 0, allLogits});
  batch_.tokens.insert(batch_.tokens.end(), tokens.begin(), tokens.end());
  for (int32_t i = 0; i < n; ++i) batch_.positions.push_back(firstPos + i);
}

void ModelRunner::run(std::vector<float>& logits) {
  cache_.resolveStep(step_, batch_.slots, batch_.blockTables, tableStarts_);
  for (size_t i = 0; i < batch_.seqs.size(); ++i) {
    model::ForwardSequence& s = batch_.seqs[i];
    s.tableStart = tableStarts_[i];
    const size_t end = i + 1 < batch_.seqs.size() ? static_cast<size_t>(tableStarts_[i + 1])
                                                  : batch_.blockTables.size();
    s.numBlocks = static_cast<int32_t>((end - static_cast<size_t>(s.tableStart)) /
                                       static_cast<size_t>(cache_.numGroups()));
  }
  batch_.arena = cache_.arena();
  model_.forward(batch_, pool_, logits);
}

}  // namespace cortex::engine
