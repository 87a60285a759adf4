// `cortexstream tokenize`: prints the token ids of a text as a JSON array.
#include <filesystem>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace cortex::cli {

namespace {

struct TokenizeOptions {
  std::string modelPath;  // empty: the default model (resolveModelPath)
  std::string text;
  bool noSpecial = false;
  bool noBos = false;
  bool linesJson = false;
};

void runTokenize(const TokenizeOptions& opts) {
  const model::GGUFFile file = model::GGUFFile::open(resolveModelPath(opts.modelPath));
  const model::Tokenizer tokenizer = model::Tokenizer::fromGGUF(file);
  const bool parseSpecial = !opts.noSpecial;
  const bool addSpecial = !opts.noBos;
  if (!opts.linesJson) {
    std::cout << nlohmann::json(tokenizer.encode(opts.text, addSpecial, parseSpecial)).dump() << "\n";
    return;
  }
  // note: hidden batch mode for tests: one JSON string per input line, one JSON object
  // {"ids": [...], "decoded": "..."} per output line, so one process serves many texts.
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    const std::string text = nlohmann::json::parse(line).get<std::string>();
    const std::vector<int32_t> ids = tokenizer.encode(text, addSpecial, parseSpecial);
    const nlohmann::json out = {{"ids", ids},
                                {"decoded", model::replaceInvalidUtf8(tokenizer.decode(ids))}};
    std::cout << out.dump() << "\n";
  }
}

}  // namespace

void registerTokenizeCommand(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("tokenize", "Print the token ids of TEXT as a JSON array");
  auto opts = std::make_shared<TokenizeOptions>();
  cmd->add_option("--model,-m", opts->modelPath, kModelOptionHelp);
  CLI::Option* textOption = cmd->add_option("text", opts->text, "Text to tokenize (UTF-8)");
  cmd->add_flag("--no-special", opts->noSpecial,
                "Treat control-token text such as <|im_start|> as plain text");
  cmd->add_flag("--no-bos", opts->noBos,
                "Add no BOS/EOS token even where the model asks for them (as llama.cpp's "
                "add_special = false)");
  cmd->add_flag("--lines-json", opts->linesJson,
                "Read one JSON string per stdin line; print {\"ids\", \"decoded\"} per line")
      ->group("");  // hidden: for tests
  cmd->callback([opts, textOption] {
    if (!opts->linesJson && textOption->count() == 0) {
      throw std::runtime_error("tokenize needs TEXT (see --help)");
    }
    runTokenize(*opts);
  });
}

}  // namespace cortex::cli
