#include "cli/model_options.h"

#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <vector>

#include "kernels/isa.h"

namespace cortex::cli {

void addKvDtypeOption(CLI::App* cmd, kv::KVDType& dtype) {
  // The names come from the format table, so a new storage format needs no CLI change.
  std::vector<std::string> names;
  for (const kv::KVFormat& f : kv::kKVFormats) names.emplace_back(f.name);
  cmd->add_option_function<std::string>(
         "--kv-dtype", [&dtype](const std::string& name) { dtype = kv::parseKVDType(name); },
         "KV cache storage type")
      ->check(CLI::IsMember(names))
      ->default_str(kv::toString(dtype));
}

void addPrecisionOption(CLI::App* cmd, model::Precision& precision) {
  cmd->add_option_function<std::string>(
         "--precision",
         [&precision](const std::string& name) { precision = model::parsePrecision(name); },
         "matmul arithmetic: int8 (integer dot products on int8 activations, for Q4_0/Q4_1/Q8_0 "
         "weights) or f32 (float32 throughout)")
      ->check(CLI::IsMember({"int8", "f32"}))
      ->default_str(model::toString(precision));
}

void addHybridKvFlag(CLI::App* cmd, bool& off) {
  cmd->add_flag("--no-hybrid-kv", off,
                "keep every position in every layer's KV cache; by default sliding-window layers "
                "keep only the blocks their window sees");
}

void addBackendOption(CLI::App* cmd, engine::Backend& backend) {
  cmd->add_option_function<std::string>(
         "--backend",
         [&backend](const std::string& name) { backend = engine::parseBackend(name); },
         std::string("what runs the forward pass: cpu (CortexStream's kernels) or mlx (MLX; ") +
             (engine::backendAvailable(engine::Backend::Mlx) ? "in this build)"
                                                             : "not in this build)"))
      ->check(CLI::IsMember({"cpu", "mlx"}))
      ->default_str(engine::toString(backend));
}

void addModelOptions(CLI::App* cmd, ModelOptions& o) {
  cmd->add_option("--model,-m", o.modelPath, kModelOptionHelp);
  cmd->add_option("--threads,-t", o.threads, "CPU threads (0 = all cores)")
      ->check(CLI::Range(0, 1024));
  addKvDtypeOption(cmd, o.kvDtype);
  addPrecisionOption(cmd, o.precision);
  addHybridKvFlag(cmd, o.noHybridKv);
  addBackendOption(cmd, o.backend);
}

std::string resolveModelPath(const std::string& given) {
  namespace fs = std::filesystem;
  if (!given.empty()) {
    if (!fs::exists(given)) {
      throw std::runtime_error(given + ": model file not found; pass --model PATH, or leave it "
                                       "out for the default model (scripts/fetch_model.sh)");
    }
    return given;
  }
  if (const char* env = std::getenv("CORTEXSTREAM_MODEL"); env != nullptr && *env != '\0') {
    if (!fs::exists(env)) {
      throw std::runtime_error(std::string(env) +
                               ": model file not found (named by CORTEXSTREAM_MODEL)");
    }
    return env;
  }
  std::vector<fs::path> places;
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg != nullptr && *xdg != '\0') {
    places.push_back(fs::path(xdg) / "cortexstream" / "models");
  } else if (const char* home = std::getenv("HOME"); home != nullptr && *home != '\0') {
    places.push_back(fs::path(home) / ".cache" / "cortexstream" / "models");
  }
  // The checkout: the executable is built a few folders below it (build/src/cli/cortexstream).
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path dir = exe.parent_path(); !dir.empty() && dir != dir.root_path();
         dir = dir.parent_path()) {
      if (fs::exists(dir / "models" / model::kDefaultModelFile)) {
        places.push_back(dir / "models");
        break;
      }
    }
  }
  places.push_back(fs::current_path(ec) / "models");
  std::string looked;
  for (const fs::path& dir : places) {
    const fs::path file = dir / model::kDefaultModelFile;
    if (fs::exists(file)) return file.string();
    looked += "\n  " + file.string();
  }
  throw std::runtime_error(std::string("the default model ") + model::kDefaultModelFile +
                           " was not found; looked in (CORTEXSTREAM_MODEL unset):" + looked +
                           "\nrun scripts/fetch_model.sh, or pass --model PATH");
}

model::Precision modelPrecision(engine::Backend backend, model::Precision precision) {
  return backend == engine::Backend::Mlx ? model::Precision::F32 : precision;
}

Loaded loadModel(const ModelOptions& o) {
  const std::string path = resolveModelPath(o.modelPath);
  kernels::activeIsa();  // a bad CORTEXSTREAM_ISA fails here, before any work
  Loaded l;
  l.model = model::TransformerModel::load(path, modelPrecision(o.backend, o.precision));
  l.tokenizer = std::make_unique<model::Tokenizer>(model::Tokenizer::fromGGUF(l.model->file()));
  return l;
}

model::ChatTemplate chatTemplateFor(const ModelOptions& o, const Loaded& l) {
  return model::chatTemplateFor(l.tokenizer->chatTemplate(),
                                model::toString(l.model->hparams().arch), o.chatTemplate);
}

}  // namespace cortex::cli
