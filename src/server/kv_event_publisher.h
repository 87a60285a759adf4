// KVEventPublisher: sends the prefix cache's events (kv/kv_events.h) to KV-aware routers over a
// ZeroMQ PUB socket, in the wire shape vLLM publishes, so a router written for vLLM can follow a
// CortexStream server without changes.
//
// Every batch (the events of one engine step) is one three-frame message:
//   topic (config.topic, "" by default) | sequence number (8 bytes, big-endian, from 0, one per
//   batch) | msgpack payload (encodeKVEventBatch below).
// A subscriber that sees a gap in the sequence numbers has lost batches (ours: the queue
// overflowed; ZeroMQ's: the PUB socket's high-water mark was reached for a slow subscriber) and
// should rebuild its view, or ask the replay socket for what it missed.
//
// Replay (optional, config.replayEndpoint): a ROUTER socket that answers a request whose last
// frame is an 8-byte big-endian sequence number with every batch still buffered from that number
// on, each as (empty frame, topic, sequence, payload), then an end marker (empty frame, empty
// topic, sequence -1, empty payload). A DEALER client sends (empty frame, sequence).
//
// Threads: publish() is called on the engine's step loop and must not block, so it only takes a
// lock long enough to append to a bounded queue; one background thread owns the sockets, encodes
// and sends.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kv/kv_events.h"

namespace cortex::server {

struct KVEventPublisherConfig {
  // Where the PUB socket binds: "tcp://127.0.0.1:5557", "tcp://*:5557", "ipc:///tmp/kv.sock".
  // A port of "*" or 0 takes any free one (see KVEventPublisher::endpoint()).
  std::string endpoint;
  // Where the replay ROUTER socket binds; empty: no replay.
  std::string replayEndpoint;
  std::string topic;                  // first frame of every message
  size_t maxQueuedBatches = 1024;     // batches waiting for the sender before the oldest are dropped
  size_t replayBufferBatches = 10000; // sent batches kept for replay
  int sendHighWaterMark = 100000;     // messages ZeroMQ queues per subscriber before dropping
  // The storage tier every event reports. vLLM says "GPU" for blocks in device memory and "CPU"
  // for blocks offloaded to host memory; ours live in host memory. Routers that weigh tiers key
  // them on this string.
  std::string medium = "CPU";
  int32_t dataParallelRank = 0;       // the batch's third field; one engine is rank 0
};

// The msgpack payload of one batch, byte for byte what vLLM's msgspec encoder produces for a
// KVEventBatch with these events:
//   batch: array [ts (float64, seconds since the epoch), [event, ...], data_parallel_rank (int)]
//   BlockStored: map {"type": "BlockStored", "block_hashes": [uint, ...], "parent_block_hash":
//     uint | nil, "token_ids": [int, ...], "block_size": int, "lora_id": nil, "medium": str,
//     "lora_name": nil, "group_idx": 0}
//   BlockRemoved: map {"type": "BlockRemoved", "block_hashes": [uint, ...], "medium": str,
//     "group_idx": 0}
//   AllBlocksCleared: map {"type": "AllBlocksCleared"}
// Integers take msgpack's shortest form (non-negative ones unsigned), so a 64-bit hash at or above
// 2^63 is a uint64, never a negative number.
std::string encodeKVEventBatch(double ts, const std::vector<kv::KVEvent>& events,
                               const std::string& medium, int32_t dataParallelRank);

class KVEventPublisher {
 public:
  // Binds the sockets and starts the sender. Throws std::runtime_error naming the endpoint when
  // one cannot be bound (malformed, unknown transport or interface, address in use), so a server
  // given a bad endpoint refuses to start.
  explicit KVEventPublisher(KVEventPublisherConfig config);
  // Sends what is still queued, gives ZeroMQ up to one second to deliver it, and joins the sender.
  ~KVEventPublisher();
  KVEventPublisher(const KVEventPublisher&) = delete;
  KVEventPublisher& operator=(const KVEventPublisher&) = delete;

  // Queues one batch (timestamped and numbered now) and returns at once; an empty batch is
  // ignored. When maxQueuedBatches are already waiting, the oldest are dropped (and counted in
  // droppedBatches()): stale cache news is worth less than fresh, and the step loop must never
  // wait for the network. Their sequence numbers are never sent, so subscribers see the gap.
  void publish(std::vector<kv::KVEvent>&& events);

  // The endpoints as bound (a wildcard port resolved to the one chosen).
  const std::string& endpoint() const { return endpoint_; }
  const std::string& replayEndpoint() const { return replayEndpoint_; }

  uint64_t droppedBatches() const { return dropped_.load(); }  // lost to queue overflow
  uint64_t sentBatches() const { return sent_.load(); }        // handed to the PUB socket

 private:
  struct Batch {
    uint64_t seq = 0;
    double ts = 0;
    std::vector<kv::KVEvent> events;
  };
  struct Sockets;  // ZeroMQ lives in the .cpp only

  void run();
  void serviceReplay();

  const KVEventPublisherConfig config_;
  std::unique_ptr<Sockets> sockets_;
  std::string endpoint_, replayEndpoint_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Batch> queue_;
  uint64_t nextSeq_ = 0;
  bool stop_ = false;

  // Sender thread only: (sequence, payload) of the last replayBufferBatches batches sent.
  std::deque<std::pair<uint64_t, std::string>> replayBuffer_;

  std::atomic<uint64_t> dropped_{0}, sent_{0};
  std::thread thread_;
};

}  // namespace cortex::server
