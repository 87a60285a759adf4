// The Redis tier: block records as Redis strings, so several server processes (on one machine or
// many) share what any of them computed.
//
// Keys are "<prefix>:<namespace>:<key as 16 hex digits>"; the namespace (the cache's hash root in
// hex) keeps models and KV formats apart. With a TTL every record expires that many seconds after
// it was last stored or read (a read refreshes it); with TTL 0 records never expire and Redis's
// own maxmemory policy evicts them.
//
// The connection (hiredis, synchronous: the store runs on the tier worker) is opened at
// construction and again after a failure, with a connect and command timeout. When Redis cannot be reached or a command fails, the
// connection is dropped and calls miss (or fail, for put) at once without retrying until
// `retryAfter` has passed; then the next call reconnects. Nothing here throws after construction.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

#include "kvtier/block_store.h"

struct redisContext;

namespace cortex::kvtier {

// What `redis://[[user]:password@]host[:port][/db]` says. Port 6379 and db 0 when left out.
struct RedisUrl {
  std::string host;
  int port = 6379;
  std::string user;
  std::string password;
  int db = 0;
};
// Throws std::invalid_argument naming what is wrong with the URL.
RedisUrl parseRedisUrl(const std::string& url);

struct RedisOptions {
  std::string url;                           // redis://...
  std::string keyPrefix = "cortexstream";
  int64_t ttlSeconds = 3600;                 // 0: records never expire
  std::chrono::milliseconds timeout{2000};   // connect and per-command
  std::chrono::milliseconds retryAfter{1000};  // after a failure, before reconnecting
};

class RedisStore final : public BlockStore {
 public:
  // Parses the URL (std::invalid_argument when bad) and tries to connect once; a failure is not
  // an error (up() says so, and a later call retries).
  RedisStore(RedisOptions options, std::string nameSpace);
  ~RedisStore() override;

  const char* name() const override { return "redis"; }
  std::vector<uint8_t> contains(std::span<const uint64_t> keys) override;
  Fetched get(uint64_t key) override;
  bool put(uint64_t key, std::span<const std::byte> record, std::string& error) override;
  void remove(uint64_t key) override;
  bool up() const override { return up_.load(); }
  // Reconnects when down and the retry delay has passed.
  bool probe() override;
  uint64_t bytesStored() const override { return 0; }

  // The Redis key of a block key. For tests and tools.
  std::string redisKey(uint64_t key) const;

 private:
  // Connects when there is no connection and the retry delay has passed; false when down.
  bool connect(std::string& error);
  void disconnect();
  // Drops the connection after `what` went wrong, remembers why, and returns the message.
  std::string fail(const std::string& what);

  RedisOptions options_;
  RedisUrl url_;
  std::string ns_;
  std::string where_;      // "host:port", for messages
  std::string lastError_;  // why the connection was last dropped, for the "down" message
  redisContext* ctx_ = nullptr;
  std::chrono::steady_clock::time_point retryAt_{};
  std::atomic<bool> up_{false};
};

}  // namespace cortex::kvtier
