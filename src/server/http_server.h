// The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (plain and streamed as
// server-sent events), /v1/models, /health and /metrics, on top of one engine::Engine.
//
// Threads: cpp-httplib runs each connection on a pool thread. A handler checks the request,
// submits it to the engine and then either waits for the last event (plain) or hands httplib a
// chunked content provider that writes each engine event as soon as it arrives (stream). When a
// streaming client goes away the write fails and the request is cancelled, so its KV blocks are
// freed within one engine step.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "server/metrics.h"

namespace httplib {
class Server;
struct Request;
struct Response;
}  // namespace httplib

namespace cortex::server {

struct ServerConfig {
  std::string host = "127.0.0.1";
  int port = 8080;                  // 0: any free port (see port())
  std::string servedModelName;      // echoed as "model" in every response
  // Template for /v1/chat/completions; nullopt: chat requests get a 400 saying why
  // (chatTemplateError).
  std::optional<model::ChatTemplate> chatTemplate;
  std::string chatTemplateError;
  size_t maxBodyBytes = 16u << 20;  // larger request bodies get 413
  int httpThreads = 0;              // 0: maxNumSeqs * 2 + 16 (a streaming request holds a thread)
};

class HttpServer {
 public:
  // The engine and tokenizer must outlive the server.
  HttpServer(engine::Engine& engine, const model::Tokenizer& tokenizer, ServerConfig config);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds the listening socket; throws std::runtime_error when the address cannot be bound.
  void bind();
  int port() const { return port_; }
  // Serves until shutdown() (blocking). Call after bind().
  void run();

  // Graceful shutdown, callable from any thread (a signal-handling one): stops admitting requests
  // (new ones get 503), lets those in flight finish for up to `grace`, cancels what is left, then
  // stops the listener so run() returns. `interrupted`, polled while waiting, cuts the wait short
  // (a second Ctrl-C).
  void shutdown(std::chrono::milliseconds grace, const std::function<bool()>& interrupted = {});

  // Requests being generated (submitted and not yet fully answered).
  int64_t inFlight() const { return inFlight_.load(); }

 private:
  struct StreamState;
  void routes();
  void handleGenerate(const httplib::Request& req, httplib::Response& res, bool chat);
  void respondError(httplib::Response& res, int status, const std::string& message,
                    const std::string& type, const std::string& param = {},
                    const std::string& code = {});

  void track(const std::shared_ptr<engine::RequestStream>& s);
  void untrack(const std::shared_ptr<engine::RequestStream>& s);

  engine::Engine& engine_;
  const model::Tokenizer& tokenizer_;
  ServerConfig config_;
  std::unique_ptr<httplib::Server> http_;
  int port_ = 0;
  int64_t startedUnix_ = 0;

  std::atomic<int64_t> inFlight_{0};
  std::atomic<bool> draining_{false};  // shutdown() began: /health says so
  std::atomic<bool> aborting_{false};  // grace period over: cancel instead of waiting
  std::atomic<uint64_t> httpRequests_{0}, httpErrors_{0}, rejectedQueueFull_{0};

  std::mutex mu_;  // guards active_, runDone_
  std::condition_variable cv_;
  std::set<std::shared_ptr<engine::RequestStream>> active_;
  bool runDone_ = false;
};

}  // namespace cortex::server
