// Embedding CortexStream in a C++ program: load a model, start the engine, submit two requests
// at once and print their streams as the tokens arrive; then a follow-up turn that finds the first
// conversation in the prefix cache and asks for two choices of one prompt (n = 2).
//
//   build/examples/embed [models/SmolLM2-135M-Instruct.Q4_1.gguf]
#include <iostream>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/transformer.h"
#include "model/tokenizer.h"

using namespace cortex;

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  try {
    auto model = model::TransformerModel::load(path);
    const auto tokenizer = model::Tokenizer::fromGGUF(model->file());
    const auto chat = model::detectChatTemplate(tokenizer.chatTemplate());

    engine::EngineConfig config;
    config.kvCacheBytes = 64ull << 20;  // 64 MiB of KV cache
    engine::Engine engine(*model, tokenizer, config);

    std::vector<std::shared_ptr<engine::RequestStream>> streams;
    const std::vector<std::string> questions = {"What is a cache?", "Name a prime number."};
    for (const std::string& question : questions) {
      const std::vector<model::ChatMessage> messages = {{"user", question}};
      engine::RequestParams params;
      params.promptTokens =
          tokenizer.encode(model::applyChatTemplate(chat, messages, true), true, true);
      params.sampling.temperature = 0;  // greedy
      params.maxTokens = 48;
      streams.push_back(engine.submit(std::move(params)));  // throws EngineError if refused
    }
    // Both requests run in the same batches; read their events in turn.
    std::vector<std::string> answers(streams.size());
    size_t open = streams.size();
    while (open > 0) {
      for (size_t i = 0; i < streams.size(); ++i) {
        while (auto event = streams[i]->next(std::chrono::milliseconds(1))) {
          answers[i] += event->text;
          if (event->finished) {
            std::cout << "[" << i << "] " << answers[i] << "\n    (" << event->completionTokens
                      << " tokens, finish: " << engine::toString(event->finishReason) << ")\n";
            --open;
          }
        }
      }
    }
    // The next turn sends the whole conversation; its first turn is already in the prefix cache,
    // and the prompt is computed once for both choices.
    const std::vector<model::ChatMessage> followUp = {
        {"user", questions[0]}, {"assistant", answers[0]}, {"user", "Now in five words."}};
    engine::RequestParams params;
    params.promptTokens =
        tokenizer.encode(model::applyChatTemplate(chat, followUp, true), true, true);
    params.sampling.temperature = 0.7f;
    params.sampling.seed = 1;  // choice i samples with seed + i
    params.maxTokens = 24;
    params.n = 2;
    auto stream = engine.submit(std::move(params));
    std::vector<std::string> choices(2);
    while (auto event = stream->next(std::chrono::seconds(60))) {
      choices[static_cast<size_t>(event->index)] += event->text;
      if (event->finished) {
        std::cout << "[follow-up, choice " << event->index << "] "
                  << choices[static_cast<size_t>(event->index)] << "\n    ("
                  << event->cachedTokens << " of " << event->promptTokens
                  << " prompt tokens were cached)\n";
      }
    }
    const engine::EngineStats stats = engine.stats();
    std::cout << "steps: " << stats.steps << ", KV blocks in use now: " << stats.kv.usedBlocks
              << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
