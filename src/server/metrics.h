// /metrics: the engine's statistics in the Prometheus text exposition format (version 0.0.4).
// Names follow vLLM's where one exists, with the prefix "cortexstream:".
#pragma once

#include <string>

#include "engine/engine.h"

namespace cortex::server {

// Everything /metrics shows besides EngineStats: what only the HTTP layer knows.
struct ServerCounters {
  uint64_t httpRequests = 0;       // requests routed to a handler
  uint64_t httpErrors = 0;         // responses with status >= 400
  uint64_t rejectedQueueFull = 0;  // submissions refused because the queue was full
  int64_t openConnections = 0;     // HTTP connections open now
  uint64_t rejectedConnections = 0;  // connections refused past the connection cap
};

// The exposition text (ends with a newline). servedModel labels the model_name of each sample.
std::string renderPrometheus(const engine::EngineStats& stats, const ServerCounters& counters,
                             const std::string& servedModel);

}  // namespace cortex::server
