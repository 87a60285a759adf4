#include "server/metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace cortex::server {

namespace {

// Label values escape backslash, double quote and newline.
std::string escapeLabel(const std::string& v) {
  std::string out;
  for (const char c : v) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string num(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // The shortest of %.15g / %.17g that reads back as the same double ("0.1", not
  // "0.10000000000000001").
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.15g", v);
  if (std::strtod(buf, nullptr) != v) std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

class Writer {
 public:
  explicit Writer(std::string labels) : labels_(std::move(labels)) {}

  void header(const std::string& name, const char* type, const char* help) {
    out_ << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
  }
  void sample(const std::string& name, double value, const std::string& extraLabels = {}) {
    out_ << name << '{' << labels_;
    if (!extraLabels.empty()) out_ << ',' << extraLabels;
    out_ << "} " << num(value) << '\n';
  }
  void metric(const std::string& name, const char* type, const char* help, double value) {
    header(name, type, help);
    sample(name, value);
  }
  void histogram(const std::string& name, const char* help, const engine::Histogram& h) {
    header(name, "histogram", help);
    // note: EngineStats histograms hold cumulative counts (counts[i] = observations <=
    // bounds[i]); the last entry is +Inf and equals count.
    for (size_t i = 0; i < h.bounds.size() && i < h.counts.size(); ++i) {
      sample(name + "_bucket", static_cast<double>(h.counts[i]), "le=\"" + num(h.bounds[i]) + "\"");
    }
    sample(name + "_bucket", static_cast<double>(h.count), "le=\"+Inf\"");
    sample(name + "_sum", h.sum);
    sample(name + "_count", static_cast<double>(h.count));
  }
  std::string str() const { return out_.str(); }

 private:
  std::string labels_;
  std::ostringstream out_;
};

// The tiers below the KV pool, one sample per tier (label tier="disk" / "redis").
void renderTiers(Writer& w, const engine::EngineStats& s) {
  const auto& tiers = s.tiers.tiers;
  auto perTier = [&](const std::string& name, const char* type, const char* help, auto value) {
    w.header(name, type, help);
    for (size_t t = 0; t < tiers.size(); ++t) {
      w.sample(name, static_cast<double>(value(t)), "tier=\"" + tiers[t].name + "\"");
    }
  };
  // Hits by where they came from: the pool itself, or a tier that loaded them back.
  uint64_t fromTiers = 0;
  for (uint64_t v : s.tierHitTokens) fromTiers += v;
  w.header("cortexstream:kv_hit_tokens_total", "counter",
           "Prompt tokens found cached at admission, by where their KV came from (pool, or a "
           "tier below it that loaded them back).");
  w.sample("cortexstream:kv_hit_tokens_total",
           static_cast<double>(s.prefixCacheHits - std::min(fromTiers, s.prefixCacheHits)),
           "tier=\"pool\"");
  for (size_t t = 0; t < tiers.size() && t < s.tierHitTokens.size(); ++t) {
    w.sample("cortexstream:kv_hit_tokens_total", static_cast<double>(s.tierHitTokens[t]),
             "tier=\"" + tiers[t].name + "\"");
  }
  perTier("cortexstream:kv_tier_up", "gauge", "1 when the tier's medium answers.",
          [&](size_t t) { return tiers[t].up ? 1 : 0; });
  perTier("cortexstream:kv_tier_bytes", "gauge", "Bytes of KV blocks the tier holds (disk).",
          [&](size_t t) { return tiers[t].bytesStored; });
  perTier("cortexstream:kv_tier_stored_blocks_total", "counter",
          "Blocks written to the tier (or found there already).",
          [&](size_t t) { return tiers[t].storedBlocks; });
  perTier("cortexstream:kv_tier_store_errors_total", "counter", "Blocks the tier failed to store.",
          [&](size_t t) { return tiers[t].storeErrors; });
  perTier("cortexstream:kv_tier_loaded_blocks_total", "counter",
          "Blocks read back from the tier and verified.",
          [&](size_t t) { return tiers[t].loadedBlocks; });
  perTier("cortexstream:kv_tier_loaded_bytes_total", "counter", "Bytes read back from the tier.",
          [&](size_t t) { return tiers[t].loadedBytes; });
  perTier("cortexstream:kv_tier_read_errors_total", "counter",
          "Reads that failed (I/O error, connection lost); the blocks were computed instead.",
          [&](size_t t) { return tiers[t].readErrors; });
  perTier("cortexstream:kv_tier_lost_blocks_total", "counter",
          "Blocks the tier listed but no longer had when read (deleted, expired).",
          [&](size_t t) { return tiers[t].lostRecords; });
  perTier("cortexstream:kv_tier_bad_blocks_total", "counter",
          "Blocks refused when read back (damaged, truncated, foreign) and deleted.",
          [&](size_t t) { return tiers[t].badRecords; });
  perTier("cortexstream:kv_tier_skipped_loads_total", "counter",
          "Hits left to compute because reading them would take longer.",
          [&](size_t t) { return tiers[t].skippedLoads; });
  perTier("cortexstream:kv_tier_read_bytes_per_second", "gauge",
          "Measured read rate of the tier (0 until measured).",
          [&](size_t t) { return tiers[t].readBytesPerSecond; });
  w.metric("cortexstream:kv_tier_dropped_stores_total", "counter",
           "Blocks not written to the tiers because the write queue was full.",
           static_cast<double>(s.tiers.droppedStores));
  w.metric("cortexstream:kv_tier_pending_store_bytes", "gauge",
           "Bytes of blocks copied out and waiting to be written to the tiers.",
           static_cast<double>(s.tiers.pendingStoreBytes));
  w.metric("cortexstream:num_requests_loading", "gauge",
           "Requests waiting for their prefix to load from a tier.", s.loading);
  w.metric("cortexstream:num_requests_swapped", "gauge",
           "Preempted requests swapped out to the tiers, waiting to be read back.", s.swapped);
}

}  // namespace

std::string renderPrometheus(const engine::EngineStats& s, const ServerCounters& c,
                             const std::string& servedModel) {
  Writer w("model_name=\"" + escapeLabel(servedModel) + "\"");
  const double totalBlocks = s.kv.totalBlocks;
  const double totalSlots = totalBlocks * s.blockSizeTokens;
  w.metric("cortexstream:num_requests_running", "gauge",
           "Requests in the running batch (prefilling or decoding).", s.running);
  w.metric("cortexstream:num_requests_waiting", "gauge",
           "Requests waiting to be admitted (queued or preempted).", s.waiting);
  w.metric("cortexstream:kv_cache_usage_perc", "gauge",
           "Fraction of KV cache blocks in use (1 = full), as vLLM's kv_cache_usage_perc.",
           totalBlocks > 0 ? s.kv.usedBlocks / totalBlocks : 0.0);
  w.metric("cortexstream:kv_cache_token_usage_perc", "gauge",
           "Fraction of KV cache token slots holding a token (live tokens / all slots).",
           totalSlots > 0 ? static_cast<double>(s.kv.liveTokens) / totalSlots : 0.0);
  w.metric("cortexstream:kv_cache_blocks_total", "gauge", "KV cache blocks in the pool.",
           totalBlocks);
  w.metric("cortexstream:kv_cache_blocks_used", "gauge", "KV cache blocks owned by sequences.",
           s.kv.usedBlocks);
  w.metric("cortexstream:kv_cache_blocks_free", "gauge",
           "KV cache blocks an allocation can take (cached ones included).", s.kv.freeBlocks);
  w.metric("cortexstream:kv_cache_blocks_cached", "gauge",
           "Free KV cache blocks holding a cached prefix (evicted least recently used first).",
           s.kv.cachedBlocks);
  w.metric("cortexstream:prefix_cache_queries_total", "counter",
           "Prompt tokens looked up in the prefix cache at admission.",
           static_cast<double>(s.prefixCacheQueries));
  w.metric("cortexstream:prefix_cache_hits_total", "counter",
           "Prompt tokens found in the prefix cache at admission (not computed again).",
           static_cast<double>(s.prefixCacheHits));
  if (!s.tiers.tiers.empty()) renderTiers(w, s);
  w.metric("cortexstream:kv_cache_live_tokens", "gauge", "Token slots holding a token.",
           static_cast<double>(s.kv.liveTokens));
  w.metric("cortexstream:kv_cache_block_size_tokens", "gauge", "Tokens per KV cache block.",
           s.blockSizeTokens);
  w.metric("cortexstream:kv_cache_bytes_total", "gauge", "Size of the KV arena (K and V), bytes.",
           static_cast<double>(s.kv.totalBytes));
  w.metric("cortexstream:num_preemptions_total", "counter",
           "Requests preempted (blocks freed, recomputed later) for lack of KV blocks.",
           static_cast<double>(s.preemptions));
  w.metric("cortexstream:prompt_tokens_total", "counter",
           "Prompt tokens prefilled (recomputation after preemption included).",
           static_cast<double>(s.promptTokens));
  w.metric("cortexstream:generation_tokens_total", "counter", "Tokens sampled.",
           static_cast<double>(s.generationTokens));
  w.metric("cortexstream:engine_steps_total", "counter", "Forward steps of the engine loop.",
           static_cast<double>(s.steps));
  w.header("cortexstream:request_success_total", "counter",
           "Finished requests by finish reason (stop, length, cancelled, error).");
  w.sample("cortexstream:request_success_total", static_cast<double>(s.finishedStop),
           "finished_reason=\"stop\"");
  w.sample("cortexstream:request_success_total", static_cast<double>(s.finishedLength),
           "finished_reason=\"length\"");
  w.sample("cortexstream:request_success_total", static_cast<double>(s.finishedCancelled),
           "finished_reason=\"cancelled\"");
  w.sample("cortexstream:request_success_total", static_cast<double>(s.finishedError),
           "finished_reason=\"error\"");
  w.histogram("cortexstream:time_to_first_token_seconds",
              "Seconds from arrival to the first sampled token.", s.timeToFirstToken);
  w.histogram("cortexstream:time_per_output_token_seconds",
              "Seconds between consecutive output tokens of a request.", s.timePerOutputToken);
  w.histogram("cortexstream:e2e_request_latency_seconds",
              "Seconds from arrival to the end of a request.", s.requestLatency);
  w.metric("cortexstream:http_requests_total", "counter", "HTTP requests routed to a handler.",
           static_cast<double>(c.httpRequests));
  w.metric("cortexstream:http_errors_total", "counter", "HTTP responses with status >= 400.",
           static_cast<double>(c.httpErrors));
  w.metric("cortexstream:requests_rejected_queue_full_total", "counter",
           "Requests refused because the waiting queue was full.",
           static_cast<double>(c.rejectedQueueFull));
  w.metric("cortexstream:http_connections", "gauge", "HTTP connections open.",
           static_cast<double>(c.openConnections));
  w.metric("cortexstream:http_connections_rejected_total", "counter",
           "Connections refused (503) because --max-connections were open.",
           static_cast<double>(c.rejectedConnections));
  return w.str();
}

}  // namespace cortex::server
