// Running one request to completion on an Engine, synchronously: what `generate`, `chat` and
// `perplexity` use. The engine does all the work (validation, scheduling, the forward pass,
// sampling, stop strings); this only collects its events.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/engine.h"

namespace cortex::engine {

struct GenerateResult {
  std::string text;
  std::vector<int32_t> tokens;  // completion token ids (including a final end-of-generation)
  int32_t promptTokens = 0;
  int32_t completionTokens = 0;
  FinishReason finishReason = FinishReason::Stop;
  std::vector<TokenLogprob> logprobs;        // with params.topLogprobs >= 0
  std::vector<TokenLogprob> promptLogprobs;  // with params.promptLogprobs
  std::vector<float> promptLogits;           // with params.returnLogits: prompt rows
  std::vector<float> logits;                 // with params.returnLogits: one row per token
  double prefillSeconds = 0;  // submit to the first token (to the end when nothing is generated)
  double decodeSeconds = 0;   // from the first token to the last
};

// Submits `params` and waits for the request to finish. onText receives each piece of text as it
// is produced (UTF-8 complete, no part of a stop string). Throws EngineError when submit() refuses
// the request, and std::runtime_error with the engine's message when the request ends with
// FinishReason::Error or Cancelled.
GenerateResult generate(Engine& engine, RequestParams params,
                        const std::function<void(std::string_view)>& onText = {});

}  // namespace cortex::engine
