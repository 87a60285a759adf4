#include "engine/generate.h"

#include <chrono>
#include <stdexcept>

namespace cortex::engine {

GenerateResult generate(Engine& engine, RequestParams params,
                        const std::function<void(std::string_view)>& onText) {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  std::shared_ptr<RequestStream> stream = engine.submit(std::move(params));
  GenerateResult r;
  Clock::time_point firstToken{};
  Clock::time_point lastToken{};
  for (;;) {
    std::optional<RequestEvent> e = stream->next(std::chrono::hours(1));
    if (!e) continue;
    if (!e->tokens.empty()) {
      lastToken = Clock::now();
      if (r.tokens.empty()) firstToken = lastToken;
    }
    r.tokens.insert(r.tokens.end(), e->tokens.begin(), e->tokens.end());
    r.logprobs.insert(r.logprobs.end(), e->logprobs.begin(), e->logprobs.end());
    r.logits.insert(r.logits.end(), e->logits.begin(), e->logits.end());
    if (!e->promptLogprobs.empty()) r.promptLogprobs = std::move(e->promptLogprobs);
    if (!e->promptLogits.empty()) r.promptLogits = std::move(e->promptLogits);
    if (!e->text.empty()) {
      r.text += e->text;
      if (onText) onText(e->text);
    }
    r.promptTokens = e->promptTokens;
    r.completionTokens = e->completionTokens;
    if (!e->finished) continue;
    r.finishReason = e->finishReason;
    if (e->finishReason == FinishReason::Error) throw std::runtime_error(e->error);
    if (e->finishReason == FinishReason::Cancelled) {
      throw std::runtime_error("the request was cancelled");
    }
    break;
  }
  const auto end = Clock::now();
  auto secs = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  r.prefillSeconds = secs((r.tokens.empty() ? end : firstToken) - t0);
  r.decodeSeconds = r.tokens.empty() ? 0.0 : secs(lastToken - firstToken);
  return r;
}

}  // namespace cortex::engine
