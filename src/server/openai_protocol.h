// The OpenAI wire format: request bodies of /v1/completions and /v1/chat/completions checked and
// turned into plain structs, error objects, and the JSON pieces of responses (logprobs).
// Nothing here touches the network or the engine's threads, so it is unit-testable on its own.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"

namespace cortex::server {

// An error returned to the client as {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;  // empty: null
  std::string code;   // empty: null
};

class ApiException : public std::runtime_error {
 public:
  explicit ApiException(ApiError error)
      : std::runtime_error(error.message), error_(std::move(error)) {}
  const ApiError& error() const { return error_; }

 private:
  ApiError error_;
};

// Shorthand for a 400 invalid_request_error about `param`.
[[noreturn]] void throwInvalid(const std::string& param, const std::string& message,
                               const std::string& code = {});

nlohmann::json errorJson(const ApiError& error);

// Serialises JSON for the wire: invalid UTF-8 (possible in token pieces) becomes U+FFFD instead of
// throwing.
std::string dumpJson(const nlohmann::json& j);

enum class Endpoint { Completions, ChatCompletions };

// A checked request. Fields the client left out (or set to null) keep these defaults.
struct ParsedRequest {
  Endpoint endpoint = Endpoint::Completions;
  std::string model;
  // /v1/completions: the prompt as text, or as token ids when the client sent ids.
  std::optional<std::string> promptText;
  std::vector<int32_t> promptTokenIds;
  // /v1/chat/completions
  std::vector<model::ChatMessage> messages;
  // chat_template_kwargs (as vLLM): extra variables for the chat template, e.g.
  // {"enable_thinking": false}; an object, empty when not given.
  nlohmann::ordered_json chatTemplateKwargs = nlohmann::ordered_json::object();

  std::optional<int32_t> maxTokens;  // max_tokens / max_completion_tokens, >= 1
  engine::SamplingParams sampling;   // temperature defaults to 1 (OpenAI)
  bool seedGiven = false;
  std::vector<std::string> stop;     // at most 4, empty strings dropped
  bool stream = false;
  bool includeUsage = false;         // stream_options.include_usage
  int32_t topLogprobs = -1;          // -1: no logprobs
  bool echo = false;                 // completions only
  bool ignoreEos = false;            // extension (as vLLM)
  bool skipSpecialTokens = true;     // extension (as vLLM): control tokens left out of the text
  int32_t n = 1;                     // choices, [1, 128]
  int32_t bestOf = 0;                // candidates (>= n; 0: n); no streaming when > n
  // Extension: attention sinks + a sliding window (engine::RequestParams::kvWindow); 0: none.
  int32_t kvWindow = 0;
  int32_t kvSinks = 0;
};

// Check a request body (already parsed as JSON). Throws ApiException (400) naming the first field
// that is missing, of the wrong type, out of range or unsupported (suffix, logit_bias, tools,
// non-text content parts, best_of with stream).
ParsedRequest parseCompletionRequest(const nlohmann::json& body);
ParsedRequest parseChatRequest(const nlohmann::json& body);

// Legacy completions logprobs for `entries` ({tokens, token_logprobs, top_logprobs,
// text_offset}); when firstIsNull the first entry's logprob and alternatives are null (the first
// prompt token has no context). textOffset is the offset (in bytes) of the first token's text and
// is advanced past the entries.
nlohmann::json completionLogprobs(const model::Tokenizer& tokenizer,
                                  std::span<const engine::TokenLogprob> entries, bool firstIsNull,
                                  int64_t& textOffset);

// Chat logprobs content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}].
nlohmann::json chatLogprobContent(const model::Tokenizer& tokenizer,
                                  std::span<const engine::TokenLogprob> entries);

// "stop", "length", ... as OpenAI spells them (cancelled and error have no OpenAI equivalent and
// keep the engine's names).
std::string finishReasonString(engine::FinishReason reason);

}  // namespace cortex::server
