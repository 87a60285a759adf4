// Single-request generation over the paged KV cache: chunked prefill, then one decode step per
// token, streaming text as it is sampled. The continuous-batching engine (the serving issue)
// schedules many of these at once; this is the one-request path the CLI uses.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "model/llama.h"
#include "model/tokenizer.h"

namespace cortex::engine {

struct GenerateRequest {
  std::vector<int32_t> promptTokens;  // at least one token
  SamplingParams sampling;
  int32_t maxTokens = 256;             // >= 1: completion tokens at most
  std::vector<std::string> stop;       // stop strings (not included in the output)
  bool ignoreEos = false;
  int32_t prefillChunkTokens = 512;    // prompt tokens per forward call
  // When set, receives the logits of every prompt position (promptTokens.size() x vocab floats).
  std::vector<float>* promptLogits = nullptr;
};

struct GenerateResult {
  std::string text;
  std::vector<int32_t> tokens;  // completion token ids (including a final end-of-generation)
  int32_t promptTokens = 0;
  int32_t completionTokens = 0;
  std::string finishReason;     // "stop" (EOS or stop string) or "length"
  double prefillSeconds = 0;
  double decodeSeconds = 0;     // from the first sampled token to the last
};

// Runs the request to completion on `cache` (sequence id `seq`, freed before returning, also on
// error). onText receives each piece of text that is safe to show (UTF-8 complete, no part of a
// stop string). Throws ModelError / KVError (e.g. the prompt does not fit the cache or the
// model's context) with the cache left as it was.
GenerateResult generate(model::LlamaModel& model, const model::Tokenizer& tokenizer,
                        kv::KVCache& cache, kv::SeqId seq, const GenerateRequest& request,
                        const std::function<void(std::string_view)>& onText);

}  // namespace cortex::engine
