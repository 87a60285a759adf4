#include "server/kv_event_publisher.h"

#include <chrono>
#include <exception>
#include <iostream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <utility>

#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

namespace cortex::server {

namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

void packStr(Packer& pk, const std::string& s) {
  pk.pack_str(static_cast<uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}

void packHashes(Packer& pk, const std::vector<uint64_t>& hashes) {
  pk.pack_array(static_cast<uint32_t>(hashes.size()));
  for (uint64_t h : hashes) pk.pack_uint64(h);
}

// vLLM's event structs are tagged maps that leave out optional fields still at their default,
// keys in declaration order after the tag. The fields without a default (lora_id, lora_name) are
// always there, as nil: we serve no adapters. group_idx is vLLM's KV cache group; a model with one
// kind of attention layer has the single group 0, and vLLM sends that 0 explicitly.
void packEvent(Packer& pk, const kv::KVEvent& e, const std::string& medium) {
  switch (e.kind) {
    case kv::KVEvent::Kind::BlockStored:
      pk.pack_map(9);
      packStr(pk, "type");
      packStr(pk, "BlockStored");
      packStr(pk, "block_hashes");
      packHashes(pk, e.blockHashes);
      packStr(pk, "parent_block_hash");
      if (e.parentHash) {
        pk.pack_uint64(*e.parentHash);
      } else {
        pk.pack_nil();
      }
      packStr(pk, "token_ids");
      pk.pack_array(static_cast<uint32_t>(e.tokenIds.size()));
      for (int32_t t : e.tokenIds) pk.pack_int32(t);
      packStr(pk, "block_size");
      pk.pack_int32(e.blockSizeTokens);
      packStr(pk, "lora_id");
      pk.pack_nil();
      packStr(pk, "medium");
      packStr(pk, medium);
      packStr(pk, "lora_name");
      pk.pack_nil();
      packStr(pk, "group_idx");
      pk.pack_int32(0);
      return;
    case kv::KVEvent::Kind::BlockRemoved:
      pk.pack_map(4);
      packStr(pk, "type");
      packStr(pk, "BlockRemoved");
      packStr(pk, "block_hashes");
      packHashes(pk, e.blockHashes);
      packStr(pk, "medium");
      packStr(pk, medium);
      packStr(pk, "group_idx");
      pk.pack_int32(0);
      return;
    case kv::KVEvent::Kind::AllBlocksCleared:
      pk.pack_map(1);
      packStr(pk, "type");
      packStr(pk, "AllBlocksCleared");
      return;
  }
  throw std::logic_error("unknown KV event kind");
}

std::string seqBytes(uint64_t seq) {
  std::string b(8, '\0');
  for (int i = 7; i >= 0; --i, seq >>= 8) b[static_cast<size_t>(i)] = static_cast<char>(seq & 0xff);
  return b;
}

// ZeroMQ's own wording ("Address already in use", "Invalid argument") with the endpoint, so the
// operator sees which of the two flags is at fault.
void bindOrThrow(zmq::socket_t& socket, const std::string& endpoint, const char* what) {
  if (endpoint.empty()) throw std::runtime_error(std::string(what) + ": empty endpoint");
  try {
    socket.bind(endpoint);
  } catch (const zmq::error_t& e) {
    throw std::runtime_error(std::string(what) + " '" + endpoint + "': cannot bind: " + e.what() +
                             " (expected e.g. tcp://127.0.0.1:5557, tcp://*:5557 or ipc://PATH)");
  }
}

}  // namespace

std::string encodeKVEventBatch(double ts, const std::vector<kv::KVEvent>& events,
                               const std::string& medium, int32_t dataParallelRank) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  // The batch is vLLM's array-like struct: its fields by position, none left out.
  pk.pack_array(3);
  pk.pack_double(ts);
  pk.pack_array(static_cast<uint32_t>(events.size()));
  for (const kv::KVEvent& e : events) packEvent(pk, e, medium);
  pk.pack_int32(dataParallelRank);
  return std::string(buf.data(), buf.size());
}

struct KVEventPublisher::Sockets {
  zmq::context_t context{1};
  zmq::socket_t pub{context, zmq::socket_type::pub};
  std::optional<zmq::socket_t> replay;
};

KVEventPublisher::KVEventPublisher(KVEventPublisherConfig config)
    : config_(std::move(config)), sockets_(std::make_unique<Sockets>()) {
  if (config_.maxQueuedBatches == 0) {
    throw std::runtime_error("KV events: the queue must hold at least one batch");
  }
  // The destructor waits this long for subscribers to take what was sent last.
  sockets_->pub.set(zmq::sockopt::linger, 1000);
  sockets_->pub.set(zmq::sockopt::sndhwm, config_.sendHighWaterMark);
  bindOrThrow(sockets_->pub, config_.endpoint, "KV events endpoint");
  endpoint_ = sockets_->pub.get(zmq::sockopt::last_endpoint);
  if (!config_.replayEndpoint.empty()) {
    sockets_->replay.emplace(sockets_->context, zmq::socket_type::router);
    sockets_->replay->set(zmq::sockopt::linger, 0);  // a replay is only worth it while asked for
    bindOrThrow(*sockets_->replay, config_.replayEndpoint, "KV events replay endpoint");
    replayEndpoint_ = sockets_->replay->get(zmq::sockopt::last_endpoint);
  }
  thread_ = std::thread([this] { run(); });
}

KVEventPublisher::~KVEventPublisher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_one();
  thread_.join();
  sockets_.reset();  // closes the sockets; the context waits out the PUB socket's linger
}

void KVEventPublisher::publish(std::vector<kv::KVEvent>&& events) {
  if (events.empty()) return;
  const double ts =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  {
    std::lock_guard<std::mutex> lock(mu_);
    while (queue_.size() >= config_.maxQueuedBatches) {
      queue_.pop_front();
      dropped_.fetch_add(1);
    }
    queue_.push_back(Batch{nextSeq_++, ts, std::move(events)});
  }
  cv_.notify_one();
}

void KVEventPublisher::run() {
  const std::string& topic = config_.topic;
  std::deque<Batch> work;
  for (;;) {
    bool stopping = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      const auto ready = [&] { return stop_ || !queue_.empty(); };
      // With a replay socket to watch, wake up now and then to answer it.
      if (sockets_->replay) {
        cv_.wait_for(lock, std::chrono::milliseconds(50), ready);
      } else {
        cv_.wait(lock, ready);
      }
      work.swap(queue_);
      stopping = stop_;
    }
    for (Batch& b : work) {
      try {
        std::string payload = encodeKVEventBatch(b.ts, b.events, config_.medium,
                                                 config_.dataParallelRank);
        const std::string seq = seqBytes(b.seq);
        // A PUB socket never blocks: at the high-water mark ZeroMQ drops the message for that
        // subscriber, which then sees a gap in the sequence numbers.
        zmq::socket_t& pub = sockets_->pub;
        (void)pub.send(zmq::buffer(topic), zmq::send_flags::sndmore);
        (void)pub.send(zmq::buffer(seq), zmq::send_flags::sndmore);
        (void)pub.send(zmq::buffer(payload), zmq::send_flags::none);
        sent_.fetch_add(1);
        if (sockets_->replay) {
          replayBuffer_.emplace_back(b.seq, std::move(payload));
          while (replayBuffer_.size() > config_.replayBufferBatches) replayBuffer_.pop_front();
        }
      } catch (const std::exception& e) {
        // Losing a batch is what subscribers already handle (a gap); stopping would lose them all.
        dropped_.fetch_add(1);
        std::cerr << "warning: KV events: batch " << b.seq << " not sent: " << e.what() << "\n";
      }
    }
    work.clear();
    if (sockets_->replay) {
      try {
        serviceReplay();
      } catch (const std::exception& e) {
        std::cerr << "warning: KV events replay: " << e.what() << "\n";
      }
    }
    if (stopping) {
      std::lock_guard<std::mutex> lock(mu_);
      if (queue_.empty()) return;
    }
  }
}

void KVEventPublisher::serviceReplay() {
  zmq::socket_t& router = *sockets_->replay;
  for (;;) {
    std::vector<zmq::message_t> request;
    if (!zmq::recv_multipart(router, std::back_inserter(request), zmq::recv_flags::dontwait)) {
      return;  // nothing asked
    }
    // (client identity, [empty delimiter,] 8-byte start sequence); anything else is ignored.
    if (request.size() < 2 || request.back().size() != 8) continue;
    const auto* p = static_cast<const unsigned char*>(request.back().data());
    uint64_t start = 0;
    for (int i = 0; i < 8; ++i) start = (start << 8) | p[i];
    const std::string identity = request.front().to_string();
    const auto reply = [&](const std::string& topic, const std::string& seq,
                           const std::string& payload) {
      // A ROUTER socket drops what it cannot deliver (client gone, or its queue full); it never
      // blocks.
      (void)router.send(zmq::buffer(identity), zmq::send_flags::sndmore);
      (void)router.send(zmq::message_t(), zmq::send_flags::sndmore);
      (void)router.send(zmq::buffer(topic), zmq::send_flags::sndmore);
      (void)router.send(zmq::buffer(seq), zmq::send_flags::sndmore);
      (void)router.send(zmq::buffer(payload), zmq::send_flags::none);
    };
    for (const auto& [seq, payload] : replayBuffer_) {
      if (seq >= start) reply(config_.topic, seqBytes(seq), payload);
    }
    reply("", std::string(8, '\xff'), "");  // end marker: sequence -1
  }
}

}  // namespace cortex::server
