#include "server/http_server.h"
#include "server/byte_size.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cctype>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>  // before Asio: its awaitable.hpp uses std::exchange
#include <vector>

#include <boost/asio.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl.hpp>
#include <nlohmann/json.hpp>

#include "model/jinja.h"
#include "server/generation.h"
#include "server/metrics.h"
#include "server/openai_protocol.h"

namespace cortex::server {

namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
namespace beast = boost::beast;
namespace http = boost::beast::http;
using tcp = boost::asio::ip::tcp;
using nlohmann::json;

namespace {

using Request = http::request<http::string_body>;
using Response = http::response<http::string_body>;
using Digest = std::array<unsigned char, 32>;

constexpr const char* kVersion = CS_VERSION;
constexpr auto kWriteTimeout = std::chrono::seconds(30);
constexpr auto kLingerTimeout = std::chrono::seconds(1);
// Bytes of the next pipelined request read ahead while a response is being generated; beyond it
// the connection stops reading (and noticing a disconnect) until the response is written.
constexpr size_t kMaxReadAhead = 1u << 20;

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

Digest sha256(std::string_view text) {
  Digest d{};
  unsigned int len = 0;
  EVP_Digest(text.data(), text.size(), d.data(), &len, EVP_sha256(), nullptr);
  return d;
}

Response jsonResponse(int status, const json& body) {
  Response res{static_cast<http::status>(status), 11};
  res.set(http::field::content_type, "application/json");
  res.body() = dumpJson(body);
  return res;
}

Response errorResponse(int status, const std::string& message, const std::string& type,
                       const std::string& param = {}, const std::string& code = {}) {
  return jsonResponse(status, errorJson({status, message, type, param, code}));
}

// The bytes of `res` as sent for a request of HTTP `version` (11 or 10).
std::string serialize(Response& res, unsigned version, bool keepAlive) {
  res.version(version);
  res.set(http::field::server, "cortexstream");
  res.keep_alive(keepAlive);
  res.prepare_payload();
  std::ostringstream out;
  out << res;
  return std::move(out).str();
}

std::string chunk(const std::string& data) {
  std::ostringstream out;
  out << std::hex << data.size() << "\r\n" << data << "\r\n";
  return std::move(out).str();
}

// The state of the TCP connection under `fd`: TCP_CLOSE once the peer reset it.
bool tcpClosed(int fd) {
  tcp_info info{};
  socklen_t len = sizeof info;
  if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len) != 0) return true;
  return info.tcpi_state == TCP_CLOSE;
}

// "30", "2.5": a duration in seconds as people write it.
std::string seconds(std::chrono::milliseconds d) {
  std::ostringstream out;
  out << static_cast<double>(d.count()) / 1000;
  return std::move(out).str();
}

std::string pathOf(std::string_view target) {
  const size_t q = target.find('?');
  return std::string(target.substr(0, q));
}

}  // namespace

// ---------------------------------------------------------------------------------------------

struct HttpServer::Impl {
  Impl(engine::Engine& e, const model::Tokenizer& t, ServerConfig c);

  // What a request gets: an answer now, or a generation whose answer the engine produces.
  struct Routed {
    Response response;
    std::unique_ptr<Generation> generation;
  };
  Routed route(const Request& req);
  bool authorized(const Request& req) const;

  // Handlers (they may throw ApiException: its error is the answer).
  Routed generate(const Request& req, bool chat);
  Routed render(const Request& req, bool chat);
  Routed tokenize(const Request& req);
  Routed detokenize(const Request& req);
  Routed health(const Request& req);
  Routed metrics(const Request& req);
  Routed models(const Request& req);
  Routed serverInfo(const Request& req);
  Routed modelInfo(const Request& req);
  Routed load(const Request& req);
  Routed kvEventSources(const Request& req);
  Routed flushCache(const Request& req);
  Routed resizeKvCache(const Request& req);
  Routed saveSession(const Request& req);
  Routed restoreSession(const Request& req);
  // The path of the session file a request names ({"filename": ...}), inside kvSessionDir.
  std::string sessionPath(const nlohmann::json& body) const;

  // A request's checked body and its prompt (token ids; echoText: the prompt as text).
  ParsedRequest parse(const Request& req, bool chat) const;
  std::vector<int32_t> prompt(const ParsedRequest& p, bool chat, std::string* echoText) const;
  nlohmann::json modelJson() const;

  // Every path but /v1/models/{id}, with its one method.
  struct Route {
    http::verb method;
    std::function<Routed(Impl&, const Request&)> handler;
  };
  std::map<std::string, Route> routes;

  // A generation starts (false: the server is stopping and it was cancelled), and its response
  // is written (or its connection closed).
  bool track(const std::shared_ptr<engine::RequestStream>& s, std::function<void()> notify);
  void untrack(const std::shared_ptr<engine::RequestStream>& s);

  void accept();
  template <class Stream>
  void startConnection(tcp::socket socket);

  engine::Engine& engine;
  const model::Tokenizer& tokenizer;
  const ServerConfig config;
  const int64_t startedUnix;
  Digest apiKeyDigest{};

  std::atomic<int64_t> inFlight{0};
  std::atomic<int64_t> connections{0};
  std::atomic<bool> draining{false};  // shutdown() began: /health says so
  std::atomic<uint64_t> httpRequests{0}, httpErrors{0}, rejectedQueueFull{0},
      rejectedConnections{0};

  std::mutex mu;  // guards active, stopping, runDone
  std::condition_variable cv;
  std::set<std::shared_ptr<engine::RequestStream>> active;
  bool stopping = false;  // no engine event is announced to the event loop any more
  bool runDone = false;

  // The event loop last: destroying it destroys the connections, whose generations untrack
  // themselves above.
  std::optional<ssl::context> tls;
  net::io_context ioc;
  tcp::acceptor acceptor{ioc};
  net::steady_timer acceptRetry{ioc};
  int port = 0;
};

HttpServer::Impl::Impl(engine::Engine& e, const model::Tokenizer& t, ServerConfig c)
    : engine(e), tokenizer(t), config(std::move(c)), startedUnix(unixNow()) {
  using V = http::verb;
  auto gen = [](bool chat) {
    return [chat](Impl& m, const Request& r) { return m.generate(r, chat); };
  };
  auto ren = [](bool chat) {
    return [chat](Impl& m, const Request& r) { return m.render(r, chat); };
  };
  routes = {
      // OpenAI (some clients leave out /v1)
      {"/v1/completions", {V::post, gen(false)}},
      {"/v1/chat/completions", {V::post, gen(true)}},
      {"/completions", {V::post, gen(false)}},
      {"/chat/completions", {V::post, gen(true)}},
      {"/v1/models", {V::get, &Impl::models}},
      // vLLM's and SGLang's worker endpoints, which routers call
      {"/v1/completions/render", {V::post, ren(false)}},
      {"/v1/chat/completions/render", {V::post, ren(true)}},
      {"/tokenize", {V::post, &Impl::tokenize}},
      {"/detokenize", {V::post, &Impl::detokenize}},
      {"/get_server_info", {V::get, &Impl::serverInfo}},
      {"/server_info", {V::get, &Impl::serverInfo}},
      {"/get_model_info", {V::get, &Impl::modelInfo}},
      {"/model_info", {V::get, &Impl::modelInfo}},
      {"/get_load", {V::get, &Impl::load}},
      {"/kv_event_sources", {V::get, &Impl::kvEventSources}},
      {"/flush_cache", {V::post, &Impl::flushCache}},
      {"/reset_prefix_cache", {V::post, &Impl::flushCache}},
      {"/kv_sessions/save", {V::post, &Impl::saveSession}},
      {"/kv_sessions/restore", {V::post, &Impl::restoreSession}},
      {"/admin/kv-cache", {V::post, &Impl::resizeKvCache}},
      // operations
      {"/health", {V::get, &Impl::health}},
      {"/metrics", {V::get, &Impl::metrics}},
  };
  if (!config.apiKey.empty()) apiKeyDigest = sha256(config.apiKey);
  if (config.sslCertFile.empty() != config.sslKeyFile.empty()) {
    throw std::runtime_error("TLS needs both a certificate (--ssl-cert-file) and a key "
                             "(--ssl-key-file)");
  }
  if (!config.sslCertFile.empty()) {
    tls.emplace(ssl::context::tls_server);
    tls->set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 |
                     ssl::context::no_sslv3 | ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1 |
                     ssl::context::single_dh_use);
    try {
      tls->use_certificate_chain_file(config.sslCertFile);
    } catch (const std::exception& ex) {
      throw std::runtime_error("cannot use the TLS certificate '" + config.sslCertFile +
                               "': " + ex.what());
    }
    try {
      tls->use_private_key_file(config.sslKeyFile, ssl::context::pem);
    } catch (const std::exception& ex) {
      throw std::runtime_error("cannot use the TLS key '" + config.sslKeyFile + "': " + ex.what());
    }
  }
}

bool HttpServer::Impl::authorized(const Request& req) const {
  if (config.apiKey.empty()) return true;
  const auto it = req.find(http::field::authorization);
  if (it == req.end()) return false;
  std::string_view value(it->value().data(), it->value().size());
  constexpr std::string_view kBearer = "Bearer ";
  if (value.size() < kBearer.size() ||
      !beast::iequals(beast::string_view(value.data(), kBearer.size()),
                      beast::string_view(kBearer.data(), kBearer.size()))) {
    return false;
  }
  // Digests of equal length compared in constant time: neither the key's bytes nor its length
  // leak through timing.
  const Digest given = sha256(value.substr(kBearer.size()));
  return CRYPTO_memcmp(given.data(), apiKeyDigest.data(), given.size()) == 0;
}

bool HttpServer::Impl::track(const std::shared_ptr<engine::RequestStream>& s,
                             std::function<void()> notify) {
  std::lock_guard lock(mu);
  if (stopping) return false;
  s->setNotify(std::move(notify));
  active.insert(s);
  ++inFlight;
  return true;
}

void HttpServer::Impl::untrack(const std::shared_ptr<engine::RequestStream>& s) {
  s->setNotify({});
  {
    std::lock_guard lock(mu);
    if (active.erase(s) == 0) return;
    --inFlight;
  }
  cv.notify_all();
}

HttpServer::Impl::Routed HttpServer::Impl::route(const Request& req) {
  ++httpRequests;
  const std::string path = pathOf({req.target().data(), req.target().size()});
  const http::verb method = req.method();

  const bool open = path == "/health" || (path == "/metrics" && !config.metricsRequireKey);
  if (!open && !authorized(req)) {
    Response res = errorResponse(401,
                                 req.find(http::field::authorization) == req.end()
                                     ? "this server needs an API key: send the header "
                                       "'Authorization: Bearer <key>'"
                                     : "incorrect API key provided",
                                 "invalid_request_error", "", "invalid_api_key");
    res.set(http::field::www_authenticate, "Bearer");
    return {std::move(res), nullptr};
  }

  const auto it = routes.find(path);
  const bool isModel = it == routes.end() && path.rfind("/v1/models/", 0) == 0 && path.size() > 11;
  if (it == routes.end() && !isModel) {
    std::string known;
    for (const auto& [p, r] : routes) {
      known += (known.empty() ? "" : ", ") + std::string(http::to_string(r.method)) + " " + p;
    }
    return {errorResponse(404,
                          "no route for " + std::string(req.method_string()) + " " +
                              excerpt(path) + " (endpoints: " + known + ", GET /v1/models/{id})",
                          "invalid_request_error", "", "not_found"),
            nullptr};
  }
  const http::verb allowed = isModel ? http::verb::get : it->second.method;
  if (method != allowed) {
    const std::string allow(http::to_string(allowed));
    Response res = errorResponse(405,
                                 "method " + std::string(req.method_string()) +
                                     " is not allowed on " + excerpt(path) + " (allowed: " +
                                     allow + ")",
                                 "invalid_request_error", "", "method_not_allowed");
    res.set(http::field::allow, allow);
    return {std::move(res), nullptr};
  }
  try {
    if (isModel) {
      const std::string id = path.substr(11);
      if (id != config.servedModelName) {
        return {errorResponse(404, "model '" + excerpt(id) + "' does not exist",
                              "invalid_request_error", "model", "model_not_found"),
                nullptr};
      }
      return {jsonResponse(200, modelJson()), nullptr};
    }
    return it->second.handler(*this, req);
  } catch (const ApiException& e) {
    const ApiError& err = e.error();
    return {errorResponse(err.status, err.message, err.type, err.param, err.code), nullptr};
  }
}

json HttpServer::Impl::modelJson() const {
  return json{{"id", config.servedModelName},
              {"object", "model"},
              {"created", startedUnix},
              {"owned_by", "cortexstream"},
              {"max_model_len", engine.maxContextTokens()}};
}

HttpServer::Impl::Routed HttpServer::Impl::models(const Request&) {
  return {jsonResponse(200, {{"object", "list"}, {"data", json::array({modelJson()})}}), nullptr};
}

HttpServer::Impl::Routed HttpServer::Impl::health(const Request&) {
  return {draining ? jsonResponse(503, {{"status", "shutting_down"}})
                   : jsonResponse(200, {{"status", "ok"}}),
          nullptr};
}

HttpServer::Impl::Routed HttpServer::Impl::metrics(const Request&) {
  ServerCounters c;
  c.httpRequests = httpRequests.load();
  c.httpErrors = httpErrors.load();
  c.rejectedQueueFull = rejectedQueueFull.load();
  c.openConnections = connections.load();
  c.rejectedConnections = rejectedConnections.load();
  Response res{http::status::ok, 11};
  res.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
  res.body() = renderPrometheus(engine.stats(), c, config.servedModelName);
  return {std::move(res), nullptr};
}

namespace {

json parseJsonBody(const Request& req) {
  try {
    return json::parse(req.body());
  } catch (const json::exception& e) {
    // Syntax errors and numbers out of range (1e400) alike. The parser's message quotes the
    // offending token whole, which may be megabytes long: only an excerpt goes back.
    throwInvalid("", "the request body is not valid JSON: " + excerpt(e.what()), "invalid_json");
  }
}

}  // namespace

ParsedRequest HttpServer::Impl::parse(const Request& req, bool chat) const {
  const json body = parseJsonBody(req);
  return chat ? parseChatRequest(body) : parseCompletionRequest(body);
}

std::vector<int32_t> HttpServer::Impl::prompt(const ParsedRequest& p, bool chat,
                                              std::string* echoText) const {
  if (chat) {
    if (!config.chatTemplate) throwInvalid("messages", config.chatTemplateError);
    // Control-token text typed inside a message stays text (no forged turns). A template that
    // refuses the conversation (raise_exception, a role it does not know) is the request's fault.
    try {
      if (p.chatTemplateKwargs.empty()) {
        return model::encodeChat(tokenizer, *config.chatTemplate, p.messages, true);
      }
      nlohmann::ordered_json messages = nlohmann::ordered_json::array();
      for (const model::ChatMessage& m : p.messages) {
        messages.push_back({{"role", m.role}, {"content", m.content}});
      }
      return model::encodeChat(tokenizer, *config.chatTemplate, messages, true, nullptr,
                               &p.chatTemplateKwargs);
    } catch (const model::jinja::TemplateError& e) {
      throwInvalid("messages", std::string("the chat template refused these messages: ") + e.what());
    }
  }
  if (p.promptText) {
    if (echoText) *echoText = *p.promptText;
    return tokenizer.encode(*p.promptText, true, true);
  }
  if (echoText && p.echo) *echoText = tokenizer.decode(p.promptTokenIds);
  return p.promptTokenIds;
}

// The prompt's token ids as the generation endpoint would compute them (vLLM's render; routers
// match them against the prefixes each server holds).
HttpServer::Impl::Routed HttpServer::Impl::render(const Request& req, bool chat) {
  const ParsedRequest p = parse(req, chat);
  return {jsonResponse(200, {{"model", config.servedModelName},
                             {"token_ids", prompt(p, chat, nullptr)}}),
          nullptr};
}

// vLLM's /tokenize: {"prompt": text} or {"messages": [...]}, "add_special_tokens" (default: true
// for a prompt, the template's own for messages).
HttpServer::Impl::Routed HttpServer::Impl::tokenize(const Request& req) {
  const json body = parseJsonBody(req);
  if (!body.is_object()) throwInvalid("", "the request body must be a JSON object");
  std::vector<int32_t> tokens;
  if (body.contains("messages")) {
    tokens = prompt(parseChatRequest(body), true, nullptr);
  } else {
    const ParsedRequest p = parseCompletionRequest(body);
    bool addSpecial = true;
    if (const auto it = body.find("add_special_tokens"); it != body.end() && !it->is_null()) {
      if (!it->is_boolean()) throwInvalid("add_special_tokens", "'add_special_tokens' must be a boolean");
      addSpecial = it->get<bool>();
    }
    tokens = p.promptText ? tokenizer.encode(*p.promptText, addSpecial, true) : p.promptTokenIds;
  }
  return {jsonResponse(200, {{"count", tokens.size()},
                             {"max_model_len", engine.maxContextTokens()},
                             {"tokens", tokens}}),
          nullptr};
}

HttpServer::Impl::Routed HttpServer::Impl::detokenize(const Request& req) {
  const json body = parseJsonBody(req);
  const auto it = body.is_object() ? body.find("tokens") : body.end();
  if (it == body.end() || !it->is_array()) {
    throwInvalid("tokens", "'tokens' (an array of token ids) is required");
  }
  std::vector<int32_t> ids;
  for (const json& v : *it) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
        v.get<int64_t>() >= tokenizer.vocabSize()) {
      throwInvalid("tokens", "token ids must be integers in [0, " +
                                 std::to_string(tokenizer.vocabSize()) + "), got " +
                                 excerpt(v.dump()));
    }
    ids.push_back(v.get<int32_t>());
  }
  return {jsonResponse(200, {{"prompt", tokenizer.decode(ids)}}), nullptr};
}

// What routers ask a worker about itself: vLLM's /get_server_info (model_id names the cache
// identity, kv_block_size the granularity of its KV events) and SGLang's /server_info
// (served_model_name names the model in the router's /v1/models).
HttpServer::Impl::Routed HttpServer::Impl::serverInfo(const Request&) {
  const engine::EngineConfig& ec = engine.config();
  return {jsonResponse(200, {{"model_id", config.servedModelName},
                             {"served_model_name", config.servedModelName},
                             {"model_path", config.modelPath},
                             {"tokenizer_path", config.modelPath},
                             {"kv_block_size", engine.stats().blockSizeTokens},
                             {"max_model_len", engine.maxContextTokens()},
                             {"max_num_seqs", ec.maxNumSeqs},
                             {"max_batched_tokens", ec.maxBatchedTokens},
                             {"prefix_caching", ec.prefixCaching},
                             {"kv_events", !config.kvEventsEndpoint.empty()},
                             {"version", kVersion}}),
          nullptr};
}

HttpServer::Impl::Routed HttpServer::Impl::modelInfo(const Request&) {
  return {jsonResponse(200, {{"model_path", config.modelPath},
                             {"tokenizer_path", config.modelPath},
                             {"served_model_name", config.servedModelName},
                             {"is_generation", true},
                             {"max_model_len", engine.maxContextTokens()}}),
          nullptr};
}

// vllm-router's shape: "load" is the requests this server holds (running and waiting).
HttpServer::Impl::Routed HttpServer::Impl::load(const Request&) {
  const engine::EngineStats st = engine.stats();
  const double usage = st.kv.totalBlocks > 0 ? static_cast<double>(st.kv.usedBlocks) /
                                                   static_cast<double>(st.kv.totalBlocks)
                                             : 0.0;
  return {jsonResponse(200, {{"load", st.running + st.waiting},
                             {"num_requests_running", st.running},
                             {"num_requests_waiting", st.waiting},
                             {"kv_cache_usage_perc", usage}}),
          nullptr};
}

namespace {

// A bound ZeroMQ endpoint as a router should connect to it: a wildcard host becomes "*", which
// the router replaces with the host it reaches this server at.
std::string routerEndpoint(const std::string& bound) {
  for (const char* any : {"tcp://0.0.0.0:", "tcp://[::]:", "tcp://*:"}) {
    const std::string prefix = any;
    if (bound.rfind(prefix, 0) == 0) return "tcp://*:" + bound.substr(prefix.size());
  }
  return bound;
}

}  // namespace

// Where KV-aware routers subscribe to this server's KV events: one source (data-parallel rank 0)
// in vllm-router's shape; {} when the server publishes none.
HttpServer::Impl::Routed HttpServer::Impl::kvEventSources(const Request&) {
  json sources = json::object();
  if (!config.kvEventsEndpoint.empty()) {
    json source = {{"endpoint", routerEndpoint(config.kvEventsEndpoint)},
                   {"topic", ""},
                   {"publisher", "zmq"},
                   {"encoding", "msgpack"},
                   {"schema_version", 1},
                   {"enable_kv_cache_events", true},
                   {"hwm", 100000},
                   {"buffer_steps", 10000}};
    if (!config.kvEventsReplayEndpoint.empty()) {
      source["replay_endpoint"] = routerEndpoint(config.kvEventsReplayEndpoint);
    }
    sources["0"] = std::move(source);
  }
  return {jsonResponse(200, sources), nullptr};
}

// Drops every cached prefix block; blocks of running requests are never touched.
// Grows or shrinks the KV pool while serving: {"bytes": N} (a number of bytes, or a size such as
// "512MiB").
HttpServer::Impl::Routed HttpServer::Impl::resizeKvCache(const Request& req) {
  const json body = parseJsonBody(req);
  if (!body.is_object() || !body.contains("bytes")) {
    throwInvalid("bytes", "the body must be a JSON object with 'bytes': the new KV cache size");
  }
  const json& b = body["bytes"];
  uint64_t bytes = 0;
  if (b.is_number_unsigned()) {
    bytes = b.get<uint64_t>();
  } else if (b.is_string()) {
    try {
      bytes = parseByteSize(b.get<std::string>());
    } catch (const std::invalid_argument& e) {
      throwInvalid("bytes", e.what());
    }
  } else {
    throwInvalid("bytes", "'bytes' must be a non-negative integer or a size such as \"512MiB\"");
  }
  try {
    const engine::KvResize r = engine.resizeKvCache(bytes);
    return {jsonResponse(200, {{"bytes", r.bytes},
                               {"blocks", r.blocks},
                               {"max_bytes", r.maxBytes},
                               {"moved_blocks", r.movedBlocks},
                               {"preempted_requests", r.preempted}}),
            nullptr};
  } catch (const engine::EngineError& e) {
    if (e.kind() == engine::EngineError::Kind::ShuttingDown) {
      return {errorResponse(503, e.what(), "server_error", "", "shutting_down"), nullptr};
    }
    throwInvalid("bytes", e.what());
  }
}

HttpServer::Impl::Routed HttpServer::Impl::flushCache(const Request&) {
  const int32_t dropped = engine.resetPrefixCache();
  return {jsonResponse(200, {{"status", "ok"}, {"blocks_dropped", dropped}}), nullptr};
}

std::string HttpServer::Impl::sessionPath(const json& body) const {
  if (config.kvSessionDir.empty()) {
    throwInvalid("", "KV sessions are off: start the server with --kv-session-dir DIR");
  }
  const auto it = body.find("filename");
  if (it == body.end() || !it->is_string()) throwInvalid("filename", "'filename' (a string) is required");
  const std::string name = it->get<std::string>();
  const bool plain = !name.empty() && name.size() <= 255 && name[0] != '.' &&
                     std::all_of(name.begin(), name.end(), [](char c) {
                       return std::isalnum(static_cast<unsigned char>(c)) || c == '.' ||
                              c == '_' || c == '-';
                     });
  if (!plain) {
    throwInvalid("filename", "'filename' must be a plain file name (letters, digits, '.', '_', "
                             "'-'; not starting with '.'), got '" + excerpt(name) + "'");
  }
  return config.kvSessionDir + "/" + name;
}

// llama-server's slot save, for the prefix cache: the cached K/V of a prompt's whole blocks.
HttpServer::Impl::Routed HttpServer::Impl::saveSession(const Request& req) {
  const json body = parseJsonBody(req);
  if (!body.is_object()) throwInvalid("", "the request body must be a JSON object");
  const std::string path = sessionPath(body);
  const std::vector<int32_t> tokens = body.contains("messages")
                                          ? prompt(parseChatRequest(body), true, nullptr)
                                          : prompt(parseCompletionRequest(body), false, nullptr);
  try {
    const int32_t saved = engine.saveSession(tokens, "", path);
    return {jsonResponse(200, {{"filename", body["filename"]},
                               {"n_prompt_tokens", tokens.size()},
                               {"n_saved", saved},
                               {"n_written", std::filesystem::file_size(path)}}),
            nullptr};
  } catch (const engine::EngineError& e) {
    throwInvalid("", e.what());
  }
}

HttpServer::Impl::Routed HttpServer::Impl::restoreSession(const Request& req) {
  const json body = parseJsonBody(req);
  if (!body.is_object()) throwInvalid("", "the request body must be a JSON object");
  const std::string path = sessionPath(body);
  if (!std::filesystem::is_regular_file(path)) {
    return {errorResponse(404, "no KV session named '" + excerpt(body["filename"].get<std::string>()) + "'",
                          "invalid_request_error", "filename"),
            nullptr};
  }
  try {
    const kv::KVCache::LoadedSession s = engine.loadSession(path);
    return {jsonResponse(200, {{"filename", body["filename"]},
                               {"n_restored", s.tokens.size()},
                               {"n_read", std::filesystem::file_size(path)},
                               {"blocks_loaded", s.blocksLoaded}}),
            nullptr};
  } catch (const engine::EngineError& e) {
    throwInvalid("filename", e.what());
  }
}

HttpServer::Impl::Routed HttpServer::Impl::generate(const Request& req, bool chat) {
  GenerationInfo info;
  engine::RequestParams params;
  {
    const ParsedRequest p = parse(req, chat);
    info.chat = chat;
    info.stream = p.stream;
    info.id = newId(chat ? "chatcmpl-" : "cmpl-");
    info.created = unixNow();
    info.model = config.servedModelName;
    info.topLogprobs = p.topLogprobs;
    info.echo = p.echo;
    info.includeUsage = p.includeUsage;
    info.n = p.n;
    params.n = p.n;
    params.bestOf = p.bestOf;
    std::vector<int32_t> prompt = this->prompt(p, chat, &info.echoText);
    // Defaults: 16 for completions (OpenAI's legacy default), the rest of the context for chat
    // (a windowed request: one context's worth). The engine judges whether the request fits
    // (its TooLong error says by how much).
    const int64_t room =
        p.kvWindow > 0 ? engine.maxContextTokens()
                       : std::max<int64_t>(1, engine.maxContextTokens() -
                                                  static_cast<int64_t>(prompt.size()));
    const int64_t maxTokens =
        p.maxTokens ? *p.maxTokens : chat ? room : std::min<int64_t>(16, room);
    params.sampling = p.sampling;
    if (!p.seedGiven) params.sampling.seed = randomU64();
    params.maxTokens = static_cast<int32_t>(maxTokens);
    params.stop = p.stop;
    params.ignoreEos = p.ignoreEos;
    params.kvWindow = p.kvWindow;
    params.kvSinks = p.kvSinks;
    params.skipSpecialTokens = p.skipSpecialTokens;
    params.topLogprobs = p.topLogprobs;
    params.promptLogprobs = !chat && p.echo && p.topLogprobs >= 0;
    if (params.promptLogprobs) info.promptTokens = prompt;
    params.promptTokens = std::move(prompt);
  }

  try {
    auto rs = engine.submit(std::move(params));
    return {{}, std::make_unique<Generation>(std::move(info), std::move(rs), tokenizer)};
  } catch (const engine::EngineError& e) {
    using Kind = engine::EngineError::Kind;
    // The engine names the request field; a chat request's prompt is its messages.
    const std::string param = e.param() == "prompt" && chat ? "messages" : e.param();
    switch (e.kind()) {
      case Kind::InvalidRequest:
        return {errorResponse(400, e.what(), "invalid_request_error", param), nullptr};
      case Kind::TooLong:
        return {errorResponse(400, e.what(), "invalid_request_error",
                              param.empty() ? (chat ? "messages" : "prompt") : param,
                              "context_length_exceeded"),
                nullptr};
      case Kind::QueueFull: {
        ++rejectedQueueFull;
        Response res = errorResponse(503, e.what(), "server_error", "", "queue_full");
        res.set(http::field::retry_after, "1");
        return {std::move(res), nullptr};
      }
      case Kind::ShuttingDown:
        break;
    }
    return {errorResponse(503, e.what(), "server_error", "", "shutting_down"), nullptr};
  }
}

// ---------------------------------------------------------------------------------------------

namespace {

// One client connection, plain (beast::tcp_stream) or TLS (beast::ssl_stream over it): a state
// machine on its own strand.
//
//   read a request (idle wait, then head and body within the read timeout)
//     -> answer at once, or start a generation: the engine posts each new event to the strand,
//        which writes it (streamed) or keeps it (plain) while a read of the socket watches for
//        the client going away (and keeps bytes of a pipelined next request)
//     -> the response is written -> the next request (keep-alive), or a lingering close.
template <class Stream>
class Connection : public std::enable_shared_from_this<Connection<Stream>> {
 public:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;

  Connection(HttpServer::Impl& server, Stream stream, bool refused)
      : srv_(server), stream_(std::move(stream)), refused_(refused),
        readTimer_(stream_.get_executor()), probeTimer_(stream_.get_executor()) {
    ++srv_.connections;
  }
  ~Connection() {
    // Only pending handlers keep a connection alive, so none is left here: release the
    // generation without touching the socket.
    if (gen_ && !gen_->finished()) gen_->stream().cancel();
    untrack();
    --srv_.connections;
  }

  void start() {
    if constexpr (kTls) {
      lowest().expires_after(srv_.config.readTimeout);
      stream_.async_handshake(ssl::stream_base::server,
                              [self = this->shared_from_this()](beast::error_code ec) {
                                if (ec) return self->closeNow();
                                self->begin();
                              });
    } else {
      begin();
    }
  }

 private:
  beast::tcp_stream& lowest() { return beast::get_lowest_layer(stream_); }

  void begin() {
    if (refused_) {
      Response res = errorResponse(
          503,
          "too many connections are open (" + std::to_string(srv_.config.maxConnections) +
              "): try again later",
          "server_error", "", "too_many_connections");
      res.set(http::field::retry_after, "1");
      respond(std::move(res), true);
      return;
    }
    readRequest();
  }

  // ---- reading a request

  void readRequest() {
    if (closed_) return;
    if (watching_) {
      // The watch read of the last response is still being cancelled; it calls back here.
      readAfterWatch_ = true;
      return;
    }
    parser_.emplace();
    parser_->header_limit(static_cast<uint32_t>(srv_.config.maxHeaderBytes));
    parser_->body_limit(srv_.config.maxBodyBytes);
    if (buffer_.size() > 0) return readHead();
    if (peerEof_) return lingerClose();
    // Idle: wait for the first byte of the next request.
    lowest().expires_after(requests_ == 0 ? srv_.config.readTimeout
                                          : srv_.config.keepAliveTimeout);
    stream_.async_read_some(buffer_.prepare(4096), [self = this->shared_from_this()](
                                                       beast::error_code ec, size_t n) {
      self->buffer_.commit(n);
      if (ec || n == 0) return self->closeNow();  // idle timeout, or the client closed: no answer
      self->readHead();
    });
  }

  // The head and body must arrive within the read timeout of the request's first byte. The
  // deadline is our own timer rather than the stream's (which closes the socket when it fires),
  // so that the client can still be told 408.
  void readHead() {
    lowest().expires_never();
    timedOut_ = false;
    readTimer_.expires_after(srv_.config.readTimeout);
    readTimer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
      if (ec || self->closed_ || !self->parser_) return;  // done reading meanwhile
      self->timedOut_ = true;
      self->lowest().socket().cancel(ec);
    });
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = this->shared_from_this()](beast::error_code ec, size_t) {
                              if (ec) return self->onReadError(ec);
                              self->onHead();
                            });
  }

  void onHead() {
    const Request& req = parser_->get();
    // (A Content-Length over the limit already failed the head with body_limit: 413.)
    const auto expect = req.find(http::field::expect);
    if (expect != req.end() && beast::iequals(expect->value(), "100-continue")) {
      if (req.version() >= 11) send("HTTP/1.1 100 Continue\r\n\r\n");
    }
    if (parser_->is_done()) return onRequest();
    http::async_read(stream_, buffer_, *parser_,
                     [self = this->shared_from_this()](beast::error_code ec, size_t) {
                       if (ec) return self->onReadError(ec);
                       self->onRequest();
                     });
  }

  void onReadError(beast::error_code ec) {
    readTimer_.cancel();
    if (timedOut_) {
      return respond(errorResponse(408,
                                   "the request did not arrive within " +
                                       seconds(srv_.config.readTimeout) +
                                       " s of its first byte",
                                   "invalid_request_error", "", "request_timeout"),
                     true);
    }
    if (ec == http::error::end_of_stream || ec == net::error::eof ||
        ec == net::error::connection_reset || ec == net::error::operation_aborted ||
        ec == ssl::error::stream_truncated || ec == http::error::partial_message) {
      return closeNow();  // the client left mid-request: nobody to answer
    }
    if (ec == http::error::body_limit) {
      return respond(errorResponse(413,
                                   "request body is larger than " +
                                       std::to_string(srv_.config.maxBodyBytes) + " bytes",
                                   "invalid_request_error", "", "payload_too_large"),
                     true);
    }
    if (ec == http::error::header_limit) {
      return respond(errorResponse(431,
                                   "request head is larger than " +
                                       std::to_string(srv_.config.maxHeaderBytes) + " bytes",
                                   "invalid_request_error", "", "header_too_large"),
                     true);
    }
    respond(errorResponse(400, "malformed HTTP request: " + ec.message(), "invalid_request_error",
                          "", "bad_request"),
            true);
  }

  void onRequest() {
    readTimer_.cancel();
    Request req = parser_->release();
    parser_.reset();
    ++requests_;
    version_ = req.version();
    HttpServer::Impl::Routed r;
    try {
      r = srv_.route(req);
    } catch (const std::exception& e) {
      r.response = errorResponse(500, std::string("internal error: ") + e.what(), "server_error");
    }
    if (!r.generation) return respond(std::move(r.response), !req.keep_alive());
    closeAfter_ = !req.keep_alive();
    startGeneration(std::move(r.generation));
  }

  // ---- answering

  // Queues a whole response; after it the connection reads the next request or closes.
  void respond(Response res, bool close) {
    if (res.result_int() >= 400) ++srv_.httpErrors;
    closeAfter_ = closeAfter_ || close;
    send(serialize(res, version_, !closeAfter_));
    responseDone_ = true;
    flush();
  }

  void send(std::string bytes) {
    pending_ += bytes;
    flush();
  }

  void flush() {
    if (writing_ || closed_) return;
    if (pending_.empty()) {
      if (responseDone_) {
        responseDone_ = false;
        untrack();
        closeAfter_ ? lingerClose() : readRequest();
      }
      return;
    }
    writing_ = true;
    outgoing_.swap(pending_);
    pending_.clear();
    lowest().expires_after(kWriteTimeout);
    net::async_write(stream_, net::buffer(outgoing_),
                     [self = this->shared_from_this()](beast::error_code ec, size_t) {
                       self->writing_ = false;
                       self->outgoing_.clear();
                       if (self->closed_) return;
                       if (ec) return self->onDisconnect();
                       self->flush();
                     });
  }

  // ---- generating

  void startGeneration(std::unique_ptr<Generation> gen) {
    gen_ = std::move(gen);
    auto flag = notifyPending_;
    auto notify = [weak = this->weak_from_this(), flag, ex = stream_.get_executor()] {
      if (flag->exchange(true)) return;  // a drain is already on its way
      net::post(ex, [weak, flag] {
        flag->store(false);
        if (auto self = weak.lock()) self->onEvents();
      });
    };
    if (!srv_.track(gen_->streamPtr(), std::move(notify))) {
      // Stopping: nothing will be announced any more.
      gen_->stream().cancel();
      gen_.reset();
      return respond(errorResponse(503, "the server is shutting down", "server_error", "",
                                   "shutting_down"),
                     true);
    }
    tracked_ = gen_->streamPtr();
    if (gen_->info().stream) {
      chunked_ = version_ >= 11;
      if (!chunked_) closeAfter_ = true;  // HTTP/1.0: the body ends with the connection
      std::string head = "HTTP/1.1 200 OK\r\nServer: cortexstream\r\n"
                         "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                         "X-Accel-Buffering: no\r\n";
      if (version_ < 11) head[7] = '0';
      head += chunked_ ? "Transfer-Encoding: chunked\r\n" : "";
      head += closeAfter_ ? "Connection: close\r\n\r\n" : "\r\n";
      send(std::move(head));
    }
    watch();
    onEvents();  // events pushed before the callback was set
  }

  void onEvents() {
    if (!gen_ || closed_) return;
    const std::string out = gen_->drain();
    if (gen_->info().stream) {
      if (!out.empty()) send(chunked_ ? chunk(out) : out);
      if (gen_->finished()) {
        endGeneration();
        if (chunked_) pending_ += "0\r\n\r\n";
        responseDone_ = true;
        flush();
      }
      return;
    }
    if (gen_->finished()) {
      auto [status, body] = gen_->plainBody();
      endGeneration();
      respond(jsonResponse(status, body), false);
    }
  }

  void endGeneration() {
    if (!gen_) return;
    probeTimer_.cancel();
    if (!gen_->finished()) gen_->stream().cancel();
    gen_->stream().setNotify({});
    gen_.reset();
    if (watching_) {
      beast::error_code ec;
      lowest().socket().cancel(ec);  // ends the watch read (it resumes reading if asked to)
    }
  }

  // While a response is generated: read the socket, keeping what arrives (a pipelined next
  // request) and noticing when the client goes away.
  void watch() {
    if (watching_ || peerEof_ || closed_ || buffer_.size() >= kMaxReadAhead) return;
    watching_ = true;
    lowest().expires_never();
    stream_.async_read_some(buffer_.prepare(16384), [self = this->shared_from_this()](
                                                        beast::error_code ec, size_t n) {
      self->watching_ = false;
      self->buffer_.commit(n);
      if (self->closed_) return;
      if (!ec) {
        if (self->gen_) return self->watch();
      } else if (ec == net::error::eof || ec == ssl::error::stream_truncated) {
        self->peerEof_ = true;
        if (self->gen_) self->probePeer();
      } else if (ec != net::error::operation_aborted) {
        return self->onDisconnect();  // reset
      }
      if (self->readAfterWatch_) {
        self->readAfterWatch_ = false;
        self->readRequest();
      } else if (self->lingerAfterWatch_) {
        self->lingerAfterWatch_ = false;
        self->lingerClose();
      }
    });
  }

  // The client shut down its sending side. That is a valid HTTP/1.1 client still waiting for its
  // response (a half-close) or one that went away: only a write tells them apart, as the peer of
  // a closed socket answers data with a reset. So write something every client ignores (an SSE
  // comment in a stream; an interim 100 Continue before a plain response) and look for the reset.
  void probePeer() {
    if (gen_->info().stream) {
      send(chunked_ ? chunk(":\n\n") : std::string(":\n\n"));
    } else if (version_ >= 11) {
      send("HTTP/1.1 100 Continue\r\n\r\n");
    }
    checkPeer(std::chrono::milliseconds(20));
  }

  void checkPeer(std::chrono::milliseconds after) {
    probeTimer_.expires_after(after);
    probeTimer_.async_wait([self = this->shared_from_this()](beast::error_code ec) {
      if (ec || self->closed_ || !self->gen_) return;
      if (tcpClosed(self->lowest().socket().native_handle())) return self->onDisconnect();
      self->checkPeer(std::chrono::milliseconds(200));
    });
  }

  void untrack() {
    if (tracked_) srv_.untrack(tracked_);
    tracked_.reset();
  }

  // ---- closing

  // The client went away: cancel what it asked for and drop the connection.
  void onDisconnect() {
    endGeneration();
    closeNow();
  }

  void closeNow() {
    if (closed_) return;
    closed_ = true;
    readTimer_.cancel();
    probeTimer_.cancel();
    endGeneration();
    untrack();
    beast::error_code ec;
    lowest().socket().shutdown(tcp::socket::shutdown_both, ec);
    lowest().close();
  }

  // After a last response: stop sending, then read (and drop) whatever the client is still
  // sending for a moment, so that closing does not reset the connection before the client has
  // read the response (a client still uploading a refused body would lose it).
  void lingerClose() {
    if (closed_) return;
    if (watching_) {
      // The watch read of the last response is still being cancelled (a second read on the
      // stream must not start before it ends); it calls back here.
      lingerAfterWatch_ = true;
      return;
    }
    beast::error_code ec;
    lowest().socket().shutdown(tcp::socket::shutdown_send, ec);
    if (ec || peerEof_) return closeNow();
    lowest().expires_after(kLingerTimeout);
    drainUntilClosed();
  }

  void drainUntilClosed() {
    lowest().async_read_some(net::buffer(scratch_), [self = this->shared_from_this()](
                                                        beast::error_code ec, size_t) {
      if (ec) return self->closeNow();
      self->drainUntilClosed();
    });
  }

  HttpServer::Impl& srv_;
  Stream stream_;
  const bool refused_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  net::steady_timer readTimer_;
  bool timedOut_ = false;
  unsigned version_ = 11;
  uint64_t requests_ = 0;

  std::string pending_, outgoing_;
  bool writing_ = false;
  bool responseDone_ = false;  // the response's last bytes are queued
  bool closeAfter_ = false;    // close once the response is written
  bool closed_ = false;

  std::unique_ptr<Generation> gen_;
  // The generation's stream while its response is being answered: counted in flight from its
  // start until its last byte is written (or the connection is closed).
  std::shared_ptr<engine::RequestStream> tracked_;
  bool chunked_ = true;
  std::shared_ptr<std::atomic<bool>> notifyPending_ = std::make_shared<std::atomic<bool>>(false);
  bool watching_ = false;
  bool readAfterWatch_ = false;
  bool lingerAfterWatch_ = false;
  bool peerEof_ = false;  // the client shut down its sending side
  net::steady_timer probeTimer_;
  std::array<char, 16384> scratch_{};
};

}  // namespace

template <class Stream>
void HttpServer::Impl::startConnection(tcp::socket socket) {
  const bool refused = connections.load() >= config.maxConnections;
  if (refused) ++rejectedConnections;
  beast::error_code ec;
  socket.set_option(tcp::no_delay(true), ec);
  if constexpr (std::is_same_v<Stream, beast::tcp_stream>) {
    std::make_shared<Connection<Stream>>(*this, Stream(std::move(socket)), refused)->start();
  } else {
    std::make_shared<Connection<Stream>>(*this, Stream(beast::tcp_stream(std::move(socket)), *tls),
                                         refused)
        ->start();
  }
}

void HttpServer::Impl::accept() {
  acceptor.async_accept(net::make_strand(ioc), [this](beast::error_code ec, tcp::socket socket) {
    if (ec == net::error::operation_aborted || !acceptor.is_open()) return;
    if (ec) {
      // Out of file descriptors (or a connection that died in the backlog): try again soon
      // rather than spinning.
      std::cerr << "accept: " << ec.message() << "\n";
      acceptRetry.expires_after(std::chrono::milliseconds(100));
      acceptRetry.async_wait([this](beast::error_code) { accept(); });
      return;
    }
    if (tls) {
      startConnection<beast::ssl_stream<beast::tcp_stream>>(std::move(socket));
    } else {
      startConnection<beast::tcp_stream>(std::move(socket));
    }
    accept();
  });
}

// ---------------------------------------------------------------------------------------------

HttpServer::HttpServer(engine::Engine& engine, const model::Tokenizer& tokenizer,
                       ServerConfig config)
    : impl_(std::make_unique<Impl>(engine, tokenizer, std::move(config))) {}

HttpServer::~HttpServer() {
  // Nothing may announce events into the event loop while it is destroyed.
  std::lock_guard lock(impl_->mu);
  impl_->stopping = true;
  for (const auto& s : impl_->active) s->setNotify({});
}

int HttpServer::port() const { return impl_->port; }
int64_t HttpServer::inFlight() const { return impl_->inFlight.load(); }

void HttpServer::bind() {
  Impl& m = *impl_;
  if (m.config.port < 0 || m.config.port > 65535) {
    throw std::runtime_error("invalid port " + std::to_string(m.config.port));
  }
  const std::string where = m.config.host + ":" + std::to_string(m.config.port);
  beast::error_code ec;
  const auto address = net::ip::make_address(m.config.host, ec);
  if (ec) throw std::runtime_error("cannot listen on " + where + ": not an IP address");
  const tcp::endpoint endpoint(address, static_cast<uint16_t>(m.config.port));
  m.acceptor.open(endpoint.protocol(), ec);
  // SO_REUSEADDR only (no SO_REUSEPORT): a restarted server binds at once, but a second server
  // on a port in use fails instead of silently sharing it.
  if (!ec) m.acceptor.set_option(tcp::acceptor::reuse_address(true), ec);
  if (!ec) m.acceptor.bind(endpoint, ec);
  if (!ec) m.acceptor.listen(net::socket_base::max_listen_connections, ec);
  if (ec) {
    throw std::runtime_error("cannot listen on " + where + ": " + ec.message() +
                             (ec == net::error::address_in_use
                                  ? " (another process is listening there)"
                                  : ""));
  }
  m.port = m.acceptor.local_endpoint().port();
}

void HttpServer::run() {
  Impl& m = *impl_;
  m.accept();
  // A handler that throws loses its connection (closed as it is destroyed), never the server.
  auto loop = [&m] {
    for (;;) {
      try {
        m.ioc.run();
        return;
      } catch (const std::exception& e) {
        std::cerr << "http: a connection failed: " << e.what() << "\n";
      }
    }
  };
  std::vector<std::thread> threads;
  for (int i = 1; i < std::max(1, m.config.ioThreads); ++i) threads.emplace_back(loop);
  loop();
  for (std::thread& t : threads) t.join();
  {
    std::lock_guard lock(m.mu);
    m.runDone = true;
  }
  m.cv.notify_all();
}

void HttpServer::shutdown(std::chrono::milliseconds grace,
                          const std::function<bool()>& interrupted) {
  Impl& m = *impl_;
  // The listener stays open while requests finish, so new ones get a clear 503 and /health says
  // shutting_down (routers stop sending here).
  m.draining = true;
  m.engine.drain();
  const auto deadline = std::chrono::steady_clock::now() + grace;
  std::unique_lock lock(m.mu);
  while (m.inFlight.load() > 0 && std::chrono::steady_clock::now() < deadline &&
         !(interrupted && interrupted())) {
    m.cv.wait_for(lock, std::chrono::milliseconds(100));
  }
  if (m.inFlight.load() > 0) {
    std::cerr << "shutdown: cancelling " << m.inFlight.load() << " unfinished request(s)\n";
  }
  for (const auto& s : m.active) s->cancel();
  // Cancelled requests end within one engine step; give their connections a moment to write
  // that they were cut.
  m.cv.wait_for(lock, std::chrono::seconds(2), [&m] { return m.inFlight.load() == 0; });
  m.stopping = true;
  for (const auto& s : m.active) s->setNotify({});
  lock.unlock();
  m.ioc.stop();
  lock.lock();
  m.cv.wait(lock, [&m] { return m.runDone; });
}

}  // namespace cortex::server
