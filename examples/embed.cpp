// Embedding CortexStream in a C++ program: load a model, start the engine, submit two requests
// at once and print their streams as the tokens arrive.
//
//   build/examples/embed [models/SmolLM2-135M-Instruct.Q4_1.gguf]
#include <iostream>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/llama.h"
#include "model/tokenizer.h"

using namespace cortex;

int main(int argc, char** argv) {
  const std::string path = argc > 1 ? argv[1] : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  try {
    auto model = model::LlamaModel::load(path);
    const auto tokenizer = model::Tokenizer::fromGGUF(model->file());
    const auto chat = model::detectChatTemplate(tokenizer.chatTemplate());

    engine::EngineConfig config;
    config.kvCacheBytes = 64ull << 20;  // 64 MiB of KV cache
    engine::Engine engine(*model, tokenizer, config);

    std::vector<std::shared_ptr<engine::RequestStream>> streams;
    for (const char* question : {"What is a cache?", "Name a prime number."}) {
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
    const engine::EngineStats stats = engine.stats();
    std::cout << "steps: " << stats.steps << ", KV blocks in use now: " << stats.kv.usedBlocks
              << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
