// Options shared by the commands that run a model (`generate`, `chat`, `perplexity`, and
// `serve`'s --kv-dtype), and loading a model from them, so each option is parsed in one place.
#pragma once

#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "engine/model_runner.h"
#include "kv/paged_view.h"
#include "model/chat_template.h"
#include "model/default_model.h"
#include "model/transformer.h"
#include "model/tokenizer.h"

namespace cortex::cli {

struct ModelOptions {
  std::string modelPath;      // empty: the default model (resolveModelPath)
  int threads = 0;           // 0: all cores
  std::string chatTemplate;  // empty: detect from the model
  kv::KVDType kvDtype = kv::KVDType::F16;
  model::Precision precision = model::Precision::Int8;
  bool noHybridKv = false;   // every layer keeps every position, sliding-window layers included
  engine::Backend backend = engine::Backend::Cpu;
};

// Adds `--kv-dtype NAME` to `cmd`: the accepted names are those of kv::kKVFormats, the value is
// parsed by kv::parseKVDType into `dtype` (which must outlive parsing), and the help shows
// `dtype`'s current value as the default.
void addKvDtypeOption(CLI::App* cmd, kv::KVDType& dtype);

// Adds `--precision int8|f32` to `cmd` (model::Precision), writing into `precision`.
void addPrecisionOption(CLI::App* cmd, model::Precision& precision);

// Adds `--no-hybrid-kv` to `cmd`, writing into `off`.
void addHybridKvFlag(CLI::App* cmd, bool& off);

// Adds `--backend cpu|mlx` to `cmd` (engine::Backend), writing into `backend`.
void addBackendOption(CLI::App* cmd, engine::Backend& backend);

// Adds --model/-m, --threads/-t, --kv-dtype, --precision, --no-hybrid-kv and --backend to `cmd`, writing into `o` (which must outlive
// parsing). --chat-template is left to the commands that use a template.
void addModelOptions(CLI::App* cmd, ModelOptions& o);

// The model file to load: `given` (--model) when not empty; else the default model, the first of
// $CORTEXSTREAM_MODEL (a path), $XDG_CACHE_HOME/cortexstream/models/ (default
// ~/.cache/cortexstream/models/, which scripts/fetch_model.sh fills), the models/ folder of the
// checkout this binary was built in (found above the executable), ./models/. Throws
// std::runtime_error naming the file and, for the default model, every place it looked.
std::string resolveModelPath(const std::string& given);

// The help text of --model.
inline constexpr const char* kModelOptionHelp =
    "GGUF model file (default: the default model from $CORTEXSTREAM_MODEL, "
    "~/.cache/cortexstream/models or the checkout's models/)";

// The precision to load the model with: `precision` for the cpu backend; the MLX backend does its
// own arithmetic (float32 on the file's weights), so the model is loaded without the integer
// path's repacked copy.
model::Precision modelPrecision(engine::Backend backend, model::Precision precision);

struct Loaded {
  std::unique_ptr<model::TransformerModel> model;
  std::unique_ptr<model::Tokenizer> tokenizer;
};

// Loads the model and its tokenizer (--threads goes to the engine that runs it).
// Throws std::runtime_error naming the file and the remedy when it does not exist, and the
// model's own errors when it cannot be read.
Loaded loadModel(const ModelOptions& o);

// The chat template named by --chat-template, else the one detected from the model's
// tokenizer.chat_template; throws when neither gives a known template.
model::ChatTemplate chatTemplateFor(const ModelOptions& o, const Loaded& l);

}  // namespace cortex::cli
