// One generation request between the engine and an HTTP response: what to add around the
// engine's events (the response's identity, echo, logprobs, usage) and how to write them, as one
// JSON body (plain) or as server-sent events (streamed). Nothing here touches the network: the
// HTTP front end feeds events in and writes out what comes back.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "model/tokenizer.h"

namespace cortex::server {

// The response's identity and what the client asked to have added to the engine's events.
struct GenerationInfo {
  bool chat = false;
  bool stream = false;
  std::string id;
  int64_t created = 0;
  std::string model;
  int32_t topLogprobs = -1;
  bool echo = false;
  std::string echoText;               // prompt text, prepended to the first text when echo
  std::vector<int32_t> promptTokens;  // for echo logprobs
  bool includeUsage = false;
  int32_t n = 1;                      // choices
};

class Generation {
 public:
  Generation(GenerationInfo info, std::shared_ptr<engine::RequestStream> stream,
             const model::Tokenizer& tokenizer);

  const GenerationInfo& info() const { return info_; }
  engine::RequestStream& stream() { return *stream_; }
  const std::shared_ptr<engine::RequestStream>& streamPtr() const { return stream_; }

  // Takes every event the engine has sent so far. Streamed: returns the SSE frames to write
  // (the chat role deltas come with the first call; [DONE] with the last). Plain: keeps the
  // events for plainBody() and returns "".
  std::string drain();
  // Every choice's last event was taken.
  bool finished() const { return open_ == 0; }

  // A plain request's answer once finished(): HTTP status and JSON body (an error object when the
  // engine failed or cancelled it).
  std::pair<int, nlohmann::json> plainBody() const;

 private:
  std::string chunkOf(nlohmann::json choice) const;
  std::string choiceChunk(engine::RequestEvent& ev);
  std::string streamEvent(engine::RequestEvent ev);
  void keepEvent(engine::RequestEvent ev);

  GenerationInfo info_;
  std::shared_ptr<engine::RequestStream> stream_;
  const model::Tokenizer& tokenizer_;
  int32_t open_;                // choices not finished
  int64_t completionTokens_ = 0;
  bool started_ = false;        // the stream's opening frames were produced
  // Per choice: nothing written yet; the legacy logprobs' text offset (streamed).
  std::vector<uint8_t> first_;
  std::vector<int64_t> textOffset_;
  // Per choice (plain): the text, the logprobs and the last event.
  struct Choice {
    std::string text;
    std::vector<engine::TokenLogprob> promptLps, lps;
    engine::RequestEvent last;
  };
  std::vector<Choice> choices_;
};

}  // namespace cortex::server
