#include "server/http_server.h"

#include <httplib.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <iostream>
#include <random>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "server/connection_probe.h"
#include "server/openai_protocol.h"

namespace cortex::server {

using nlohmann::json;

namespace {

constexpr auto kPollInterval = std::chrono::milliseconds(100);

int64_t unixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

uint64_t randomU64() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  return rng();
}

std::string newId(const char* prefix) {
  static const char* const kHex = "0123456789abcdef";
  std::string id = prefix;
  uint64_t a = randomU64(), b = randomU64();
  for (int i = 0; i < 16; ++i, a >>= 4) id += kHex[a & 15];
  for (int i = 0; i < 8; ++i, b >>= 4) id += kHex[b & 15];
  return id;
}

// At most ~200 bytes of `text`, cut on a UTF-8 character boundary, saying how much was left out.
std::string excerpt(const std::string& text) {
  constexpr size_t kMax = 200;
  if (text.size() <= kMax) return text;
  size_t cut = kMax;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.substr(0, cut) + "... (" + std::to_string(text.size() - cut) + " more bytes)";
}

// completionTokens: summed over the choices.
json usageJson(const engine::RequestEvent& last, int64_t completionTokens) {
  return {{"prompt_tokens", last.promptTokens},
          {"completion_tokens", completionTokens},
          {"total_tokens", last.promptTokens + completionTokens},
          {"prompt_tokens_details", {{"cached_tokens", last.cachedTokens}}}};
}

void setJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(dumpJson(body), "application/json");
}

// What a generation needs besides the engine stream: the response's identity and what to add
// around the engine's events (echo, logprobs, usage).
struct GenerationInfo {
  bool chat = false;
  std::string id;
  int64_t created = 0;
  std::string model;
  int32_t topLogprobs = -1;
  bool echo = false;
  std::string echoText;                 // prompt text, prepended to the first text when echo
  std::vector<int32_t> promptTokens;    // for echo logprobs
  bool includeUsage = false;
  int32_t n = 1;                        // choices
};

// Prompt logprobs as the engine sent them, with an entry for the first prompt token (which has
// no logprob) in front if the engine left it out.
std::vector<engine::TokenLogprob> promptEntries(const GenerationInfo& g,
                                                std::vector<engine::TokenLogprob> entries) {
  if (entries.size() + 1 == g.promptTokens.size()) {
    entries.insert(entries.begin(), engine::TokenLogprob{g.promptTokens[0], NAN, {}});
  }
  return entries;
}

}  // namespace

struct HttpServer::StreamState {
  GenerationInfo info;
  std::shared_ptr<engine::RequestStream> stream;
  std::optional<ConnectionProbe> probe;
  bool finished = false;  // every choice's finished event (and [DONE]) was written
  // Per choice: nothing written yet; the legacy logprobs' text offset.
  std::vector<uint8_t> first;
  std::vector<int64_t> textOffset;
  int32_t open = 1;       // choices not finished
  int64_t completionTokens = 0;
};

HttpServer::HttpServer(engine::Engine& engine, const model::Tokenizer& tokenizer,
                       ServerConfig config)
    : engine_(engine), tokenizer_(tokenizer), config_(std::move(config)),
      http_(std::make_unique<httplib::Server>()), startedUnix_(unixNow()) {
  int threads = config_.httpThreads;
  if (threads <= 0) threads = engine_.config().maxNumSeqs * 2 + 16;
  const auto poolSize = static_cast<size_t>(threads);
  http_->new_task_queue = [poolSize] { return new httplib::ThreadPool(poolSize); };
  http_->set_payload_max_length(config_.maxBodyBytes);
  http_->set_keep_alive_timeout(5);
  http_->set_read_timeout(30, 0);
  http_->set_write_timeout(30, 0);
  routes();
}

HttpServer::~HttpServer() = default;

void HttpServer::respondError(httplib::Response& res, int status, const std::string& message,
                              const std::string& type, const std::string& param,
                              const std::string& code) {
  ApiError e;
  e.status = status;
  e.message = message;
  e.type = type;
  e.param = param;
  e.code = code;
  setJson(res, status, errorJson(e));
}

void HttpServer::routes() {
  httplib::Server& s = *http_;

  // Errors httplib produces itself (404 unknown path, 413 body too large, 400 bad request line)
  // get an OpenAI-style body; responses our handlers already filled are left alone.
  s.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    ++httpErrors_;
    if (!res.body.empty()) return;
    switch (res.status) {
      case 404:
        respondError(res, 404, "no route for " + req.method + " " + req.path +
                                   " (endpoints: POST /v1/completions, POST /v1/chat/completions, "
                                   "GET /v1/models, GET /health, GET /metrics)",
                     "invalid_request_error", "", "not_found");
        break;
      case 413:
        respondError(res, 413,
                     "request body is larger than " + std::to_string(config_.maxBodyBytes) +
                         " bytes",
                     "invalid_request_error", "", "payload_too_large");
        break;
      default:
        respondError(res, res.status, "HTTP error " + std::to_string(res.status),
                     res.status >= 500 ? "server_error" : "invalid_request_error");
    }
  });
  s.set_exception_handler(
      [this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown error";
        try {
          if (ep) std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        respondError(res, 500, "internal error: " + what, "server_error");
      });

  s.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handleGenerate(req, res, false);
  });
  s.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handleGenerate(req, res, true);
  });
  // Some clients use the paths without /v1.
  s.Post("/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handleGenerate(req, res, false);
  });
  s.Post("/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    handleGenerate(req, res, true);
  });

  auto modelJson = [this] {
    return json{{"id", config_.servedModelName},
                {"object", "model"},
                {"created", startedUnix_},
                {"owned_by", "cortexstream"},
                {"max_model_len", engine_.maxContextTokens()}};
  };
  s.Get("/v1/models", [this, modelJson](const httplib::Request&, httplib::Response& res) {
    ++httpRequests_;
    setJson(res, 200, {{"object", "list"}, {"data", json::array({modelJson()})}});
  });
  s.Get(R"(/v1/models/(.+))",
        [this, modelJson](const httplib::Request& req, httplib::Response& res) {
          ++httpRequests_;
          if (req.matches[1] != config_.servedModelName) {
            respondError(res, 404, "model '" + std::string(req.matches[1]) + "' does not exist",
                         "invalid_request_error", "model", "model_not_found");
            return;
          }
          setJson(res, 200, modelJson());
        });
  s.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    ++httpRequests_;
    if (draining_) {
      setJson(res, 503, {{"status", "shutting_down"}});
    } else {
      setJson(res, 200, {{"status", "ok"}});
    }
  });
  s.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    ++httpRequests_;
    ServerCounters c;
    c.httpRequests = httpRequests_.load();
    c.httpErrors = httpErrors_.load();
    c.rejectedQueueFull = rejectedQueueFull_.load();
    res.set_content(renderPrometheus(engine_.stats(), c, config_.servedModelName),
                    "text/plain; version=0.0.4; charset=utf-8");
  });

  // Known paths with the wrong method: 405 with Allow (httplib alone would say 404).
  auto methodNotAllowed = [this](const char* allow) {
    return [this, allow](const httplib::Request& req, httplib::Response& res) {
      res.set_header("Allow", allow);
      respondError(res, 405, "method " + req.method + " is not allowed on " + req.path +
                                 " (allowed: " + allow + ")",
                   "invalid_request_error", "", "method_not_allowed");
    };
  };
  for (const char* path : {"/v1/completions", "/v1/chat/completions", "/completions",
                           "/chat/completions"}) {
    s.Get(path, methodNotAllowed("POST"));
    s.Put(path, methodNotAllowed("POST"));
    s.Delete(path, methodNotAllowed("POST"));
    s.Patch(path, methodNotAllowed("POST"));
  }
  for (const char* path : {"/v1/models", R"(/v1/models/(.+))", "/health", "/metrics"}) {
    s.Post(path, methodNotAllowed("GET"));
    s.Put(path, methodNotAllowed("GET"));
    s.Delete(path, methodNotAllowed("GET"));
    s.Patch(path, methodNotAllowed("GET"));
    s.Options(path, methodNotAllowed("GET"));
  }
  for (const char* path : {"/v1/completions", "/v1/chat/completions", "/completions",
                           "/chat/completions"}) {
    s.Options(path, methodNotAllowed("POST"));
  }
}

void HttpServer::track(const std::shared_ptr<engine::RequestStream>& s) {
  std::lock_guard lock(mu_);
  active_.insert(s);
  ++inFlight_;
}

void HttpServer::untrack(const std::shared_ptr<engine::RequestStream>& s) {
  {
    std::lock_guard lock(mu_);
    active_.erase(s);
    --inFlight_;
  }
  cv_.notify_all();
}

void HttpServer::handleGenerate(const httplib::Request& req, httplib::Response& res, bool chat) {
  ++httpRequests_;
  GenerationInfo info;
  engine::RequestParams params;
  bool stream = false;
  try {
    json body;
    try {
      body = json::parse(req.body);
    } catch (const json::exception& e) {
      // Syntax errors and numbers out of range (1e400) alike. The parser's message quotes the
      // offending token whole, which may be megabytes long: only an excerpt goes back.
      throwInvalid("", "the request body is not valid JSON: " + excerpt(e.what()), "invalid_json");
    }
    const ParsedRequest p = chat ? parseChatRequest(body) : parseCompletionRequest(body);
    stream = p.stream;
    info.chat = chat;
    info.id = newId(chat ? "chatcmpl-" : "cmpl-");
    info.created = unixNow();
    info.model = config_.servedModelName;
    info.topLogprobs = p.topLogprobs;
    info.echo = p.echo;
    info.includeUsage = p.includeUsage;
    info.n = p.n;
    params.n = p.n;
    params.bestOf = p.bestOf;

    std::vector<int32_t> prompt;
    if (chat) {
      if (!config_.chatTemplate) throwInvalid("messages", config_.chatTemplateError);
      // Control-token text typed inside a message stays text (no forged turns).
      prompt = model::encodeChat(tokenizer_, *config_.chatTemplate, p.messages, true);
    } else if (p.promptText) {
      prompt = tokenizer_.encode(*p.promptText, true, true);
      info.echoText = *p.promptText;
    } else {
      prompt = p.promptTokenIds;
      if (p.echo) info.echoText = tokenizer_.decode(prompt);
    }
    // Defaults: 16 for completions (OpenAI's legacy default), the rest of the context for chat.
    // The engine judges whether the request fits (its TooLong error says by how much).
    const int64_t room = std::max<int64_t>(
        1, engine_.maxContextTokens() - static_cast<int64_t>(prompt.size()));
    const int64_t maxTokens =
        p.maxTokens ? *p.maxTokens : chat ? room : std::min<int64_t>(16, room);
    params.sampling = p.sampling;
    if (!p.seedGiven) params.sampling.seed = randomU64();
    params.maxTokens = static_cast<int32_t>(maxTokens);
    params.stop = p.stop;
    params.ignoreEos = p.ignoreEos;
    params.topLogprobs = p.topLogprobs;
    params.promptLogprobs = !chat && p.echo && p.topLogprobs >= 0;
    if (params.promptLogprobs) info.promptTokens = prompt;
    params.promptTokens = std::move(prompt);
  } catch (const ApiException& e) {
    const ApiError& err = e.error();
    respondError(res, err.status, err.message, err.type, err.param, err.code);
    return;
  }

  std::shared_ptr<engine::RequestStream> rs;
  try {
    rs = engine_.submit(std::move(params));
  } catch (const engine::EngineError& e) {
    using Kind = engine::EngineError::Kind;
    switch (e.kind()) {
      case Kind::InvalidRequest: {
        // The engine names the request field; a chat request's prompt is its messages.
        const std::string param = e.param() == "prompt" && chat ? "messages" : e.param();
        respondError(res, 400, e.what(), "invalid_request_error", param);
        break;
      }
      case Kind::TooLong:
        respondError(res, 400, e.what(), "invalid_request_error", chat ? "messages" : "prompt",
                     "context_length_exceeded");
        break;
      case Kind::QueueFull:
        ++rejectedQueueFull_;
        res.set_header("Retry-After", "1");
        respondError(res, 503, e.what(), "server_error", "", "queue_full");
        break;
      case Kind::ShuttingDown:
        respondError(res, 503, e.what(), "server_error", "", "shutting_down");
        break;
    }
    return;
  }
  track(rs);
  std::optional<ConnectionProbe> probe =
      ConnectionProbe::find(req.local_port, req.remote_addr, req.remote_port);

  if (!stream) {
    struct Choice {
      std::string text;
      std::vector<engine::TokenLogprob> promptLps, lps;
      engine::RequestEvent last;
    };
    std::vector<Choice> choices(static_cast<size_t>(info.n));
    for (Choice& c : choices) c.text = info.echo ? info.echoText : std::string();
    int32_t open = info.n;
    bool cancelSent = false;
    while (open > 0) {
      // note: nobody will read the answer of a client that went away; free its blocks now.
      if (!cancelSent && (aborting_ || (probe && probe->peerClosed()))) {
        rs->cancel();
        cancelSent = true;
      }
      std::optional<engine::RequestEvent> ev = rs->next(kPollInterval);
      if (!ev) continue;
      Choice& c = choices.at(static_cast<size_t>(ev->index));
      c.text += ev->text;
      if (!ev->promptLogprobs.empty()) c.promptLps = std::move(ev->promptLogprobs);
      c.lps.insert(c.lps.end(), ev->logprobs.begin(), ev->logprobs.end());
      if (ev->finished) {
        c.last = std::move(*ev);
        --open;
      }
    }
    untrack(rs);
    int64_t completionTokens = 0;
    for (const Choice& c : choices) {
      if (c.last.finishReason == engine::FinishReason::Error) {
        respondError(res, 500, "generation failed: " + c.last.error, "server_error");
        return;
      }
      if (c.last.finishReason == engine::FinishReason::Cancelled) {
        respondError(res, 503, "the request was cancelled: the server is shutting down",
                     "server_error", "", "shutting_down");
        return;
      }
      completionTokens += c.last.completionTokens;
    }
    json out = json::array();
    for (size_t i = 0; i < choices.size(); ++i) {
      Choice& c = choices[i];
      json logprobs = nullptr;
      if (info.topLogprobs >= 0) {
        if (chat) {
          logprobs = {{"content", chatLogprobContent(tokenizer_, c.lps)}};
        } else {
          std::vector<engine::TokenLogprob> all;
          if (info.echo) all = promptEntries(info, std::move(c.promptLps));
          const bool firstIsNull = info.echo && !all.empty();
          all.insert(all.end(), c.lps.begin(), c.lps.end());
          int64_t offset = 0;
          logprobs = completionLogprobs(tokenizer_, all, firstIsNull, offset);
        }
      }
      json choice = {{"index", i},
                     {"logprobs", logprobs},
                     {"finish_reason", finishReasonString(c.last.finishReason)}};
      if (chat) {
        choice["message"] = {{"role", "assistant"}, {"content", c.text}};
      } else {
        choice["text"] = c.text;
      }
      out.push_back(std::move(choice));
    }
    setJson(res, 200,
            {{"id", info.id},
             {"object", chat ? "chat.completion" : "text_completion"},
             {"created", info.created},
             {"model", info.model},
             {"choices", std::move(out)},
             {"usage", usageJson(choices[0].last, completionTokens)}});
    return;
  }

  auto st = std::make_shared<StreamState>();
  st->info = std::move(info);
  st->stream = rs;
  st->probe = probe;
  st->first.assign(static_cast<size_t>(st->info.n), 1);
  st->textOffset.assign(static_cast<size_t>(st->info.n), 0);
  st->open = st->info.n;
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");

  auto chunkOf = [](const GenerationInfo& g, json choice) {
    return "data: " +
           dumpJson({{"id", g.id},
                     {"object", g.chat ? "chat.completion.chunk" : "text_completion"},
                     {"created", g.created},
                     {"model", g.model},
                     {"choices", json::array({std::move(choice)})}}) +
           "\n\n";
  };

  // One event's choice chunk: its text (with the echo in front of a choice's first chunk),
  // logprobs and finish reason.
  auto choiceChunk = [this, chunkOf](StreamState& state, engine::RequestEvent& ev) -> std::string {
    const GenerationInfo& g = state.info;
    const auto idx = static_cast<size_t>(ev.index);
    std::string text = ev.text;
    json logprobs = nullptr;
    if (g.chat) {
      if (g.topLogprobs >= 0) {
        logprobs = {{"content", chatLogprobContent(tokenizer_, ev.logprobs)}};
      }
    } else {
      std::vector<engine::TokenLogprob> entries;
      bool firstIsNull = false;
      if (state.first[idx] && g.echo) {
        text = g.echoText + text;
        if (g.topLogprobs >= 0) {
          entries = promptEntries(g, std::move(ev.promptLogprobs));
          firstIsNull = !entries.empty();
        }
      }
      if (g.topLogprobs >= 0) {
        entries.insert(entries.end(), ev.logprobs.begin(), ev.logprobs.end());
        logprobs = completionLogprobs(tokenizer_, entries, firstIsNull, state.textOffset[idx]);
      }
    }
    json choice = {{"index", ev.index},
                   {"logprobs", logprobs},
                   {"finish_reason", ev.finished ? json(finishReasonString(ev.finishReason))
                                                  : json(nullptr)}};
    if (g.chat) {
      choice["delta"] = ev.finished && text.empty() ? json::object()
                                                     : json{{"content", text}};
    } else {
      choice["text"] = text;
    }
    return chunkOf(g, std::move(choice));
  };

  res.set_chunked_content_provider(
      "text/event-stream",
      [this, st, chunkOf, choiceChunk](size_t, httplib::DataSink& sink) {
        if (st->finished) {
          sink.done();
          return true;
        }
        const GenerationInfo& g = st->info;
        std::string out;
        if (st->first[0] && g.chat) {
          // OpenAI's first chat chunk of each choice carries the role before any content.
          for (int32_t i = 0; i < g.n; ++i) {
            out += chunkOf(g, {{"index", i},
                               {"delta", {{"role", "assistant"}, {"content", ""}}},
                               {"logprobs", nullptr},
                               {"finish_reason", nullptr}});
          }
          std::fill(st->first.begin(), st->first.end(), 0);
        }
        if (st->probe && st->probe->peerClosed()) {
          // The client went away: free the request's blocks now (returning false ends the
          // response; the releaser below cancels the request).
          return false;
        }
        std::optional<engine::RequestEvent> ev = st->stream->next(kPollInterval);
        if (!ev) {
          if (aborting_) st->stream->cancel();
          if (!out.empty() && !sink.write(out.data(), out.size())) {
            st->stream->cancel();
            return false;
          }
          return true;
        }
        const auto idx = static_cast<size_t>(ev->index);
        if (ev->finished) {
          --st->open;
          st->completionTokens += ev->completionTokens;
        }
        const bool allDone = ev->finished && st->open == 0;
        const bool cancelled = ev->finished && ev->finishReason == engine::FinishReason::Cancelled;
        if (cancelled && !ev->text.empty()) {
          // The text held back until the cut is real output: send it before saying so.
          engine::RequestEvent text = *ev;
          text.finished = false;
          out += choiceChunk(*st, text);
          st->first[idx] = 0;
        }
        if (ev->finished && ev->finishReason == engine::FinishReason::Error) {
          ApiError err;
          err.status = 500;
          err.type = "server_error";
          err.message = "generation failed: " + ev->error;
          out += "data: " + dumpJson(errorJson(err)) + "\n\n";
        } else if (cancelled) {
          // A cut response must not look complete: the error frame says why it ended, and no
          // choice chunk carries a normal finish reason.
          ApiError err;
          err.status = 503;
          err.type = "server_error";
          err.code = "shutting_down";
          err.message = "the response was cut: the server is shutting down (choice " +
                        std::to_string(ev->index) + ")";
          out += "data: " + dumpJson(errorJson(err)) + "\n\n";
        } else {
          out += choiceChunk(*st, *ev);
        }
        st->first[idx] = 0;
        if (allDone) {
          if (g.includeUsage) {
            out += "data: " +
                   dumpJson({{"id", g.id},
                             {"object", g.chat ? "chat.completion.chunk" : "text_completion"},
                             {"created", g.created},
                             {"model", g.model},
                             {"choices", json::array()},
                             {"usage", usageJson(*ev, st->completionTokens)}}) +
                   "\n\n";
          }
          out += "data: [DONE]\n\n";
        }
        if (!sink.write(out.data(), out.size())) {
          // The client went away: free the request's blocks now.
          st->stream->cancel();
          return false;
        }
        if (allDone) {
          st->finished = true;
          sink.done();
        }
        return true;
      },
      [this, st](bool) {
        if (!st->finished) st->stream->cancel();
        untrack(st->stream);
      });
}

void HttpServer::bind() {
  if (config_.port < 0 || config_.port > 65535) {
    throw std::runtime_error("invalid port " + std::to_string(config_.port));
  }
  if (config_.port == 0) {
    port_ = http_->bind_to_any_port(config_.host);
    if (port_ < 0) throw std::runtime_error("cannot bind to " + config_.host);
  } else {
    if (!http_->bind_to_port(config_.host, config_.port)) {
      throw std::runtime_error("cannot listen on " + config_.host + ":" +
                               std::to_string(config_.port) +
                               " (address in use, or not an address of this machine?)");
    }
    port_ = config_.port;
  }
}

void HttpServer::run() {
  http_->listen_after_bind();
  {
    std::lock_guard lock(mu_);
    runDone_ = true;
  }
  cv_.notify_all();
}

void HttpServer::shutdown(std::chrono::milliseconds grace,
                          const std::function<bool()>& interrupted) {
  // note: the listener stays open while requests finish, answering 503 to new ones: httplib stops
  // writing streamed responses once stop() is called, which would cut off the requests we are
  // waiting for.
  draining_ = true;
  engine_.drain();
  const auto deadline = std::chrono::steady_clock::now() + grace;
  {
    std::unique_lock lock(mu_);
    while (inFlight_.load() > 0 && std::chrono::steady_clock::now() < deadline &&
           !(interrupted && interrupted())) {
      cv_.wait_for(lock, kPollInterval);
    }
    if (inFlight_.load() > 0) {
      std::cerr << "shutdown: cancelling " << inFlight_.load() << " unfinished request(s)\n";
    }
    aborting_ = true;
    for (const auto& s : active_) s->cancel();
    // Cancelled streams end within one engine step; give their handlers a moment to write.
    cv_.wait_for(lock, std::chrono::seconds(2), [this] { return inFlight_.load() == 0; });
  }
  // stop() only takes effect once listening has begun, so repeat it until run() returns.
  std::unique_lock lock(mu_);
  while (!runDone_) {
    lock.unlock();
    http_->stop();
    lock.lock();
    cv_.wait_for(lock, std::chrono::milliseconds(50));
  }
}

}  // namespace cortex::server
