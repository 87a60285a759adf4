// The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions (plain and streamed as
// server-sent events), /v1/models, /health and /metrics, on top of one engine::Engine.
//
// Threads: a few I/O threads run every connection as a state machine (Boost.Beast over Asio), so
// an idle, slow or streaming client costs a socket and a buffer, never a thread. A request is
// checked and submitted to the engine on an I/O thread; the engine's thread announces each new
// event by posting to the connection, which writes it (streamed) or keeps it for the final body
// (plain). While a request runs the connection keeps reading its socket, so a client that goes
// away is noticed at once and its request cancelled: its KV blocks are freed within one engine
// step.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"

namespace cortex::server {

struct ServerConfig {
  std::string host = "127.0.0.1";
  int port = 8080;                  // 0: any free port (see port())
  std::string servedModelName;      // echoed as "model" in every response
  std::string modelPath;            // the GGUF file (absolute), for routers' /server_info
  // The KV events publisher's endpoints as bound (empty: none), for /kv_event_sources.
  std::string kvEventsEndpoint, kvEventsReplayEndpoint;
  // Template for /v1/chat/completions; nullopt: chat requests get a 400 saying why
  // (chatTemplateError).
  std::optional<model::ChatTemplate> chatTemplate;
  std::string chatTemplateError;
  size_t maxBodyBytes = 16u << 20;  // larger request bodies get 413, whatever their framing
  size_t maxHeaderBytes = 64u << 10;  // larger request heads get 431
  int ioThreads = 2;
  int maxConnections = 4096;        // open connections; past it a new one gets 503 and is closed
  // A request's head and body must arrive within readTimeout of its first byte (else 408); an
  // idle keep-alive connection is closed after keepAliveTimeout.
  std::chrono::milliseconds readTimeout{30000};
  std::chrono::milliseconds keepAliveTimeout{5000};
  // Nonempty: every path but /health (and /metrics unless metricsRequireKey) needs
  // "Authorization: Bearer <apiKey>".
  std::string apiKey;
  bool metricsRequireKey = false;
  // Both set: HTTPS only (PEM files).
  std::string sslCertFile, sslKeyFile;
  // The folder /kv_sessions/save and /kv_sessions/restore read and write (a client names only a
  // plain file name inside it); empty: those endpoints are off.
  std::string kvSessionDir;
};

class HttpServer {
 public:
  // The engine and tokenizer must outlive the server. Throws std::runtime_error for a bad TLS
  // certificate or key.
  HttpServer(engine::Engine& engine, const model::Tokenizer& tokenizer, ServerConfig config);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds the listening socket; throws std::runtime_error when the address cannot be bound
  // (in use by another process included).
  void bind();
  int port() const;
  // Serves until shutdown() (blocking). Call after bind().
  void run();

  // Graceful shutdown, callable from any thread (a signal-handling one): stops admitting requests
  // (new ones get 503, /health says shutting_down), lets those in flight finish for up to `grace`,
  // cancels what is left (their responses say so), then closes every connection so run()
  // returns. `interrupted`, polled while waiting, cuts the wait short (a second Ctrl-C).
  void shutdown(std::chrono::milliseconds grace, const std::function<bool()>& interrupted = {});

  // Requests being generated (submitted and not yet fully answered).
  int64_t inFlight() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace cortex::server
