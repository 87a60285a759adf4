// `cortexstream generate` and `chat`: running the model from the command line, on the engine.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "engine/generate.h"
#include "model/chat_template.h"
#include "model/transformer.h"
#include "model/tokenizer.h"

namespace cortex::cli {

namespace {

// An engine over this model with KV memory for `tokens` positions (--kv-dtype, block size 16).
std::unique_ptr<engine::Engine> engineFor(const Loaded& l, const ModelOptions& o, int64_t tokens,
                                          int32_t maxBatchedTokens = 512) {
  engine::EngineConfig c;
  c.kvDtype = o.kvDtype;
  c.hybridKv = !o.noHybridKv;
  c.backend = o.backend;
  c.numThreads = o.threads;
  c.maxBatchedTokens = maxBatchedTokens;
  const int64_t ctx = l.model->hparams().nCtxTrain;
  c.kvCacheBytes = engine::kvBytesForSequences(*l.model, c, std::clamp<int64_t>(tokens, 1, ctx), 1);
  return std::make_unique<engine::Engine>(*l.model, *l.tokenizer, c);
}

// Writes a float32 matrix as a NumPy .npy file (format 1.0).
void writeNpy(const std::string& path, const std::vector<float>& data, int64_t rows, int64_t cols) {
  std::ofstream out(path, std::ios::binary);
  if (!out) throw std::runtime_error("cannot write " + path);
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                       std::to_string(rows) + ", " + std::to_string(cols) + "), }";
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  const auto len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  const char lenBytes[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  out.write(lenBytes, 2);
  out << header;
  out.write(reinterpret_cast<const char*>(data.data()),
            static_cast<std::streamsize>(data.size() * sizeof(float)));
  if (!out) throw std::runtime_error("failed writing " + path);
}

struct GenerateOptions {
  ModelOptions model;
  std::string prompt;
  bool chat = false;
  int32_t maxTokens = 256;
  engine::SamplingParams sampling;
  std::vector<std::string> stop;
  bool json = false;
  bool ignoreEos = false;
  std::string dumpLogits;
  int32_t maxBatchedTokens = 512;
  int32_t kvWindow = 0;
  int32_t kvSinks = 0;
};

void runGenerate(const GenerateOptions& o) {
  Loaded l = loadModel(o.model);
  engine::RequestParams req;
  if (o.chat) {
    const model::ChatMessage msg{"user", o.prompt};
    req.promptTokens = model::encodeChat(*l.tokenizer, chatTemplateFor(o.model, l),
                                         std::span<const model::ChatMessage>(&msg, 1), true);
  } else {
    req.promptTokens = l.tokenizer->encode(o.prompt, true, true);
  }
  req.sampling = o.sampling;
  req.maxTokens = o.maxTokens;
  req.stop = o.stop;
  req.ignoreEos = o.ignoreEos;
  req.returnLogits = !o.dumpLogits.empty();
  req.kvWindow = o.kvWindow;
  req.kvSinks = o.kvSinks;
  auto engine = engineFor(l, o.model, static_cast<int64_t>(req.promptTokens.size()) + o.maxTokens,
                          o.maxBatchedTokens);
  auto onText = [&](std::string_view piece) {
    if (o.json) return;
    std::cout << piece << std::flush;
  };
  const engine::GenerateResult r = engine::generate(*engine, std::move(req), onText);
  if (!o.dumpLogits.empty()) {
    // Prompt positions first, then the row each sampled token was drawn from.
    std::vector<float> rows = r.promptLogits;
    rows.insert(rows.end(), r.logits.begin(), r.logits.end());
    const int64_t V = l.model->hparams().nVocab;
    writeNpy(o.dumpLogits, rows, static_cast<int64_t>(rows.size()) / V, V);
  }
  if (!o.json) {
    std::cout << "\n";
    return;
  }
  const int32_t decodeSteps = std::max(0, r.completionTokens - 1);
  const nlohmann::json j = {
      {"text", r.text},
      {"tokens", r.tokens},
      {"prompt_tokens", r.promptTokens},
      {"completion_tokens", r.completionTokens},
      {"finish_reason", engine::toString(r.finishReason)},
      {"prefill_tokens_per_s", r.prefillSeconds > 0 ? r.promptTokens / r.prefillSeconds : 0.0},
      {"decode_tokens_per_s", r.decodeSeconds > 0 ? decodeSteps / r.decodeSeconds : 0.0}};
  std::cout << j.dump() << "\n";
}

struct ChatOptions {
  ModelOptions model;
  int32_t maxTokens = 512;
  engine::SamplingParams sampling;
  std::string system;
  std::string session;  // a file: the conversation and its KV, resumed at start, saved each turn
};

// A chat session's metadata: its messages and turn count (the seed of the next draw).
std::string sessionMetadata(const std::vector<model::ChatMessage>& messages, int64_t turns) {
  nlohmann::json m = nlohmann::json::array();
  for (const model::ChatMessage& msg : messages) m.push_back({{"role", msg.role}, {"content", msg.content}});
  return nlohmann::json{{"messages", m}, {"turns", turns}}.dump();
}

void runChat(const ChatOptions& o) {
  if (!o.session.empty() && o.model.backend != engine::Backend::Cpu) {
    throw std::runtime_error("--session needs --backend cpu (KV sessions read the CPU arena)");
  }
  Loaded l = loadModel(o.model);
  const model::ChatTemplate tmpl = chatTemplateFor(o.model, l);
  auto engine = engineFor(l, o.model, l.model->hparams().nCtxTrain);
  std::vector<model::ChatMessage> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  engine::SamplingParams sampling = o.sampling;
  int64_t turns = 0;
  if (!o.session.empty() && std::filesystem::exists(o.session)) {
    // Resume: the conversation from the file, and its K/V into the prefix cache.
    const kv::KVCache::LoadedSession s = engine->loadSession(o.session);
    try {
      const nlohmann::json meta = nlohmann::json::parse(s.metadata);
      messages.clear();
      for (const nlohmann::json& m : meta.at("messages")) {
        messages.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
      }
      turns = meta.at("turns").get<int64_t>();
    } catch (const nlohmann::json::exception& e) {
      throw std::runtime_error(o.session + ": not a chat session (" + e.what() + ")");
    }
    sampling.seed += static_cast<uint64_t>(turns);
    std::cerr << "resumed " << o.session << ": " << messages.size() << " messages, "
              << s.tokens.size() << " tokens of KV cache\n";
  }
  std::cerr << "CortexStream chat: type a message; /reset clears the history, /exit or Ctrl-D "
               "quits.\n";
  // Each turn sends the whole conversation; the prefix cache holds the turns before it, so only
  // the new message (and the tail of the last block) is computed.
  std::string line;
  while (true) {
    std::cerr << "> " << std::flush;
    if (!std::getline(std::cin, line) || line == "/exit") break;
    if (line.empty()) continue;
    if (line == "/reset") {
      messages.resize(o.system.empty() ? 0 : 1);
      continue;
    }
    messages.push_back({"user", line});
    engine::RequestParams req;
    req.promptTokens = model::encodeChat(*l.tokenizer, tmpl, messages, true);
    req.sampling = sampling;
    req.maxTokens = std::min<int32_t>(
        o.maxTokens, engine->maxContextTokens() - static_cast<int32_t>(req.promptTokens.size()));
    ++sampling.seed;  // a fresh draw each turn, reproducible for a given --seed
    try {
      const engine::GenerateResult r = engine::generate(
          *engine, std::move(req),
          [](std::string_view piece) { std::cout << piece << std::flush; });
      std::cout << "\n";
      messages.push_back({"assistant", r.text});
      ++turns;
    } catch (const std::exception& e) {
      std::cerr << "error: " << e.what() << "\n";
      messages.pop_back();
      continue;
    }
    if (!o.session.empty()) {
      // What the next turn's prompt starts with; the saved KV is as much of it as is cached.
      try {
        const std::vector<int32_t> history = model::encodeChat(*l.tokenizer, tmpl, messages, false);
        engine->saveSession(history, sessionMetadata(messages, turns), o.session);
      } catch (const std::exception& e) {
        std::cerr << "error: saving the session: " << e.what() << "\n";
      }
    }
  }
}

void addSamplingOptions(CLI::App* cmd, engine::SamplingParams& s) {
  cmd->add_option("--temperature", s.temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", s.topK, "keep the k most likely tokens (0 = off)");
  cmd->add_option("--top-p", s.topP, "nucleus sampling mass in (0, 1]");
  cmd->add_option("--min-p", s.minP, "drop tokens below min-p x the top probability");
  cmd->add_option("--repeat-penalty", s.repetitionPenalty, "repetition penalty (1 = off)");
  cmd->add_option("--presence-penalty", s.presencePenalty, "OpenAI presence penalty [-2, 2]");
  cmd->add_option("--frequency-penalty", s.frequencyPenalty, "OpenAI frequency penalty [-2, 2]");
  cmd->add_option("--seed", s.seed, "random seed (same seed, same output)");
}

}  // namespace

void registerGenerateCommands(CLI::App& app) {
  {
    auto o = std::make_shared<GenerateOptions>();
    CLI::App* cmd = app.add_subcommand("generate", "Generate text for a prompt, streamed to stdout");
    addModelOptions(cmd, o->model);
    cmd->add_option("--prompt,-p", o->prompt, "prompt text")->required();
    cmd->add_flag("--chat", o->chat, "wrap the prompt as a user message in the chat template");
    cmd->add_option("--chat-template", o->model.chatTemplate,
                    "override the model's chat template (chatml)");
    cmd->add_option("--max-tokens,-n", o->maxTokens, "completion tokens at most")
        ->check(CLI::Range(1, 1 << 20));
    addSamplingOptions(cmd, o->sampling);
    cmd->add_option("--stop", o->stop, "stop string (repeatable)");
    cmd->add_flag("--ignore-eos", o->ignoreEos, "keep generating past end-of-generation tokens");
    cmd->add_flag("--json", o->json,
                  "print one JSON object (text, tokens, counts, tokens/s) instead of streaming");
    cmd->add_option("--dump-logits", o->dumpLogits,
                    "write float32 logits to FILE (.npy): one row per prompt position, then the "
                    "row each generated token was sampled from");
    cmd->add_option("--max-batched-tokens", o->maxBatchedTokens,
                    "tokens per forward step: a longer prompt is prefilled in chunks")
        ->check(CLI::Range(1, 1 << 20))
        ->capture_default_str();
    cmd->add_option("--kv-window", o->kvWindow,
                    "attention sinks + a sliding window: keep the last N tokens of KV (the "
                    "generation may then run past the model's context)")
        ->check(CLI::Range(1, 1 << 30));
    cmd->add_option("--kv-sinks", o->kvSinks, "with --kv-window: first tokens kept for good")
        ->check(CLI::Range(0, 1 << 30));
    cmd->callback([o] { runGenerate(*o); });
  }
  {
    auto o = std::make_shared<ChatOptions>();
    o->sampling.temperature = 0.7f;
    o->sampling.topP = 0.9f;
    CLI::App* cmd = app.add_subcommand("chat", "Interactive chat in the terminal");
    addModelOptions(cmd, o->model);
    cmd->add_option("--chat-template", o->model.chatTemplate,
                    "override the model's chat template (chatml)");
    cmd->add_option("--system", o->system, "system prompt");
    cmd->add_option("--session", o->session,
                    "session file: resume the conversation (and its KV cache) it holds, and save "
                    "it there after every answer");
    cmd->add_option("--max-tokens,-n", o->maxTokens, "tokens per answer at most")
        ->check(CLI::Range(1, 1 << 20));
    addSamplingOptions(cmd, o->sampling);
    cmd->callback([o] { runChat(*o); });
  }
}

}  // namespace cortex::cli
