#include "cli/model_options.h"

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

void addModelOptions(CLI::App* cmd, ModelOptions& o) {
  cmd->add_option("--model,-m", o.modelPath, "GGUF model file")->capture_default_str();
  cmd->add_option("--threads,-t", o.threads, "CPU threads (0 = all cores)")
      ->check(CLI::Range(0, 1024));
  addKvDtypeOption(cmd, o.kvDtype);
  addPrecisionOption(cmd, o.precision);
}

Loaded loadModel(const ModelOptions& o) {
  if (!std::filesystem::exists(o.modelPath)) {
    throw std::runtime_error(o.modelPath +
                             ": model file not found; run scripts/fetch_model.sh for the default "
                             "model or pass --model PATH");
  }
  kernels::activeIsa();  // a bad CORTEXSTREAM_ISA fails here, before any work
  Loaded l;
  l.model = model::LlamaModel::load(o.modelPath, o.precision);
  l.tokenizer = std::make_unique<model::Tokenizer>(model::Tokenizer::fromGGUF(l.model->file()));
  return l;
}

model::ChatTemplate chatTemplateFor(const ModelOptions& o, const model::Tokenizer& tok) {
  return o.chatTemplate.empty() ? model::detectChatTemplate(tok.chatTemplate())
                                : model::parseChatTemplateName(o.chatTemplate);
}

}  // namespace cortex::cli
