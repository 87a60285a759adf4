// RedisStore against a redis-server of the test's own, started on a free loopback port (and
// killed, stopped and restarted for the fault tests). redis-server must be installed: without it
// these tests fail rather than skip, so a CI machine that lacks it is noticed.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "kvtier/redis_store.h"

extern char** environ;

namespace cortex::kvtier {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// Short enough that the fault tests run in well under a second each.
constexpr milliseconds kTimeout{300};
constexpr milliseconds kRetryAfter{100};

std::string findRedisServer() {
  std::vector<std::string> dirs;
  if (const char* path = std::getenv("PATH")) {
    std::string p = path;
    for (size_t start = 0; start <= p.size();) {
      const size_t end = std::min(p.find(':', start), p.size());
      if (end > start) dirs.push_back(p.substr(start, end - start));
      start = end + 1;
    }
  }
  dirs.push_back("/usr/bin");
  dirs.push_back("/usr/local/bin");
  for (const std::string& dir : dirs) {
    const std::string candidate = dir + "/redis-server";
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

// A loopback port nobody listens on now: the kernel picks one for a socket bound to port 0.
int freePort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

bool accepts(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return ok;
}

// One redis-server process, without persistence, killed when this goes away.
class RedisServer {
 public:
  RedisServer() = default;
  RedisServer(const RedisServer&) = delete;
  RedisServer& operator=(const RedisServer&) = delete;
  ~RedisServer() { stop(); }

  // Starts it on `port`; false, with `error`, when it is not accepting connections within 5 s.
  bool start(const std::string& binary, int port, const std::vector<std::string>& extra,
             std::string& error) {
    std::vector<std::string> args = {binary,   "--port",       std::to_string(port),
                                     "--bind", "127.0.0.1",    "--save",
                                     "",       "--appendonly", "no",
                                     "--daemonize", "no"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
    const int rc = posix_spawn(&pid_, binary.c_str(), &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
      pid_ = -1;
      error = "cannot start " + binary + ": " + std::strerror(rc);
      return false;
    }
    const auto deadline = Clock::now() + std::chrono::seconds(5);
    while (Clock::now() < deadline) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        error = "redis-server exited at start (status " + std::to_string(status) +
                "); is port " + std::to_string(port) + " taken?";
        return false;
      }
      if (accepts(port)) return true;
      std::this_thread::sleep_for(milliseconds(10));
    }
    error = "redis-server is not accepting connections on port " + std::to_string(port) +
            " after 5 s";
    stop();
    return false;
  }

  // Sends `sig` and reaps the process (SIGKILL if it has not gone within 3 s).
  void stop(int sig = SIGTERM) {
    if (pid_ < 0) return;
    ::kill(pid_, sig);
    ::kill(pid_, SIGCONT);  // in case a test stopped it
    const auto deadline = Clock::now() + std::chrono::seconds(3);
    int status = 0;
    while (::waitpid(pid_, &status, WNOHANG) == 0) {
      if (Clock::now() > deadline) {
        ::kill(pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(milliseconds(5));
    }
    pid_ = -1;
  }

  // Freezes or thaws it: a stopped server still accepts connections (the kernel does) but never
  // answers, which is what a hung Redis looks like.
  void pause() { ::kill(pid_, SIGSTOP); }
  void resume() { ::kill(pid_, SIGCONT); }

 private:
  pid_t pid_ = -1;
};

struct FreeReply {
  void operator()(redisReply* r) const { freeReplyObject(r); }
};
using Reply = std::unique_ptr<redisReply, FreeReply>;

// A plain hiredis connection, to look at (and tamper with) what the store wrote.
class RawClient {
 public:
  explicit RawClient(int port, const std::string& password = "")
      : ctx_(redisConnect("127.0.0.1", port)) {
    if (ctx_ != nullptr && ctx_->err == 0 && !password.empty()) run({"AUTH", password});
  }
  ~RawClient() {
    if (ctx_ != nullptr) redisFree(ctx_);
  }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  Reply run(const std::vector<std::string>& args) {
    if (ctx_ == nullptr || ctx_->err != 0) {
      ADD_FAILURE() << "raw Redis connection failed: " << (ctx_ ? ctx_->errstr : "no memory");
      return nullptr;
    }
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const std::string& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    Reply r(static_cast<redisReply*>(redisCommandArgv(ctx_, static_cast<int>(args.size()),
                                                      argv.data(), lens.data())));
    if (!r) ADD_FAILURE() << "raw Redis command failed: " << ctx_->errstr;
    return r;
  }
  // An integer reply (TTL, EXISTS, ...); -100 when the reply is something else.
  long long integer(const std::vector<std::string>& args) {
    const Reply r = run(args);
    if (!r || r->type != REDIS_REPLY_INTEGER) {
      ADD_FAILURE() << "expected an integer reply to " << args[0];
      return -100;
    }
    return r->integer;
  }

 private:
  redisContext* ctx_;
};

std::vector<std::byte> randomRecord(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> out(n);
  for (std::byte& b : out) b = static_cast<std::byte>(rng() & 0xff);
  // Zero bytes where a C-string API would cut the record short.
  for (size_t i : {size_t{0}, n / 2, n - 1}) {
    if (i < n) out[i] = std::byte{0};
  }
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string errorOf(const std::string& url) {
  try {
    parseRedisUrl(url);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected '" << url << "' to be rejected";
  return "";
}

TEST(RedisUrlTest, ParsesGoodForms) {
  RedisUrl u = parseRedisUrl("redis://localhost");
  EXPECT_EQ(u.host, "localhost");
  EXPECT_EQ(u.port, 6379);
  EXPECT_EQ(u.db, 0);
  EXPECT_EQ(u.user, "");
  EXPECT_EQ(u.password, "");

  u = parseRedisUrl("redis://127.0.0.1:6380/2");
  EXPECT_EQ(u.host, "127.0.0.1");
  EXPECT_EQ(u.port, 6380);
  EXPECT_EQ(u.db, 2);

  u = parseRedisUrl("redis://:s3cret@cache-1.internal:1");
  EXPECT_EQ(u.host, "cache-1.internal");
  EXPECT_EQ(u.port, 1);
  EXPECT_EQ(u.user, "");
  EXPECT_EQ(u.password, "s3cret");

  // The last '@' ends the user info, so the password may hold '@' and ':'.
  u = parseRedisUrl("redis://alice:p@ss:w0rd@redis_host:65535/15");
  EXPECT_EQ(u.user, "alice");
  EXPECT_EQ(u.password, "p@ss:w0rd");
  EXPECT_EQ(u.host, "redis_host");
  EXPECT_EQ(u.port, 65535);
  EXPECT_EQ(u.db, 15);

  u = parseRedisUrl("redis://[::1]:7000/1");
  EXPECT_EQ(u.host, "::1");
  EXPECT_EQ(u.port, 7000);
  EXPECT_EQ(u.db, 1);

  u = parseRedisUrl("redis://[fe80::1%eth0]");
  EXPECT_EQ(u.host, "fe80::1%eth0");
  EXPECT_EQ(u.port, 6379);

  u = parseRedisUrl("redis://host/");
  EXPECT_EQ(u.host, "host");
  EXPECT_EQ(u.db, 0);
}

TEST(RedisUrlTest, RejectsBadFormsSayingWhy) {
  const std::pair<const char*, const char*> cases[] = {
      {"http://host", "http:// is not supported"},
      {"rediss://host:6380", "rediss:// (TLS) is not supported"},
      {"host:6379", "must start with redis://"},
      {"redis://", "no host"},
      {"redis://:6379", "no host"},
      {"redis://:pw@/1", "no host"},
      {"redis://[]:6379", "no host"},
      {"redis://host:0", "port '0' is not a number in 1..65535"},
      {"redis://host:70000", "port '70000'"},
      {"redis://host:abc", "port 'abc'"},
      {"redis://host:", "port ''"},
      {"redis://host:6379x", "port '6379x'"},
      {"redis://host:-1", "port '-1'"},
      {"redis://host/abc", "database 'abc' is not a non-negative integer"},
      {"redis://host/-1", "database '-1'"},
      {"redis://host/0/extra", "database '0/extra'"},
      {"redis://host/0 ", "database '0 '"},
      {"redis://host?db=1", "invalid character '?'"},
      {"redis://ho st", "invalid character ' '"},
      {"redis://[::1", "no ']' closes"},
      {"redis://[::1]x", "unexpected 'x' after the IPv6 address"},
      {"redis://alice@host", "user:password or :password"},
      {"redis://alice:@host", "password before '@' is empty"},
  };
  for (const auto& [url, why] : cases) {
    const std::string error = errorOf(url);
    EXPECT_NE(error.find("invalid Redis URL"), std::string::npos) << url << ": " << error;
    EXPECT_NE(error.find(why), std::string::npos) << url << ": " << error;
  }
  EXPECT_NE(errorOf("redis://host:0").find("'redis://host:0'"), std::string::npos);
}

TEST(RedisUrlTest, ErrorsDoNotShowThePassword) {
  const std::string error = errorOf("redis://alice:hunter2@host:0");
  EXPECT_EQ(error.find("hunter2"), std::string::npos) << error;
  EXPECT_NE(error.find("redis://alice:***@host:0"), std::string::npos) << error;
}

class RedisStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    binary_ = findRedisServer();
    ASSERT_FALSE(binary_.empty())
        << "redis-server not found in PATH or /usr/bin; the Redis tier tests need it "
           "(apt-get install redis-server)";
    port_ = freePort();
    ASSERT_GT(port_, 0) << "no free loopback port";
    startServer();
  }

  void startServer(const std::vector<std::string>& extra = {}) {
    std::string error;
    ASSERT_TRUE(server_.start(binary_, port_, extra, error)) << error;
  }

  std::string url(const std::string& suffix = "") const {
    return "redis://127.0.0.1:" + std::to_string(port_) + suffix;
  }

  RedisOptions options(int64_t ttl = 3600) const {
    RedisOptions o;
    o.url = url();
    o.keyPrefix = "cstest";
    o.ttlSeconds = ttl;
    o.timeout = kTimeout;
    o.retryAfter = kRetryAfter;
    return o;
  }

  // Waits out the store's retry delay, so that its next call reconnects.
  static void pastRetryDelay() { std::this_thread::sleep_for(kRetryAfter + milliseconds(50)); }

  std::string binary_;
  int port_ = -1;
  RedisServer server_;
};

TEST_F(RedisStoreTest, RoundTripsBinaryRecords) {
  RedisStore store(options(), "ns");
  EXPECT_TRUE(store.up());
  EXPECT_STREQ(store.name(), "redis");
  EXPECT_EQ(store.bytesStored(), 0u);
  std::string error;
  const size_t sizes[] = {1, 3, 300 * 1024, 0};
  for (size_t i = 0; i < std::size(sizes); ++i) {
    const std::vector<std::byte> record = randomRecord(sizes[i], i);
    const uint64_t key = 0xfedcba9876543210ull + i;
    ASSERT_TRUE(store.put(key, record, error)) << error;
    const Fetched f = store.get(key);
    ASSERT_EQ(f.status, Fetched::Status::Found) << f.error;
    EXPECT_EQ(f.bytes, record) << "size " << sizes[i];
  }
  EXPECT_EQ(store.get(42).status, Fetched::Status::Missing);
  EXPECT_TRUE(store.up());
}

TEST_F(RedisStoreTest, ContainsSaysWhichKeysAreHeld) {
  RedisStore store(options(), "ns");
  std::string error;
  ASSERT_TRUE(store.put(1, randomRecord(100, 1), error)) << error;
  ASSERT_TRUE(store.put(3, randomRecord(100, 3), error)) << error;
  const uint64_t keys[] = {1, 2, 3, 4, 1};
  EXPECT_EQ(store.contains(keys), (std::vector<uint8_t>{1, 0, 1, 0, 1}));
  EXPECT_TRUE(store.contains({}).empty());
}

TEST_F(RedisStoreTest, SecondPutKeepsTheFirstRecord) {
  RedisStore store(options(), "ns");
  std::string error;
  const std::vector<std::byte> first = randomRecord(1000, 1);
  ASSERT_TRUE(store.put(9, first, error)) << error;
  EXPECT_TRUE(store.put(9, randomRecord(1000, 2), error)) << error;
  const Fetched f = store.get(9);
  ASSERT_EQ(f.status, Fetched::Status::Found) << f.error;
  EXPECT_EQ(f.bytes, first);

  RedisStore forever(options(0), "ns0");
  ASSERT_TRUE(forever.put(9, first, error)) << error;
  EXPECT_TRUE(forever.put(9, randomRecord(1000, 2), error)) << error;
  EXPECT_EQ(forever.get(9).bytes, first);
}

TEST_F(RedisStoreTest, TtlIsSetAndRefreshedByGetAndPut) {
  RedisStore store(options(100), "ns");
  RawClient raw(port_);
  const std::string key = store.redisKey(5);
  std::string error;
  ASSERT_TRUE(store.put(5, randomRecord(64, 5), error)) << error;
  long long ttl = raw.integer({"TTL", key});
  EXPECT_GT(ttl, 0);
  EXPECT_LE(ttl, 100);

  // A read counts as a use: the TTL starts again.
  ASSERT_EQ(raw.integer({"EXPIRE", key, "5"}), 1);
  EXPECT_EQ(store.get(5).status, Fetched::Status::Found);
  ttl = raw.integer({"TTL", key});
  EXPECT_GT(ttl, 5);
  EXPECT_LE(ttl, 100);

  // So does storing a key already held.
  ASSERT_EQ(raw.integer({"EXPIRE", key, "5"}), 1);
  EXPECT_TRUE(store.put(5, randomRecord(64, 6), error)) << error;
  ttl = raw.integer({"TTL", key});
  EXPECT_GT(ttl, 5);
  EXPECT_LE(ttl, 100);
}

TEST_F(RedisStoreTest, TtlZeroNeverExpires) {
  RedisStore store(options(0), "ns");
  RawClient raw(port_);
  std::string error;
  ASSERT_TRUE(store.put(5, randomRecord(64, 5), error)) << error;
  EXPECT_EQ(raw.integer({"TTL", store.redisKey(5)}), -1);
  EXPECT_EQ(store.get(5).status, Fetched::Status::Found);
  EXPECT_EQ(raw.integer({"TTL", store.redisKey(5)}), -1);
}

TEST_F(RedisStoreTest, NamespacesAreApart) {
  RedisStore a(options(), "aaaa");
  RedisStore b(options(), "bbbb");
  std::string error;
  const std::vector<std::byte> ra = randomRecord(50, 1);
  ASSERT_TRUE(a.put(1, ra, error)) << error;
  const uint64_t keys[] = {1};
  EXPECT_EQ(b.contains(keys), std::vector<uint8_t>{0});
  EXPECT_EQ(b.get(1).status, Fetched::Status::Missing);
  // b's put of the same key is its own record, not "already held".
  const std::vector<std::byte> rb = randomRecord(50, 2);
  ASSERT_TRUE(b.put(1, rb, error)) << error;
  EXPECT_EQ(a.get(1).bytes, ra);
  EXPECT_EQ(b.get(1).bytes, rb);
}

TEST_F(RedisStoreTest, KeyIsPrefixNamespaceAndHex) {
  RedisOptions o = options();
  o.keyPrefix = "myprefix";
  RedisStore store(o, "0123abcd");
  EXPECT_EQ(store.redisKey(0x1234), "myprefix:0123abcd:0000000000001234");
  EXPECT_EQ(store.redisKey(~0ull), "myprefix:0123abcd:ffffffffffffffff");
  std::string error;
  ASSERT_TRUE(store.put(0x1234, randomRecord(10, 1), error)) << error;
  RawClient raw(port_);
  EXPECT_EQ(raw.integer({"EXISTS", "myprefix:0123abcd:0000000000001234"}), 1);
}

TEST_F(RedisStoreTest, RemoveDropsTheRecord) {
  RedisStore store(options(), "ns");
  std::string error;
  ASSERT_TRUE(store.put(7, randomRecord(10, 1), error)) << error;
  store.remove(7);
  const uint64_t keys[] = {7};
  EXPECT_EQ(store.contains(keys), std::vector<uint8_t>{0});
  EXPECT_EQ(store.get(7).status, Fetched::Status::Missing);
  store.remove(7);  // none: a no-op
  EXPECT_TRUE(store.up());
}

TEST_F(RedisStoreTest, UsesTheUrlsDatabase) {
  RedisOptions o = options();
  o.url = url("/3");
  RedisStore store(o, "ns");
  ASSERT_TRUE(store.up());
  std::string error;
  ASSERT_TRUE(store.put(1, randomRecord(10, 1), error)) << error;
  RawClient raw(port_);
  EXPECT_EQ(raw.integer({"EXISTS", store.redisKey(1)}), 0);
  ASSERT_TRUE(raw.run({"SELECT", "3"}));
  EXPECT_EQ(raw.integer({"EXISTS", store.redisKey(1)}), 1);
}

TEST_F(RedisStoreTest, ErrorReplyFailsButKeepsTheConnection) {
  RedisStore store(options(), "ns");
  RawClient raw(port_);
  ASSERT_TRUE(raw.run({"LPUSH", store.redisKey(1), "not a record"}));
  const Fetched f = store.get(1);
  EXPECT_EQ(f.status, Fetched::Status::Failed);
  EXPECT_NE(f.error.find("WRONGTYPE"), std::string::npos) << f.error;
  EXPECT_TRUE(store.up());
  std::string error;
  EXPECT_TRUE(store.put(2, randomRecord(10, 2), error)) << error;
  EXPECT_EQ(store.get(2).status, Fetched::Status::Found);
}

TEST_F(RedisStoreTest, RejectsBadOptions) {
  RedisOptions o = options();
  o.ttlSeconds = -1;
  EXPECT_THROW(RedisStore(o, "ns"), std::invalid_argument);
  o = options();
  o.timeout = milliseconds(0);
  EXPECT_THROW(RedisStore(o, "ns"), std::invalid_argument);
  o = options();
  o.url = "rediss://127.0.0.1";
  EXPECT_THROW(RedisStore(o, "ns"), std::invalid_argument);
}

TEST_F(RedisStoreTest, KilledServerFailsFastWithoutThrowing) {
  RedisStore store(options(), "ns");
  std::string error;
  ASSERT_TRUE(store.put(1, randomRecord(1000, 1), error)) << error;
  server_.stop(SIGKILL);

  auto start = Clock::now();
  const Fetched f = store.get(1);
  EXPECT_EQ(f.status, Fetched::Status::Failed);
  EXPECT_NE(f.error.find("Redis"), std::string::npos) << f.error;
  EXPECT_LT(Clock::now() - start, kTimeout + milliseconds(1000));
  EXPECT_FALSE(store.up());

  // Within the retry delay every call fails at once, saying why.
  start = Clock::now();
  EXPECT_FALSE(store.put(2, randomRecord(300 * 1024, 2), error));
  EXPECT_NE(error.find("Redis at 127.0.0.1:" + std::to_string(port_)), std::string::npos)
      << error;
  const uint64_t keys[] = {1, 2};
  EXPECT_EQ(store.contains(keys), (std::vector<uint8_t>{0, 0}));
  store.remove(1);
  EXPECT_LT(Clock::now() - start, kTimeout + milliseconds(1000));

  // After it, a reconnect is tried, and fails just as quickly (the port is closed).
  pastRetryDelay();
  start = Clock::now();
  EXPECT_EQ(store.get(1).status, Fetched::Status::Failed);
  EXPECT_FALSE(store.put(2, randomRecord(10, 2), error));
  EXPECT_NE(error.find("Redis"), std::string::npos) << error;
  EXPECT_LT(Clock::now() - start, kTimeout + milliseconds(1000));
  EXPECT_FALSE(store.up());
}

TEST_F(RedisStoreTest, ReconnectsAfterARestart) {
  RedisStore store(options(), "ns");
  std::string error;
  ASSERT_TRUE(store.put(1, randomRecord(10, 1), error)) << error;
  server_.stop(SIGKILL);
  EXPECT_EQ(store.get(1).status, Fetched::Status::Failed);
  EXPECT_FALSE(store.up());

  startServer();
  pastRetryDelay();
  const std::vector<std::byte> record = randomRecord(5000, 2);
  EXPECT_TRUE(store.put(2, record, error)) << error;
  EXPECT_TRUE(store.up());
  EXPECT_EQ(store.get(2).bytes, record);
  EXPECT_EQ(store.get(1).status, Fetched::Status::Missing);  // the new server starts empty
}

TEST_F(RedisStoreTest, StartsDownAndComesUpWhenTheServerDoes) {
  server_.stop();
  const auto start = Clock::now();
  RedisStore store(options(), "ns");
  EXPECT_FALSE(store.up());
  const Fetched f = store.get(1);
  EXPECT_EQ(f.status, Fetched::Status::Failed);
  EXPECT_NE(f.error.find("Redis"), std::string::npos) << f.error;
  std::string error;
  EXPECT_FALSE(store.put(1, randomRecord(10, 1), error));
  EXPECT_NE(error.find("cannot connect"), std::string::npos) << error;
  EXPECT_LT(Clock::now() - start, kTimeout + milliseconds(1000));

  startServer();
  pastRetryDelay();
  EXPECT_TRUE(store.put(1, randomRecord(10, 1), error)) << error;
  EXPECT_TRUE(store.up());
  EXPECT_EQ(store.get(1).status, Fetched::Status::Found);
}

TEST_F(RedisStoreTest, HungServerTimesOut) {
  RedisStore store(options(), "ns");
  std::string error;
  ASSERT_TRUE(store.put(1, randomRecord(10, 1), error)) << error;
  server_.pause();
  const auto start = Clock::now();
  const Fetched f = store.get(1);
  const auto took = Clock::now() - start;
  EXPECT_EQ(f.status, Fetched::Status::Failed);
  EXPECT_NE(f.error.find("timed out"), std::string::npos) << f.error;
  EXPECT_GE(took, kTimeout - milliseconds(50));
  EXPECT_LT(took, kTimeout + milliseconds(1000));
  EXPECT_FALSE(store.up());

  server_.resume();
  pastRetryDelay();
  EXPECT_EQ(store.get(1).status, Fetched::Status::Found);
  EXPECT_TRUE(store.up());
}

TEST_F(RedisStoreTest, PasswordProtectedServer) {
  server_.stop();
  startServer({"--requirepass", "s3cret"});
  RedisOptions o = options();
  std::string error;

  o.url = url().insert(8, ":s3cret@");
  {
    RedisStore store(o, "ns");
    EXPECT_TRUE(store.up());
    const std::vector<std::byte> record = randomRecord(100, 1);
    ASSERT_TRUE(store.put(1, record, error)) << error;
    EXPECT_EQ(store.get(1).bytes, record);
  }
  o.url = url().insert(8, "default:s3cret@");
  {
    RedisStore store(o, "ns");
    EXPECT_TRUE(store.up());
    EXPECT_EQ(store.get(1).status, Fetched::Status::Found);
  }
  o.url = url().insert(8, ":badpass99@");
  {
    RedisStore store(o, "ns");
    EXPECT_FALSE(store.up());
    EXPECT_FALSE(store.put(2, randomRecord(10, 2), error));
    EXPECT_NE(lower(error).find("auth"), std::string::npos) << error;
    EXPECT_EQ(error.find("badpass99"), std::string::npos) << "the message shows the password";
    EXPECT_EQ(store.get(1).status, Fetched::Status::Failed);
  }
  o.url = url();  // no password: the server refuses the PING
  {
    RedisStore store(o, "ns");
    EXPECT_FALSE(store.up());
    EXPECT_FALSE(store.put(2, randomRecord(10, 2), error));
    EXPECT_NE(lower(error).find("auth"), std::string::npos) << error;
  }
}

}  // namespace
}  // namespace cortex::kvtier
