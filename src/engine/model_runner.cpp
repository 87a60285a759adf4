#include "engine/model_runner.h"

#include <stdexcept>

#include "kernels/thread_pool.h"
#include "model/errors.h"
#ifdef CS_WITH_MLX
#include "mlx_backend/mlx_model.h"
#endif

namespace cortex::engine {

namespace {

class CpuBackend final : public ForwardBackend {
 public:
  CpuBackend(model::TransformerModel& model, int threads) : model_(model), pool_(threads) {}
  void forward(const model::ForwardBatch& batch, std::vector<float>& logits) override {
    model_.forward(batch, pool_, logits);
  }
  void shiftKeys(const kv::KVArena& arena, std::span<const kv::BlockRows> rows,
                 int32_t tokens) override {
    model_.shiftKeys(arena, rows, tokens);
  }

 private:
  model::TransformerModel& model_;
  kernels::ThreadPool pool_;
};

#ifdef CS_WITH_MLX
class MlxBackend final : public ForwardBackend {
 public:
  MlxBackend(const model::TransformerModel& model, kv::KVCache& cache)
      : cache_(cache), mlx_(model, cache.arena(), cache.numBlocks()) {
    cache_.setExternalBlockCopier(
        [this](kv::BlockId from, kv::BlockId to) { mlx_.copyBlock(from, to); });
  }
  ~MlxBackend() override { cache_.setExternalBlockCopier(nullptr); }
  void forward(const model::ForwardBatch& batch, std::vector<float>& logits) override {
    mlx_.forward(batch, logits);
  }
  void shiftKeys(const kv::KVArena&, std::span<const kv::BlockRows>, int32_t) override {
    throw model::ModelError("the mlx backend keeps every position (no attention sinks or window)");
  }

 private:
  kv::KVCache& cache_;
  mlxbackend::MlxModel mlx_;
};
#endif

}  // namespace

const char* toString(Backend b) { return b == Backend::Mlx ? "mlx" : "cpu"; }

Backend parseBackend(const std::string& name) {
  if (name == "cpu") return Backend::Cpu;
  if (name == "mlx") return Backend::Mlx;
  throw std::invalid_argument("backend '" + name + "' is not one of: cpu, mlx");
}

bool backendAvailable(Backend b) {
#ifdef CS_WITH_MLX
  (void)b;
  return true;
#else
  return b == Backend::Cpu;
#endif
}

ModelRunner::ModelRunner(model::TransformerModel& model, kv::KVCache& cache, int threads,
                         Backend backend)
    : cache_(cache) {
  if (backend == Backend::Cpu) {
    backend_ = std::make_unique<CpuBackend>(model, threads);
    return;
  }
#ifdef CS_WITH_MLX
  backend_ = std::make_unique<MlxBackend>(model, cache);
#else
  throw model::ModelError(
      "this build has no MLX backend: build with CS_WITH_MLX=1 scripts/build.sh "
      "(cmake -DCS_WITH_MLX=ON, MLX from the mlx-cpu Python wheel)");
#endif
}

ModelRunner::~ModelRunner() = default;

void ModelRunner::clear() {
  step_.clear();
  batch_.clear();
}

void ModelRunner::add(kv::SeqId seq, int32_t firstPos, std::span<const int32_t> tokens,
                      bool allLogits, kv::SeqWindow win) {
  const auto n = static_cast<int32_t>(tokens.size());
  step_.push_back({seq, firstPos, n});
  batch_.seqs.push_back({firstPos, n, 0, 0, allLogits, win.window, win.sinks});
  batch_.tokens.insert(batch_.tokens.end(), tokens.begin(), tokens.end());
  for (int32_t i = 0; i < n; ++i) batch_.positions.push_back(firstPos + i);
}

int32_t ModelRunner::shiftWindow(kv::SeqId seq) {
  const kv::KVCache::WindowShift shift = cache_.shiftWindow(seq);
  if (shift.tokens > 0) backend_->shiftKeys(cache_.arena(), shift.moved, shift.tokens);
  return shift.tokens;
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
  backend_->forward(batch_, logits);
}

}  // namespace cortex::engine
