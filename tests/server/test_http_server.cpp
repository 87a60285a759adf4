// The HTTP front end on the default model, over real loopback sockets, in-process so that the
// sanitizers see every thread: the I/O threads, the engine's and the clients'. Concurrent plain
// and streamed requests, clients that vanish mid-stream, pipelining, then a shutdown that cuts a
// stream. Label "concurrency": TSan runs it too. The behaviour end to end (curl, the openai
// client, hostile clients) is tests/python/test_server*.py.
#include "server/http_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "engine/engine.h"
#include "model/chat_template.h"
#include "model/transformer.h"
#include "model/tokenizer.h"

namespace cortex::server {
namespace {

const std::string kModel = std::string(CS_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";

int connectTo(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void sendAll(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;
    sent += static_cast<size_t>(n);
  }
}

// Reads until the server closes, or until `stopAfter` bytes arrived (then closes abruptly).
std::string readAll(int fd, size_t stopAfter = SIZE_MAX) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() >= stopAfter) break;
  }
  ::close(fd);
  return out;
}

std::string post(const std::string& path, const std::string& body, bool close = true) {
  return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
         (close ? "Connection: close\r\n" : "") +
         "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}

std::string completion(const std::string& prompt, int maxTokens, bool stream) {
  return std::string(R"({"prompt": ")") + prompt + R"(", "max_tokens": )" +
         std::to_string(maxTokens) + R"(, "temperature": 0, "ignore_eos": true, "stream": )" +
         (stream ? "true" : "false") + "}";
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

struct Fixture : ::testing::Test {
  static void SetUpTestSuite() {
    ASSERT_TRUE(std::filesystem::exists(kModel)) << kModel << " missing: run scripts/fetch_model.sh";
    model = model::TransformerModel::load(kModel).release();
    tokenizer = new model::Tokenizer(model::Tokenizer::fromGGUF(model->file()));
  }
  static void TearDownTestSuite() {
    delete tokenizer;
    delete model;
  }

  void SetUp() override {
    engine::EngineConfig ec;
    ec.kvCacheBytes = 32ull << 20;
    ec.maxNumSeqs = 4;
    engine_ = std::make_unique<engine::Engine>(*model, *tokenizer, ec);
    ServerConfig sc;
    sc.port = 0;
    sc.servedModelName = "m";
    sc.chatTemplate = model::detectChatTemplate(tokenizer->chatTemplate());
    server_ = std::make_unique<HttpServer>(*engine_, *tokenizer, sc);
    server_->bind();
    loop_ = std::thread([this] { server_->run(); });
  }
  void TearDown() override {
    if (loop_.joinable()) {
      server_->shutdown(std::chrono::seconds(10));
      loop_.join();
    }
    server_.reset();
    engine_.reset();
  }

  static inline model::TransformerModel* model = nullptr;
  static inline model::Tokenizer* tokenizer = nullptr;
  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<HttpServer> server_;
  std::thread loop_;
};

TEST_F(Fixture, ConcurrentRequestsVanishingClientsAndPipelining) {
  const int port = server_->port();
  const std::string alone =
      readAll([&] {
        const int fd = connectTo(port);
        sendAll(fd, post("/v1/completions", completion("Once upon a time", 8, false)));
        return fd;
      }());
  ASSERT_NE(alone.find("HTTP/1.1 200"), std::string::npos) << alone;
  // The choice's text field, as every identical request must answer it.
  const size_t at = alone.find("\"text\"");
  ASSERT_NE(at, std::string::npos) << alone;
  const std::string text = alone.substr(at, alone.find("}]", at) - at);

  std::vector<std::string> answers(12);
  std::vector<std::thread> clients;
  for (size_t i = 0; i < answers.size(); ++i) {
    clients.emplace_back([&, i] {
      const int fd = connectTo(port);
      switch (i % 4) {
        case 0:  // plain
          sendAll(fd, post("/v1/completions", completion("Once upon a time", 8, false)));
          answers[i] = readAll(fd);
          break;
        case 1:  // streamed
          sendAll(fd, post("/v1/completions", completion("Once upon a time", 8, true)));
          answers[i] = readAll(fd);
          break;
        case 2:  // streamed, gone after the first bytes of a long answer
          sendAll(fd, post("/v1/completions", completion("Tell me a story", 400, true)));
          answers[i] = readAll(fd, 300);
          break;
        default:  // pipelined: health, then a plain request, on one connection
          sendAll(fd, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n" +
                          post("/v1/completions", completion("Once upon a time", 8, false)));
          answers[i] = readAll(fd);
      }
    });
  }
  for (std::thread& t : clients) t.join();
  for (size_t i = 0; i < answers.size(); ++i) {
    const std::string& a = answers[i];
    switch (i % 4) {
      case 0:
        EXPECT_NE(a.find(text), std::string::npos) << a;
        break;
      case 1:
        EXPECT_NE(a.find("data: [DONE]\n\n\r\n0\r\n\r\n"), std::string::npos) << a;
        EXPECT_GE(count(a, "data: {"), 8u) << a;  // a frame per token, and the finish
        EXPECT_EQ(count(a, "\"finish_reason\":\"length\""), 1u) << a;
        break;
      case 2:
        EXPECT_NE(a.find("HTTP/1.1 200"), std::string::npos) << a;
        break;
      default:
        EXPECT_EQ(count(a, "HTTP/1.1 200"), 2u) << a;
        EXPECT_NE(a.find(text), std::string::npos) << a;
    }
  }
  // The vanished clients' requests were cancelled, and every block came back.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server_->inFlight() > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(server_->inFlight(), 0);
  const engine::EngineStats st = engine_->stats();
  EXPECT_EQ(st.finishedCancelled, 3u);
  EXPECT_EQ(st.kv.usedBlocks, 0);
}

TEST_F(Fixture, ShutdownCutsAStreamAndStillEndsItsBody) {
  const int fd = connectTo(server_->port());
  sendAll(fd, post("/v1/completions", completion("Tell me a story", 1000, true)));
  char first[64];
  ASSERT_GT(::recv(fd, first, sizeof first, MSG_PEEK), 0);  // the stream has begun
  server_->shutdown(std::chrono::milliseconds(0));
  loop_.join();
  const std::string a = readAll(fd);
  EXPECT_NE(a.find("\"code\":\"shutting_down\""), std::string::npos) << a;
  EXPECT_TRUE(a.size() >= 5 && a.substr(a.size() - 5) == "0\r\n\r\n") << a;
  EXPECT_EQ(engine_->stats().kv.usedBlocks, 0);
}

}  // namespace
}  // namespace cortex::server
