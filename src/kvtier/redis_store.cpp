#include "kvtier/redis_store.h"

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <sys/time.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string_view>

namespace cortex::kvtier {

namespace {

struct FreeReply {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, FreeReply>;

Reply command(redisContext* c, const char* format, auto... args) {
  return Reply(static_cast<redisReply*>(redisCommand(c, format, args...)));
}

// The next reply of a pipeline; null on an I/O error or timeout.
Reply nextReply(redisContext* c) {
  void* r = nullptr;
  if (redisGetReply(c, &r) != REDIS_OK) return nullptr;
  return Reply(static_cast<redisReply*>(r));
}

// Why the context's last call failed. A socket timeout shows as EAGAIN; say so plainly.
std::string ioError(const redisContext* c, std::chrono::milliseconds timeout) {
  if (c == nullptr) return "out of memory";
  if (c->err == REDIS_ERR_IO && std::strcmp(c->errstr, std::strerror(EAGAIN)) == 0) {
    return "timed out after " + std::to_string(timeout.count()) + " ms";
  }
  return c->errstr;
}

// What an unexpected reply was, for messages: an error reply's text, else its type.
std::string describe(const redisReply& r) {
  switch (r.type) {
    case REDIS_REPLY_ERROR: return std::string(r.str, r.len);
    case REDIS_REPLY_STATUS: return "status " + std::string(r.str, r.len);
    case REDIS_REPLY_STRING: return "a string";
    case REDIS_REPLY_INTEGER: return "integer " + std::to_string(r.integer);
    case REDIS_REPLY_NIL: return "nil";
    case REDIS_REPLY_ARRAY: return "an array";
  }
  return "reply type " + std::to_string(r.type);
}

bool isOk(const redisReply& r) {
  return r.type == REDIS_REPLY_STATUS && std::string_view(r.str, r.len) == "OK";
}

timeval toTimeval(std::chrono::milliseconds ms) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(ms.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>(ms.count() % 1000 * 1000);
  return tv;
}

// hiredis writes with write(2), so a peer that closed the connection raises SIGPIPE, which would
// kill a process that did not ignore it (the server does; tests and tools may not). Block it on
// this thread while hiredis runs and swallow one raised meanwhile; the write then fails with EPIPE.
class SigpipeGuard {
 public:
  SigpipeGuard() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
    sigset_t pending;
    sigpending(&pending);
    wasPending_ = sigismember(&pending, SIGPIPE) == 1;
  }
  ~SigpipeGuard() {
    sigset_t pending;
    sigpending(&pending);
    if (!wasPending_ && sigismember(&pending, SIGPIPE) == 1) {
      const timespec noWait{};
      sigtimedwait(&pipe_, nullptr, &noWait);
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }
  SigpipeGuard(const SigpipeGuard&) = delete;
  SigpipeGuard& operator=(const SigpipeGuard&) = delete;

 private:
  sigset_t pipe_{};
  sigset_t old_{};
  bool wasPending_ = false;
};

// The URL with its password masked, so that error messages (which end up in logs) do not leak it.
std::string redacted(const std::string& url) {
  const size_t scheme = url.find("://");
  const size_t at = url.rfind('@');
  if (scheme == std::string::npos || at == std::string::npos || at < scheme) return url;
  const size_t colon = url.find(':', scheme + 3);
  if (colon == std::string::npos || colon > at) return url;
  return url.substr(0, colon + 1) + "***" + url.substr(at);
}

[[noreturn]] void badUrl(const std::string& url, const std::string& what) {
  throw std::invalid_argument("invalid Redis URL '" + redacted(url) + "': " + what);
}

// A decimal number no greater than `max`; -1 when `s` is not one.
long long parseNumber(std::string_view s, long long max) {
  if (s.empty() || s.size() > 10) return -1;
  long long v = 0;
  for (const char c : s) {
    if (c < '0' || c > '9') return -1;
    v = v * 10 + (c - '0');
  }
  return v > max ? -1 : v;
}

bool hostChar(char c, bool ipv6) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.') {
    return true;
  }
  return ipv6 ? (c == ':' || c == '%') : (c == '-' || c == '_');
}

}  // namespace

RedisUrl parseRedisUrl(const std::string& url) {
  constexpr std::string_view kScheme = "redis://";
  if (url.starts_with("rediss://")) badUrl(url, "rediss:// (TLS) is not supported");
  if (!url.starts_with(kScheme)) {
    const size_t sep = url.find("://");
    if (sep == std::string::npos) badUrl(url, "it must start with redis://");
    badUrl(url, "scheme " + url.substr(0, sep) + ":// is not supported; use redis://");
  }
  RedisUrl out;
  std::string_view rest = std::string_view(url).substr(kScheme.size());

  // The last '@' ends the user info, so a password may hold '@' (and ':' and '/').
  if (const size_t at = rest.rfind('@'); at != std::string_view::npos) {
    const std::string_view info = rest.substr(0, at);
    const size_t colon = info.find(':');
    if (colon == std::string_view::npos) {
      badUrl(url, "the part before '@' must be user:password or :password");
    }
    out.user = info.substr(0, colon);
    out.password = info.substr(colon + 1);
    if (out.password.empty()) badUrl(url, "the password before '@' is empty");
    rest.remove_prefix(at + 1);
  }

  const size_t slash = rest.find('/');
  std::string_view hostPort = rest.substr(0, slash);
  const std::string_view path =
      slash == std::string_view::npos ? std::string_view{} : rest.substr(slash + 1);

  std::string_view host;
  bool ipv6 = false;
  if (hostPort.starts_with('[')) {
    const size_t close = hostPort.find(']');
    if (close == std::string_view::npos) badUrl(url, "'[' opens an IPv6 address that no ']' closes");
    host = hostPort.substr(1, close - 1);
    hostPort.remove_prefix(close + 1);
    if (!hostPort.empty() && !hostPort.starts_with(':')) {
      badUrl(url, "unexpected '" + std::string(hostPort) + "' after the IPv6 address");
    }
    ipv6 = true;
  } else {
    const size_t colon = hostPort.find(':');
    host = hostPort.substr(0, colon);
    hostPort.remove_prefix(colon == std::string_view::npos ? hostPort.size() : colon);
  }
  if (host.empty()) badUrl(url, "no host");
  for (const char c : host) {
    if (!hostChar(c, ipv6)) {
      badUrl(url, "host '" + std::string(host) + "' has an invalid character '" + c + "'");
    }
  }
  out.host = host;

  if (!hostPort.empty()) {  // ":port"
    const std::string_view port = hostPort.substr(1);
    const long long n = parseNumber(port, 65535);
    if (n < 1) badUrl(url, "port '" + std::string(port) + "' is not a number in 1..65535");
    out.port = static_cast<int>(n);
  }
  if (!path.empty()) {  // "/db"; a bare trailing '/' means db 0
    const long long n = parseNumber(path, 2147483647);
    if (n < 0) badUrl(url, "database '" + std::string(path) + "' is not a non-negative integer");
    out.db = static_cast<int>(n);
  }
  return out;
}

RedisStore::RedisStore(RedisOptions options, std::string nameSpace)
    : options_(std::move(options)), url_(parseRedisUrl(options_.url)), ns_(std::move(nameSpace)) {
  if (options_.ttlSeconds < 0) {
    throw std::invalid_argument("Redis TTL must be 0 (never expire) or positive seconds, got " +
                                std::to_string(options_.ttlSeconds));
  }
  // Zero would mean "no timeout" to the socket, and a hung Redis would then hang the tier worker.
  if (options_.timeout.count() <= 0) {
    throw std::invalid_argument("Redis timeout must be positive, got " +
                                std::to_string(options_.timeout.count()) + " ms");
  }
  if (options_.retryAfter.count() < 0) {
    throw std::invalid_argument("Redis retry delay must not be negative, got " +
                                std::to_string(options_.retryAfter.count()) + " ms");
  }
  const bool ipv6 = url_.host.find(':') != std::string::npos;
  where_ = (ipv6 ? "[" + url_.host + "]" : url_.host) + ":" + std::to_string(url_.port);
  std::string error;
  connect(error);
}

RedisStore::~RedisStore() {
  if (ctx_ != nullptr) redisFree(ctx_);
}

std::string RedisStore::redisKey(uint64_t key) const {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(key));
  return options_.keyPrefix + ":" + ns_ + ":" + hex;
}

void RedisStore::disconnect() {
  if (ctx_ != nullptr) redisFree(ctx_);
  ctx_ = nullptr;
  up_ = false;
  retryAt_ = std::chrono::steady_clock::now() + options_.retryAfter;
}

std::string RedisStore::fail(const std::string& what) {
  lastError_ = what;
  disconnect();
  return "Redis at " + where_ + ": " + what;
}

bool RedisStore::probe() {
  std::string error;
  return connect(error);
}

bool RedisStore::connect(std::string& error) {
  if (ctx_ != nullptr) return true;
  const auto now = std::chrono::steady_clock::now();
  if (now < retryAt_) {
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(retryAt_ - now);
    error = "Redis at " + where_ + " is down (" + lastError_ + "); retrying in " +
            std::to_string(left.count()) + " ms";
    return false;
  }
  const timeval tv = toTimeval(options_.timeout);
  ctx_ = redisConnectWithTimeout(url_.host.c_str(), url_.port, tv);
  if (ctx_ == nullptr || ctx_->err != 0) {
    error = fail("cannot connect: " + ioError(ctx_, options_.timeout));
    return false;
  }
  // The connect timeout does not carry over to commands.
  if (redisSetTimeout(ctx_, tv) != REDIS_OK) {
    error = fail("cannot set the command timeout: " + ioError(ctx_, options_.timeout));
    return false;
  }
  // Each step must answer: without AUTH or SELECT a PING proves the server serves us (a
  // password-protected one refuses it), so up() does not claim a connection every command fails on.
  const auto handshake = [&](const char* what, Reply r) {
    if (!r) {
      error = fail(std::string(what) + " failed: " + ioError(ctx_, options_.timeout));
      return false;
    }
    if (r->type != REDIS_REPLY_STATUS) {
      error = fail(std::string(what) + " failed: " + describe(*r));
      return false;
    }
    return true;
  };
  if (!url_.password.empty()) {
    Reply r = url_.user.empty()
                  ? command(ctx_, "AUTH %b", url_.password.data(), url_.password.size())
                  : command(ctx_, "AUTH %b %b", url_.user.data(), url_.user.size(),
                            url_.password.data(), url_.password.size());
    if (!handshake("AUTH", std::move(r))) return false;
  }
  if (url_.db != 0) {
    if (!handshake("SELECT", command(ctx_, "SELECT %d", url_.db))) return false;
  }
  if (url_.password.empty() && url_.db == 0) {
    if (!handshake("PING", command(ctx_, "PING"))) return false;
  }
  lastError_.clear();
  up_ = true;
  return true;
}

std::vector<uint8_t> RedisStore::contains(std::span<const uint64_t> keys) {
  std::vector<uint8_t> out(keys.size(), 0);
  if (keys.empty()) return out;
  const SigpipeGuard guard;
  std::string error;
  if (!connect(error)) return out;
  for (const uint64_t key : keys) {
    const std::string k = redisKey(key);
    if (redisAppendCommand(ctx_, "EXISTS %b", k.data(), k.size()) != REDIS_OK) {
      fail("EXISTS failed: " + ioError(ctx_, options_.timeout));
      return out;
    }
  }
  // Every reply is read even after an error reply, so the connection stays in step.
  for (size_t i = 0; i < keys.size(); ++i) {
    const Reply r = nextReply(ctx_);
    if (!r) {
      fail("EXISTS failed: " + ioError(ctx_, options_.timeout));
      return std::vector<uint8_t>(keys.size(), 0);
    }
    out[i] = r->type == REDIS_REPLY_INTEGER && r->integer == 1 ? 1 : 0;
  }
  return out;
}

Fetched RedisStore::get(uint64_t key) {
  Fetched out;
  const SigpipeGuard guard;
  if (!connect(out.error)) {
    out.status = Fetched::Status::Failed;
    return out;
  }
  const std::string k = redisKey(key);
  const bool refresh = options_.ttlSeconds > 0;
  const std::string ttl = std::to_string(options_.ttlSeconds);
  // With a TTL a read counts as a use: the EXPIRE rides in the same round trip as the GET.
  if (redisAppendCommand(ctx_, "GET %b", k.data(), k.size()) != REDIS_OK ||
      (refresh && redisAppendCommand(ctx_, "EXPIRE %b %b", k.data(), k.size(), ttl.data(),
                                     ttl.size()) != REDIS_OK)) {
    out.status = Fetched::Status::Failed;
    out.error = fail("GET failed: " + ioError(ctx_, options_.timeout));
    return out;
  }
  const Reply r = nextReply(ctx_);
  if (!r) {
    out.status = Fetched::Status::Failed;
    out.error = fail("GET failed: " + ioError(ctx_, options_.timeout));
    return out;
  }
  if (r->type == REDIS_REPLY_STRING) {
    out.status = Fetched::Status::Found;
    out.bytes.resize(r->len);
    if (r->len > 0) std::memcpy(out.bytes.data(), r->str, r->len);
  } else if (r->type == REDIS_REPLY_NIL) {
    out.status = Fetched::Status::Missing;
  } else {
    out.status = Fetched::Status::Failed;
    out.error = "Redis at " + where_ + ": GET failed: " + describe(*r);
  }
  // The record is good even if the refresh's reply is lost; the next call reconnects.
  if (refresh && !nextReply(ctx_)) fail("EXPIRE failed: " + ioError(ctx_, options_.timeout));
  return out;
}

bool RedisStore::put(uint64_t key, std::span<const std::byte> record, std::string& error) {
  const SigpipeGuard guard;
  if (!connect(error)) return false;
  const std::string k = redisKey(key);
  const std::string ttl = std::to_string(options_.ttlSeconds);
  const bool expires = options_.ttlSeconds > 0;
  // A key already held keeps its record; finding it first saves sending hundreds of KB again.
  // With a TTL the EXPIRE both finds it and counts the put as a use.
  {
    const Reply r = expires ? command(ctx_, "EXPIRE %b %b", k.data(), k.size(), ttl.data(),
                                      ttl.size())
                            : command(ctx_, "EXISTS %b", k.data(), k.size());
    const char* what = expires ? "EXPIRE" : "EXISTS";
    if (!r) {
      error = fail(std::string(what) + " failed: " + ioError(ctx_, options_.timeout));
      return false;
    }
    if (r->type != REDIS_REPLY_INTEGER) {
      error = "Redis at " + where_ + ": " + what + " failed: " + describe(*r);
      return false;
    }
    if (r->integer == 1) return true;
  }
  const auto* bytes = reinterpret_cast<const char*>(record.data());
  const Reply r = expires ? command(ctx_, "SET %b %b EX %b", k.data(), k.size(), bytes,
                                    record.size(), ttl.data(), ttl.size())
                          : command(ctx_, "SET %b %b", k.data(), k.size(), bytes, record.size());
  if (!r) {
    error = fail("SET failed: " + ioError(ctx_, options_.timeout));
    return false;
  }
  if (!isOk(*r)) {
    error = "Redis at " + where_ + ": SET failed: " + describe(*r);
    return false;
  }
  return true;
}

void RedisStore::remove(uint64_t key) {
  const SigpipeGuard guard;
  std::string error;
  if (!connect(error)) return;
  const std::string k = redisKey(key);
  if (!command(ctx_, "DEL %b", k.data(), k.size())) {
    fail("DEL failed: " + ioError(ctx_, options_.timeout));
  }
}

}  // namespace cortex::kvtier
