#include "server/generation.h"

#include <chrono>
#include <cmath>

#include "server/openai_protocol.h"

namespace cortex::server {

using nlohmann::json;

namespace {

// completionTokens: summed over the choices.
json usageJson(const engine::RequestEvent& last, int64_t completionTokens) {
  return {{"prompt_tokens", last.promptTokens},
          {"completion_tokens", completionTokens},
          {"total_tokens", last.promptTokens + completionTokens},
          {"prompt_tokens_details", {{"cached_tokens", last.cachedTokens}}}};
}

// Prompt logprobs as the engine sent them, with an entry for the first prompt token (which has
// no logprob) in front if the engine left it out.
std::vector<engine::TokenLogprob> promptEntries(const GenerationInfo& g,
                                                std::vector<engine::TokenLogprob> entries) {
  if (entries.size() + 1 == g.promptTokens.size()) {
    entries.insert(entries.begin(), engine::TokenLogprob{g.promptTokens[0], NAN, {}});
  }
  return entries;
}

std::string sseFrame(const json& j) { return "data: " + dumpJson(j) + "\n\n"; }

// How a request that did not finish normally ends: the engine failed it, or the shutdown cut it.
ApiError failed(const std::string& why) {
  return {500, "generation failed: " + why, "server_error", "", ""};
}
ApiError cut(const std::string& what) {
  return {503, what + ": the server is shutting down", "server_error", "", "shutting_down"};
}

}  // namespace

Generation::Generation(GenerationInfo info, std::shared_ptr<engine::RequestStream> stream,
                       const model::Tokenizer& tokenizer)
    : info_(std::move(info)), stream_(std::move(stream)), tokenizer_(tokenizer), open_(info_.n) {
  const auto n = static_cast<size_t>(info_.n);
  first_.assign(n, 1);
  textOffset_.assign(n, 0);
  if (!info_.stream) {
    choices_.resize(n);
    for (Choice& c : choices_) c.text = info_.echo ? info_.echoText : std::string();
  }
}

std::string Generation::drain() {
  std::string out;
  if (info_.stream && !started_ && info_.chat) {
    // OpenAI's first chat chunk of each choice carries the role before any content.
    for (int32_t i = 0; i < info_.n; ++i) {
      out += chunkOf({{"index", i},
                      {"delta", {{"role", "assistant"}, {"content", ""}}},
                      {"logprobs", nullptr},
                      {"finish_reason", nullptr}});
    }
    std::fill(first_.begin(), first_.end(), 0);
  }
  started_ = true;
  while (open_ > 0) {
    std::optional<engine::RequestEvent> ev = stream_->next(std::chrono::milliseconds(0));
    if (!ev) break;
    if (ev->finished) {
      --open_;
      completionTokens_ += ev->completionTokens;
    }
    if (info_.stream) {
      out += streamEvent(std::move(*ev));
    } else {
      keepEvent(std::move(*ev));
    }
  }
  return out;
}

void Generation::keepEvent(engine::RequestEvent ev) {
  Choice& c = choices_.at(static_cast<size_t>(ev.index));
  c.text += ev.text;
  if (!ev.promptLogprobs.empty()) c.promptLps = std::move(ev.promptLogprobs);
  c.lps.insert(c.lps.end(), ev.logprobs.begin(), ev.logprobs.end());
  if (ev.finished) c.last = std::move(ev);
}

std::pair<int, json> Generation::plainBody() const {
  for (const Choice& c : choices_) {
    if (c.last.finishReason == engine::FinishReason::Error) {
      return {500, errorJson(failed(c.last.error))};
    }
    if (c.last.finishReason == engine::FinishReason::Cancelled) {
      return {503, errorJson(cut("the request was cancelled"))};
    }
  }
  json out = json::array();
  for (size_t i = 0; i < choices_.size(); ++i) {
    const Choice& c = choices_[i];
    json logprobs = nullptr;
    if (info_.topLogprobs >= 0) {
      if (info_.chat) {
        logprobs = {{"content", chatLogprobContent(tokenizer_, c.lps)}};
      } else {
        std::vector<engine::TokenLogprob> all;
        if (info_.echo) all = promptEntries(info_, c.promptLps);
        const bool firstIsNull = info_.echo && !all.empty();
        all.insert(all.end(), c.lps.begin(), c.lps.end());
        int64_t offset = 0;
        logprobs = completionLogprobs(tokenizer_, all, firstIsNull, offset);
      }
    }
    json choice = {{"index", i},
                   {"logprobs", logprobs},
                   {"finish_reason", finishReasonString(c.last.finishReason)}};
    if (info_.chat) {
      choice["message"] = {{"role", "assistant"}, {"content", c.text}};
    } else {
      choice["text"] = c.text;
    }
    out.push_back(std::move(choice));
  }
  return {200,
          {{"id", info_.id},
           {"object", info_.chat ? "chat.completion" : "text_completion"},
           {"created", info_.created},
           {"model", info_.model},
           {"choices", std::move(out)},
           {"usage", usageJson(choices_[0].last, completionTokens_)}}};
}

std::string Generation::chunkOf(json choice) const {
  return sseFrame({{"id", info_.id},
                   {"object", info_.chat ? "chat.completion.chunk" : "text_completion"},
                   {"created", info_.created},
                   {"model", info_.model},
                   {"choices", json::array({std::move(choice)})}});
}

// One event's choice chunk: its text (with the echo in front of a choice's first chunk),
// logprobs and finish reason.
std::string Generation::choiceChunk(engine::RequestEvent& ev) {
  const auto idx = static_cast<size_t>(ev.index);
  std::string text = ev.text;
  json logprobs = nullptr;
  if (info_.chat) {
    if (info_.topLogprobs >= 0) {
      logprobs = {{"content", chatLogprobContent(tokenizer_, ev.logprobs)}};
    }
  } else {
    std::vector<engine::TokenLogprob> entries;
    bool firstIsNull = false;
    if (first_[idx] && info_.echo) {
      text = info_.echoText + text;
      if (info_.topLogprobs >= 0) {
        entries = promptEntries(info_, std::move(ev.promptLogprobs));
        firstIsNull = !entries.empty();
      }
    }
    if (info_.topLogprobs >= 0) {
      entries.insert(entries.end(), ev.logprobs.begin(), ev.logprobs.end());
      logprobs = completionLogprobs(tokenizer_, entries, firstIsNull, textOffset_[idx]);
    }
  }
  json choice = {{"index", ev.index},
                 {"logprobs", logprobs},
                 {"finish_reason",
                  ev.finished ? json(finishReasonString(ev.finishReason)) : json(nullptr)}};
  if (info_.chat) {
    choice["delta"] = ev.finished && text.empty() ? json::object() : json{{"content", text}};
  } else {
    choice["text"] = text;
  }
  first_[idx] = 0;
  return chunkOf(std::move(choice));
}

std::string Generation::streamEvent(engine::RequestEvent ev) {
  std::string out;
  const bool cancelled = ev.finished && ev.finishReason == engine::FinishReason::Cancelled;
  if (cancelled && !ev.text.empty()) {
    // The text held back until the cut is real output: send it before saying so.
    engine::RequestEvent text = ev;
    text.finished = false;
    out += choiceChunk(text);
  }
  if (ev.finished && ev.finishReason == engine::FinishReason::Error) {
    out += sseFrame(errorJson(failed(ev.error)));
  } else if (cancelled) {
    // A cut response must not look complete: the error frame says why it ended, and no choice
    // chunk carries a normal finish reason.
    out += sseFrame(
        errorJson(cut("the response of choice " + std::to_string(ev.index) + " was cut")));
  } else {
    out += choiceChunk(ev);
  }
  if (open_ == 0) {
    if (info_.includeUsage) {
      out += sseFrame({{"id", info_.id},
                       {"object", info_.chat ? "chat.completion.chunk" : "text_completion"},
                       {"created", info_.created},
                       {"model", info_.model},
                       {"choices", json::array()},
                       {"usage", usageJson(ev, completionTokens_)}});
    }
    out += "data: [DONE]\n\n";
  }
  return out;
}

}  // namespace cortex::server
