// KVEventPublisher: the payload bytes against what vLLM's msgspec encoder produces for the same
// events, and the messages a real ZeroMQ subscriber receives: frames, topic, sequence numbers,
// every decoded field, replay, the flush on destruction, and the refusal of bad endpoints.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "server/kv_event_publisher.h"

namespace cortex::server {
namespace {

using kv::KVEvent;
using Clock = std::chrono::steady_clock;

KVEvent stored(std::vector<uint64_t> hashes, std::optional<uint64_t> parent,
               std::vector<int32_t> tokens, int32_t blockSize) {
  KVEvent e;
  e.kind = KVEvent::Kind::BlockStored;
  e.blockHashes = std::move(hashes);
  e.parentHash = parent;
  e.tokenIds = std::move(tokens);
  e.blockSizeTokens = blockSize;
  return e;
}

KVEvent removed(std::vector<uint64_t> hashes) {
  KVEvent e;
  e.kind = KVEvent::Kind::BlockRemoved;
  e.blockHashes = std::move(hashes);
  return e;
}

KVEvent cleared() {
  KVEvent e;
  e.kind = KVEvent::Kind::AllBlocksCleared;
  return e;
}

std::string hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

// The bytes msgspec 0.22 gives vLLM's KVEventBatch(ts=1700000000.25, data_parallel_rank=0) of:
// BlockStored([1, 2^64-1], parent None, tokens [1, 2, 300, 70000], block_size 2),
// BlockStored([2^63], parent 2^64-1, tokens [-1, 127, 128, -33], block_size 4),
// BlockRemoved([5, 2^32]), AllBlocksCleared(); medium "CPU", group_idx 0, no LoRA.
constexpr const char* kVllmBatchHex =
    "93cb41d954fc401000009489a474797065ab426c6f636b53746f726564ac626c6f636b5f6861736865739201"
    "cfffffffffffffffffb1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f696473940102cd012c"
    "ce00011170aa626c6f636b5f73697a6502a76c6f72615f6964c0a66d656469756da3435055a96c6f72615f6e"
    "616d65c0a967726f75705f6964780089a474797065ab426c6f636b53746f726564ac626c6f636b5f68617368"
    "657391cf8000000000000000b1706172656e745f626c6f636b5f68617368cfffffffffffffffffa9746f6b65"
    "6e5f69647394ff7fcc80d0dfaa626c6f636b5f73697a6504a76c6f72615f6964c0a66d656469756da3435055"
    "a96c6f72615f6e616d65c0a967726f75705f6964780084a474797065ac426c6f636b52656d6f766564ac626c"
    "6f636b5f6861736865739205cf0000000100000000a66d656469756da3435055a967726f75705f6964780081"
    "a474797065b0416c6c426c6f636b73436c656172656400";

TEST(KVEventPublisher, PayloadIsByteForByteWhatVllmSends) {
  const std::vector<KVEvent> events = {
      stored({1, UINT64_MAX}, std::nullopt, {1, 2, 300, 70000}, 2),
      stored({uint64_t{1} << 63}, UINT64_MAX, {-1, 127, 128, -33}, 4),
      removed({5, uint64_t{1} << 32}),
      cleared(),
  };
  EXPECT_EQ(hex(encodeKVEventBatch(1700000000.25, events, "CPU", 0)), kVllmBatchHex);
  // KVEventBatch(ts=0.5, events=[AllBlocksCleared()], data_parallel_rank=3)
  EXPECT_EQ(hex(encodeKVEventBatch(0.5, {cleared()}, "CPU", 3)),
            "93cb3fe00000000000009181a474797065b0416c6c426c6f636b73436c656172656403");
}

// One received message: (topic, sequence, payload).
struct Message {
  std::string topic;
  uint64_t seq = 0;
  std::string payload;
};

uint64_t beU64(const std::string& b) {
  if (b.size() != 8) throw std::runtime_error("sequence frame of " + std::to_string(b.size()));
  uint64_t v = 0;
  for (unsigned char c : b) v = (v << 8) | c;
  return v;
}

// Waits up to the socket's receive timeout; nullopt when nothing came.
std::optional<std::vector<std::string>> recvFrames(zmq::socket_t& s) {
  std::vector<zmq::message_t> parts;
  if (!zmq::recv_multipart(s, std::back_inserter(parts))) return std::nullopt;
  std::vector<std::string> out;
  for (const auto& p : parts) out.push_back(p.to_string());
  return out;
}

std::optional<Message> recvMessage(zmq::socket_t& sub) {
  auto frames = recvFrames(sub);
  if (!frames) return std::nullopt;
  if (frames->size() != 3) throw std::runtime_error("expected 3 frames");
  return Message{(*frames)[0], beU64((*frames)[1]), (*frames)[2]};
}

// ZeroMQ's slow joiner: what a PUB socket sends before a subscription has reached it is lost.
// Publishes one-event probe batches until the subscriber gets one, then reads up to the last
// probe, so the next batch published is the next message received. Returns that batch's
// sequence number.
uint64_t joinSubscriber(KVEventPublisher& pub, zmq::socket_t& sub) {
  sub.set(zmq::sockopt::rcvtimeo, 20);
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  uint64_t probes = 0;
  std::optional<Message> m;
  while (!m) {
    if (Clock::now() > deadline) throw std::runtime_error("the subscriber never joined");
    pub.publish({cleared()});
    ++probes;
    m = recvMessage(sub);
  }
  sub.set(zmq::sockopt::rcvtimeo, 5000);
  while (m->seq != probes - 1) {
    m = recvMessage(sub);
    if (!m) throw std::runtime_error("a probe after the first one received was lost");
  }
  return probes;
}

// The decoded payload, checked for the parts every batch shares.
struct Decoded {
  msgpack::object_handle handle;
  const msgpack::object& events() const { return handle.get().via.array.ptr[1]; }
};

Decoded decode(const std::string& payload) {
  Decoded d{msgpack::unpack(payload.data(), payload.size())};
  const msgpack::object& batch = d.handle.get();
  EXPECT_EQ(batch.type, msgpack::type::ARRAY);
  EXPECT_EQ(batch.via.array.size, 3u);
  EXPECT_EQ(batch.via.array.ptr[0].type, msgpack::type::FLOAT64);
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  EXPECT_NEAR(batch.via.array.ptr[0].via.f64, now, 30.0);  // stamped when published
  EXPECT_EQ(batch.via.array.ptr[1].type, msgpack::type::ARRAY);
  EXPECT_EQ(batch.via.array.ptr[2].type, msgpack::type::POSITIVE_INTEGER);
  EXPECT_EQ(batch.via.array.ptr[2].via.u64, 0u);  // data_parallel_rank
  return d;
}

std::string str(const msgpack::object& o) {
  EXPECT_EQ(o.type, msgpack::type::STR);
  return std::string(o.via.str.ptr, o.via.str.size);
}

// A map's keys in order, and the value of each.
std::vector<std::pair<std::string, const msgpack::object*>> fields(const msgpack::object& o) {
  EXPECT_EQ(o.type, msgpack::type::MAP);
  std::vector<std::pair<std::string, const msgpack::object*>> out;
  for (uint32_t i = 0; i < o.via.map.size; ++i) {
    out.emplace_back(str(o.via.map.ptr[i].key), &o.via.map.ptr[i].val);
  }
  return out;
}

std::vector<std::string> keys(const msgpack::object& o) {
  std::vector<std::string> out;
  for (const auto& [k, v] : fields(o)) out.push_back(k);
  return out;
}

const msgpack::object& field(const msgpack::object& o, const std::string& key) {
  for (const auto& [k, v] : fields(o)) {
    if (k == key) return *v;
  }
  throw std::runtime_error("no field " + key);
}

std::vector<uint64_t> uints(const msgpack::object& o) {
  EXPECT_EQ(o.type, msgpack::type::ARRAY);
  std::vector<uint64_t> out;
  for (uint32_t i = 0; i < o.via.array.size; ++i) {
    EXPECT_EQ(o.via.array.ptr[i].type, msgpack::type::POSITIVE_INTEGER);
    out.push_back(o.via.array.ptr[i].via.u64);
  }
  return out;
}

std::vector<int64_t> ints(const msgpack::object& o) {
  EXPECT_EQ(o.type, msgpack::type::ARRAY);
  std::vector<int64_t> out;
  for (uint32_t i = 0; i < o.via.array.size; ++i) out.push_back(o.via.array.ptr[i].as<int64_t>());
  return out;
}

struct Subscriber {
  zmq::context_t context{1};
  zmq::socket_t sub{context, zmq::socket_type::sub};
  explicit Subscriber(const std::string& endpoint, const std::string& topic = "") {
    sub.set(zmq::sockopt::linger, 0);
    sub.set(zmq::sockopt::subscribe, topic);
    sub.connect(endpoint);
  }
};

KVEventPublisherConfig loopback() {
  KVEventPublisherConfig c;
  c.endpoint = "tcp://127.0.0.1:*";
  return c;
}

TEST(KVEventPublisher, SubscriberDecodesEveryFieldInOrder) {
  KVEventPublisherConfig config = loopback();
  config.topic = "kv@cortex@model";
  KVEventPublisher pub(config);
  ASSERT_NE(pub.endpoint().find("tcp://127.0.0.1:"), std::string::npos) << pub.endpoint();
  Subscriber s(pub.endpoint(), "kv@");
  const uint64_t first = joinSubscriber(pub, s.sub);

  pub.publish({stored({11, UINT64_MAX}, std::nullopt, {1, 2, 3, 4}, 2),
               stored({13}, uint64_t{12}, {-1, 70000}, 2)});
  pub.publish({removed({11, uint64_t{1} << 63})});
  pub.publish({cleared()});
  pub.publish({});  // nothing changed: no message, no sequence number

  std::vector<Message> got;
  for (int i = 0; i < 3; ++i) {
    auto m = recvMessage(s.sub);
    ASSERT_TRUE(m) << "message " << i << " did not arrive";
    got.push_back(*m);
  }
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].topic, "kv@cortex@model");
    EXPECT_EQ(got[i].seq, first + i);
  }

  {
    const Decoded d = decode(got[0].payload);
    ASSERT_EQ(d.events().via.array.size, 2u);
    const msgpack::object& a = d.events().via.array.ptr[0];
    EXPECT_EQ(keys(a), (std::vector<std::string>{"type", "block_hashes", "parent_block_hash",
                                                 "token_ids", "block_size", "lora_id", "medium",
                                                 "lora_name", "group_idx"}));
    EXPECT_EQ(str(field(a, "type")), "BlockStored");
    EXPECT_EQ(uints(field(a, "block_hashes")), (std::vector<uint64_t>{11, UINT64_MAX}));
    EXPECT_TRUE(field(a, "parent_block_hash").is_nil());
    EXPECT_EQ(ints(field(a, "token_ids")), (std::vector<int64_t>{1, 2, 3, 4}));
    EXPECT_EQ(field(a, "block_size").as<int64_t>(), 2);
    EXPECT_TRUE(field(a, "lora_id").is_nil());
    EXPECT_EQ(str(field(a, "medium")), "CPU");
    EXPECT_TRUE(field(a, "lora_name").is_nil());
    EXPECT_EQ(field(a, "group_idx").as<int64_t>(), 0);

    const msgpack::object& b = d.events().via.array.ptr[1];
    EXPECT_EQ(uints(field(b, "block_hashes")), (std::vector<uint64_t>{13}));
    ASSERT_EQ(field(b, "parent_block_hash").type, msgpack::type::POSITIVE_INTEGER);
    EXPECT_EQ(field(b, "parent_block_hash").via.u64, 12u);
    EXPECT_EQ(ints(field(b, "token_ids")), (std::vector<int64_t>{-1, 70000}));
  }
  {
    const Decoded d = decode(got[1].payload);
    ASSERT_EQ(d.events().via.array.size, 1u);
    const msgpack::object& e = d.events().via.array.ptr[0];
    EXPECT_EQ(keys(e), (std::vector<std::string>{"type", "block_hashes", "medium", "group_idx"}));
    EXPECT_EQ(str(field(e, "type")), "BlockRemoved");
    EXPECT_EQ(uints(field(e, "block_hashes")), (std::vector<uint64_t>{11, uint64_t{1} << 63}));
    EXPECT_EQ(str(field(e, "medium")), "CPU");
    EXPECT_EQ(field(e, "group_idx").as<int64_t>(), 0);
  }
  {
    const Decoded d = decode(got[2].payload);
    ASSERT_EQ(d.events().via.array.size, 1u);
    const msgpack::object& e = d.events().via.array.ptr[0];
    EXPECT_EQ(keys(e), (std::vector<std::string>{"type"}));
    EXPECT_EQ(str(field(e, "type")), "AllBlocksCleared");
  }
  s.sub.set(zmq::sockopt::rcvtimeo, 100);
  EXPECT_FALSE(recvMessage(s.sub)) << "the empty batch was sent";
  EXPECT_EQ(pub.droppedBatches(), 0u);
}

TEST(KVEventPublisher, DestructorSendsWhatIsQueued) {
  auto pub = std::make_unique<KVEventPublisher>(loopback());
  Subscriber s(pub->endpoint());
  const uint64_t first = joinSubscriber(*pub, s.sub);
  constexpr int kBatches = 200;
  for (int i = 0; i < kBatches; ++i) pub->publish({removed({static_cast<uint64_t>(i)})});
  pub.reset();  // most of the batches are still queued
  for (int i = 0; i < kBatches; ++i) {
    auto m = recvMessage(s.sub);
    ASSERT_TRUE(m) << "batch " << i << " was lost";
    EXPECT_EQ(m->seq, first + static_cast<uint64_t>(i));
    const Decoded d = decode(m->payload);
    EXPECT_EQ(uints(field(d.events().via.array.ptr[0], "block_hashes")),
              (std::vector<uint64_t>{static_cast<uint64_t>(i)}));
  }
}

TEST(KVEventPublisher, ReplayResendsBufferedBatchesFromASequenceNumber) {
  KVEventPublisherConfig config = loopback();
  config.replayEndpoint = "tcp://127.0.0.1:*";
  config.topic = "t";
  config.replayBufferBatches = 4;
  KVEventPublisher pub(config);
  for (uint64_t i = 0; i < 6; ++i) pub.publish({removed({100 + i})});
  // Sent batches 0..5; the buffer keeps 2..5.
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (pub.sentBatches() < 6) {
    ASSERT_LT(Clock::now(), deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }

  zmq::context_t context{1};
  zmq::socket_t dealer{context, zmq::socket_type::dealer};
  dealer.set(zmq::sockopt::linger, 0);
  dealer.set(zmq::sockopt::rcvtimeo, 5000);
  dealer.connect(pub.replayEndpoint());
  const std::string start("\0\0\0\0\0\0\0\3", 8);
  (void)dealer.send(zmq::message_t(), zmq::send_flags::sndmore);
  (void)dealer.send(zmq::buffer(start), zmq::send_flags::none);
  for (uint64_t seq = 3; seq < 6; ++seq) {
    auto frames = recvFrames(dealer);
    ASSERT_TRUE(frames) << "replay of " << seq << " did not arrive";
    ASSERT_EQ(frames->size(), 4u);
    EXPECT_EQ((*frames)[0], "");
    EXPECT_EQ((*frames)[1], "t");
    EXPECT_EQ(beU64((*frames)[2]), seq);
    const Decoded d = decode((*frames)[3]);
    EXPECT_EQ(uints(field(d.events().via.array.ptr[0], "block_hashes")),
              (std::vector<uint64_t>{100 + seq}));
  }
  auto end = recvFrames(dealer);
  ASSERT_TRUE(end);
  EXPECT_EQ(*end, (std::vector<std::string>{"", "", std::string(8, '\xff'), ""}));

  // From before the oldest buffered batch: what is left, from 2.
  (void)dealer.send(zmq::message_t(), zmq::send_flags::sndmore);
  (void)dealer.send(zmq::buffer(std::string(8, '\0')), zmq::send_flags::none);
  auto oldest = recvFrames(dealer);
  ASSERT_TRUE(oldest);
  ASSERT_EQ(oldest->size(), 4u);
  EXPECT_EQ(beU64((*oldest)[2]), 2u);
}

void expectRefused(const std::string& endpoint, const std::string& replayEndpoint = "") {
  KVEventPublisherConfig config;
  config.endpoint = endpoint;
  config.replayEndpoint = replayEndpoint;
  const std::string& named = replayEndpoint.empty() ? endpoint : replayEndpoint;
  try {
    KVEventPublisher pub(config);
    ADD_FAILURE() << "'" << endpoint << "' / '" << replayEndpoint << "' was accepted";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'" + named + "'"), std::string::npos) << e.what();
  }
}

TEST(KVEventPublisher, BadEndpointsThrowNamingTheEndpoint) {
  expectRefused("not-an-endpoint");
  expectRefused("tcp://127.0.0.1:notaport");
  expectRefused("udp://127.0.0.1:5557");
  KVEventPublisher taken(loopback());
  expectRefused(taken.endpoint());  // address in use
  expectRefused("tcp://127.0.0.1:*", taken.endpoint());
  KVEventPublisherConfig empty;
  EXPECT_THROW(KVEventPublisher{empty}, std::runtime_error);
}

}  // namespace
}  // namespace cortex::server
