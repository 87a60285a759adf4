// `cortexstream serve`: the OpenAI-compatible HTTP server (src/server) over the engine.
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "cli/commands.h"
#include "cli/model_options.h"
#include "engine/engine.h"
#include "kernels/isa.h"
#include "model/chat_template.h"
#include "model/transformer.h"
#include "model/tokenizer.h"
#include "server/byte_size.h"
#include "server/http_server.h"
#include "server/kv_event_publisher.h"

namespace cortex::cli {

namespace {

struct ServeOptions {
  std::string modelPath;  // empty: the default model (resolveModelPath)
  std::string host = "127.0.0.1";
  int port = 8080;
  int32_t maxBatchedTokens = 512;
  int32_t maxNumSeqs = 64;
  int32_t maxModelLen = 0;
  std::string kvCacheMemory;  // empty: the engine's default share of free memory
  std::string kvCacheMaxMemory;  // empty: the starting size
  kv::KVDType kvDtype = kv::KVDType::F16;
  model::Precision precision = model::Precision::Int8;
  int32_t maxQueue = 1024;
  std::string servedModelName;
  int threads = 0;
  std::string chatTemplate;
  int httpThreads = 2;
  int maxConnections = 4096;
  double readTimeoutSeconds = 30;
  double keepAliveTimeoutSeconds = 5;
  std::string apiKey;  // empty: $CORTEXSTREAM_API_KEY, else none
  bool metricsRequireKey = false;
  std::string sslCertFile, sslKeyFile;
  double shutdownGraceSeconds = 30;
  std::string schedulePolicy = "fcfs";
  bool noPrefixCaching = false;
  bool noHybridKv = false;
  engine::Backend backend = engine::Backend::Cpu;
  std::string kvSessionDir;
  std::string kvOffloadDir;
  std::string kvOffloadSize = "8GiB";
  std::string kvRedisUrl;
  std::string kvRedisPrefix = "cortexstream";
  int64_t kvRedisTtl = 3600;
  std::string preemptionMode = "recompute";
  std::string kvEventsEndpoint;        // empty: no KV events
  std::string kvEventsReplayEndpoint;  // empty: no replay
};

// Blocks SIGINT/SIGTERM in this thread and every thread started after it (OpenMP, the engine
// loop, the HTTP I/O threads), so only the waiter thread receives them, with sigtimedwait.
sigset_t blockShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a client that went away must not kill the server
  return set;
}

// Waits up to `ms` for SIGINT/SIGTERM; the signal number, or 0.
int waitSignal(const sigset_t& set, long ms) {
  timespec ts{ms / 1000, (ms % 1000) * 1000000L};
  const int sig = sigtimedwait(&set, nullptr, &ts);
  return sig > 0 ? sig : 0;
}

// Each connection is a file descriptor: raise the soft limit to the hard one, and keep the
// connection cap under what is left (the model file, the engine and ZeroMQ need a few).
int fitConnectionsToFdLimit(int maxConnections) {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return maxConnections;
  if (lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    setrlimit(RLIMIT_NOFILE, &lim);
    getrlimit(RLIMIT_NOFILE, &lim);
  }
  constexpr rlim_t kReserved = 64;
  if (lim.rlim_cur == RLIM_INFINITY || lim.rlim_cur >= static_cast<rlim_t>(maxConnections) + kReserved) {
    return maxConnections;
  }
  const int fit = static_cast<int>(std::max<rlim_t>(lim.rlim_cur, 2 * kReserved) - kReserved);
  std::cerr << "warning: --max-connections " << maxConnections << " lowered to " << fit
            << " (open-file limit " << lim.rlim_cur << ")\n";
  return fit;
}

void runServe(const ServeOptions& o) {
  const sigset_t signals = blockShutdownSignals();
  const std::string modelPath = resolveModelPath(o.modelPath);
  engine::EngineConfig ec;
  ec.maxBatchedTokens = o.maxBatchedTokens;
  ec.maxNumSeqs = o.maxNumSeqs;
  ec.maxModelLen = o.maxModelLen;
  ec.maxQueuedRequests = o.maxQueue;
  ec.kvDtype = o.kvDtype;
  if (!o.kvCacheMemory.empty()) {
    try {
      ec.kvCacheBytes = server::parseByteSize(o.kvCacheMemory);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("--kv-cache-memory: ") + e.what());
    }
    if (ec.kvCacheBytes == 0) throw std::runtime_error("--kv-cache-memory must be > 0");
  }
  if (!o.kvCacheMaxMemory.empty()) {
    try {
      ec.kvCacheMaxBytes = server::parseByteSize(o.kvCacheMaxMemory);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("--kv-cache-max-memory: ") + e.what());
    }
  }
  ec.numThreads = o.threads;
  ec.prefixCaching = !o.noPrefixCaching;
  ec.hybridKv = !o.noHybridKv;
  ec.backend = o.backend;
  ec.schedulePolicy = engine::parseSchedulePolicy(o.schedulePolicy);
  ec.kvTiers.diskDir = o.kvOffloadDir;
  try {
    ec.kvTiers.diskBytes = server::parseByteSize(o.kvOffloadSize);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("--kv-offload-size: ") + e.what());
  }
  if (ec.kvTiers.diskBytes == 0) throw std::runtime_error("--kv-offload-size must be > 0");
  ec.kvTiers.redisUrl = o.kvRedisUrl;
  ec.kvTiers.redisKeyPrefix = o.kvRedisPrefix;
  ec.kvTiers.redisTtlSeconds = o.kvRedisTtl;
  ec.preemptionMode = engine::parsePreemptionMode(o.preemptionMode);

  // Bound before the model loads, so a bad endpoint fails at once; declared before the engine, so
  // it outlives the step loop that calls it (the engine is destroyed first).
  std::unique_ptr<server::KVEventPublisher> kvEvents;
  if (o.kvEventsEndpoint.empty() && !o.kvEventsReplayEndpoint.empty()) {
    throw std::runtime_error("--kv-events-replay-endpoint needs --kv-events-endpoint");
  }
  if (!o.kvEventsEndpoint.empty()) {
    server::KVEventPublisherConfig pc;
    pc.endpoint = o.kvEventsEndpoint;
    pc.replayEndpoint = o.kvEventsReplayEndpoint;
    kvEvents = std::make_unique<server::KVEventPublisher>(pc);
    ec.kvEventListener = [p = kvEvents.get()](std::vector<kv::KVEvent>&& events) {
      p->publish(std::move(events));
    };
  }

  const kernels::Isa isa = kernels::activeIsa();  // a bad CORTEXSTREAM_ISA fails here
  auto llama = model::TransformerModel::load(modelPath, modelPrecision(o.backend, o.precision));
  const model::Tokenizer tokenizer = model::Tokenizer::fromGGUF(llama->file());

  server::ServerConfig sc;
  sc.host = o.host;
  sc.port = o.port;
  sc.modelPath = std::filesystem::absolute(modelPath).string();
  if (kvEvents) {
    sc.kvEventsEndpoint = kvEvents->endpoint();
    sc.kvEventsReplayEndpoint = kvEvents->replayEndpoint();
  }
  sc.ioThreads = o.httpThreads;
  sc.maxConnections = fitConnectionsToFdLimit(o.maxConnections);
  sc.readTimeout = std::chrono::milliseconds(static_cast<int64_t>(o.readTimeoutSeconds * 1000));
  sc.keepAliveTimeout =
      std::chrono::milliseconds(static_cast<int64_t>(o.keepAliveTimeoutSeconds * 1000));
  sc.apiKey = o.apiKey;
  if (sc.apiKey.empty()) {
    if (const char* env = std::getenv("CORTEXSTREAM_API_KEY")) sc.apiKey = env;
  }
  if (o.metricsRequireKey && sc.apiKey.empty()) {
    throw std::runtime_error("--metrics-require-key needs an API key (--api-key or "
                             "CORTEXSTREAM_API_KEY)");
  }
  sc.metricsRequireKey = o.metricsRequireKey;
  sc.sslCertFile = o.sslCertFile;
  sc.sslKeyFile = o.sslKeyFile;
  if (!o.kvSessionDir.empty() && o.backend != engine::Backend::Cpu) {
    throw std::runtime_error("--kv-session-dir needs --backend cpu (KV sessions read the CPU arena)");
  }
  if (!o.kvSessionDir.empty()) {
    sc.kvSessionDir = std::filesystem::absolute(o.kvSessionDir).lexically_normal().string();
  }
  sc.servedModelName = o.servedModelName.empty()
                           ? std::filesystem::path(modelPath).filename().string()
                           : o.servedModelName;
  try {
    sc.chatTemplate = model::chatTemplateFor(
        tokenizer.chatTemplate(), llama->file().getString("general.architecture"), o.chatTemplate);
  } catch (const std::exception& e) {
    if (!o.chatTemplate.empty()) throw;  // a bad --chat-template is the user's to fix now
    // A base model without a template still serves /v1/completions.
    sc.chatTemplateError = std::string("chat completions are unavailable: ") + e.what();
    std::cerr << "warning: " << sc.chatTemplateError << "\n";
  }

  engine::Engine engine(*llama, tokenizer, ec);
  server::HttpServer server(engine, tokenizer, sc);
  server.bind();
  const engine::EngineStats stats = engine.stats();
  std::cerr << "model " << sc.servedModelName << ": KV cache " << stats.kv.totalBlocks
            << " blocks x " << stats.blockSizeTokens << " tokens ("
            << stats.kv.totalBytes / (1024 * 1024) << " MiB"
            << (ec.kvCacheMaxBytes > stats.kv.totalBytes
                    ? ", resizable up to " + std::to_string(ec.kvCacheMaxBytes / (1024 * 1024)) +
                          " MiB"
                    : std::string())
            << "), max context "
            << engine.maxContextTokens() << " tokens; "
            << (o.backend == engine::Backend::Mlx
                    ? std::string("MLX backend (float32 arithmetic)")
                    : std::string(model::toString(o.precision)) + " matmuls on " +
                          kernels::toString(isa) + " kernels")
            << "\n";
  for (const kvtier::TierCounters& t : stats.tiers.tiers) {
    std::cerr << "KV tier " << t.name << ": "
              << (t.name == std::string("disk")
                      ? o.kvOffloadDir + " (" + o.kvOffloadSize + ", " +
                            std::to_string(t.bytesStored / (1024 * 1024)) + " MiB held)"
                      : o.kvRedisUrl + (t.up ? " (connected)" : " (not reachable now; retrying)"))
              << "\n";
  }
  if (kvEvents) {
    std::cerr << "publishing KV events on " << kvEvents->endpoint()
              << (kvEvents->replayEndpoint().empty() ? ""
                                                     : ", replay on " + kvEvents->replayEndpoint())
              << (ec.prefixCaching ? "" : " (prefix caching is off: there will be none)") << "\n";
  }
  std::cerr << "listening on " << (sc.sslCertFile.empty() ? "http" : "https") << "://" << o.host << ":" << server.port() << std::endl;

  std::atomic<bool> stopped{false};
  std::thread waiter([&] {
    int sig = 0;
    while (!stopped.load() && (sig = waitSignal(signals, 200)) == 0) {
    }
    if (sig == 0) return;
    std::cerr << "received " << (sig == SIGINT ? "SIGINT" : "SIGTERM") << ": draining "
              << server.inFlight() << " request(s) (again to cancel them)" << std::endl;
    const auto grace = std::chrono::milliseconds(static_cast<int64_t>(o.shutdownGraceSeconds * 1000));
    server.shutdown(grace, [&] { return waitSignal(signals, 0) != 0; });
  });
  server.run();
  stopped = true;
  waiter.join();
  std::cerr << "server stopped" << std::endl;
}

}  // namespace

void registerServeCommand(CLI::App& app) {
  auto o = std::make_shared<ServeOptions>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)");
  cmd->add_option("--model,-m", o->modelPath, kModelOptionHelp);
  cmd->add_option("--host", o->host, "address to listen on")->capture_default_str();
  cmd->add_option("--port", o->port, "TCP port (0 = any free port)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  cmd->add_option("--max-batched-tokens", o->maxBatchedTokens,
                  "tokens per engine step (decodes + prefill chunks)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--max-num-seqs", o->maxNumSeqs, "requests running at once")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  cmd->add_option("--max-model-len", o->maxModelLen,
                  "longest context (prompt + completion) a request may have; windowed requests "
                  "(kv_window) run past it, their window moving back there (default: the "
                  "model's context)")
      ->check(CLI::Range(1, 1 << 30));
  cmd->add_option("--kv-cache-memory", o->kvCacheMemory,
                  "KV cache size, e.g. 512MiB, 1GiB, 300MB, 1000000 (bytes); default: a quarter "
                  "of free memory, at most 4 GiB");
  cmd->add_option("--kv-cache-max-memory", o->kvCacheMaxMemory,
                  "the most POST /admin/kv-cache may grow the KV cache to while serving "
                  "(address space is reserved for it; memory is used only as the cache grows); "
                  "default: its starting size");
  addKvDtypeOption(cmd, o->kvDtype);
  addPrecisionOption(cmd, o->precision);
  cmd->add_option("--max-queue", o->maxQueue, "waiting requests beyond which new ones get 503")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  cmd->add_option("--served-model-name", o->servedModelName,
                  "model name in responses and /v1/models (default: the GGUF file name)");
  cmd->add_option("--threads,-t", o->threads, "CPU threads for the forward pass (0 = all cores)")
      ->check(CLI::Range(0, 1024));
  cmd->add_option("--chat-template", o->chatTemplate,
                  "override the model's chat template: a built-in name (chatml, gemma, llama3) "
                  "or a Jinja file");
  cmd->add_option("--http-threads", o->httpThreads,
                  "HTTP I/O threads; every connection (idle, slow or streaming) is served by "
                  "them without holding one")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  cmd->add_option("--max-connections", o->maxConnections,
                  "open connections beyond which a new one gets 503 and is closed")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  cmd->add_option("--http-read-timeout", o->readTimeoutSeconds,
                  "seconds a request's head and body may take to arrive after its first byte "
                  "(then 408)")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd->add_option("--http-keep-alive-timeout", o->keepAliveTimeoutSeconds,
                  "seconds an idle keep-alive connection stays open")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  cmd->add_option("--api-key", o->apiKey,
                  "require 'Authorization: Bearer KEY' on every path but /health (and /metrics); "
                  "default: $CORTEXSTREAM_API_KEY, else no key");
  cmd->add_flag("--metrics-require-key", o->metricsRequireKey,
                "/metrics needs the API key too");
  cmd->add_option("--ssl-cert-file", o->sslCertFile,
                  "serve HTTPS with this PEM certificate (chain); needs --ssl-key-file")
      ->check(CLI::ExistingFile);
  cmd->add_option("--ssl-key-file", o->sslKeyFile, "the PEM private key of --ssl-cert-file")
      ->check(CLI::ExistingFile);
  cmd->add_option("--shutdown-grace", o->shutdownGraceSeconds,
                  "seconds SIGINT/SIGTERM waits for running requests before cancelling them")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  addHybridKvFlag(cmd, o->noHybridKv);
  addBackendOption(cmd, o->backend);
  cmd->add_option("--kv-session-dir", o->kvSessionDir,
                  "folder where POST /kv_sessions/save writes and /kv_sessions/restore reads "
                  "saved KV sessions (clients name only a file inside it); off when not given")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--kv-offload-dir", o->kvOffloadDir,
                  "keep cached KV blocks in this folder too (a disk tier under the pool, created "
                  "if missing), written as they are computed and read back for prompts the pool "
                  "no longer holds; default: off");
  cmd->add_option("--kv-offload-size", o->kvOffloadSize,
                  "the disk tier's capacity (least recently used blocks go first)")
      ->capture_default_str();
  cmd->add_option("--kv-redis", o->kvRedisUrl,
                  "keep cached KV blocks in Redis too, shared by every server that uses it with "
                  "the same model: redis://[[user]:password@]host[:port][/db]; default: off");
  cmd->add_option("--kv-redis-prefix", o->kvRedisPrefix, "prefix of the Redis keys")
      ->capture_default_str();
  cmd->add_option("--kv-redis-ttl", o->kvRedisTtl,
                  "seconds a block stays in Redis after it was last written or read (0: no "
                  "expiry)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40))
      ->capture_default_str();
  cmd->add_option("--preemption-mode", o->preemptionMode,
                  "a request preempted for lack of KV blocks is computed again when it resumes "
                  "(recompute) or read back from the disk tier (swap; needs --kv-offload-dir)")
      ->check(CLI::IsMember({"recompute", "swap"}))
      ->capture_default_str();
  cmd->add_flag("--no-prefix-caching", o->noPrefixCaching,
                "compute every prompt in full instead of reusing cached KV blocks of earlier ones");
  cmd->add_option("--schedule-policy", o->schedulePolicy,
                  "order of admission: fcfs (arrival order) or lpm (longest cached prefix first; "
                  "a request overtaken 32 times goes first)")
      ->check(CLI::IsMember({"fcfs", "lpm"}))
      ->capture_default_str();
  cmd->add_option("--kv-events-endpoint", o->kvEventsEndpoint,
                  "publish prefix-cache events (vLLM's ZeroMQ/msgpack format) on this PUB "
                  "endpoint, e.g. tcp://*:5557 (default: off)");
  cmd->add_option("--kv-events-replay-endpoint", o->kvEventsReplayEndpoint,
                  "answer requests for missed KV event batches on this ROUTER endpoint, e.g. "
                  "tcp://*:5558 (default: off)");
  cmd->callback([o] { runServe(*o); });
}

}  // namespace cortex::cli
