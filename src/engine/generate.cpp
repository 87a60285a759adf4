#include "engine/generate.h"

#include <algorithm>
#include <chrono>

#include "engine/stop_matcher.h"
#include "model/errors.h"

namespace cortex::engine {

namespace {

using Clock = std::chrono::steady_clock;

double secondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Frees the sequence on every exit path.
struct SequenceGuard {
  kv::KVCache& cache;
  kv::SeqId seq;
  ~SequenceGuard() { cache.freeFor(seq); }
};

}  // namespace

GenerateResult generate(model::LlamaModel& model, const model::Tokenizer& tokenizer,
                        kv::KVCache& cache, kv::SeqId seq, const GenerateRequest& request,
                        const std::function<void(std::string_view)>& onText) {
  const model::LlamaHParams& hp = model.hparams();
  const auto& prompt = request.promptTokens;
  const int32_t nPrompt = static_cast<int32_t>(prompt.size());
  if (nPrompt == 0) throw model::ModelError("the prompt is empty (no tokens)");
  if (request.maxTokens < 1) throw model::ModelError("max tokens must be >= 1");
  if (const std::string bad = request.sampling.validate(); !bad.empty()) {
    throw model::ModelError(bad);
  }
  // Fail before any work when the request cannot fit: the model's context, then the cache.
  const int64_t needTokens = static_cast<int64_t>(nPrompt) + request.maxTokens;
  if (nPrompt >= hp.nCtxTrain) {
    throw model::ModelError("the prompt has " + std::to_string(nPrompt) +
                            " tokens; the model's context is " + std::to_string(hp.nCtxTrain));
  }
  const int64_t maxCtx = std::min<int64_t>(needTokens, hp.nCtxTrain);
  if (cache.blocksForTokens(maxCtx) > cache.numBlocks()) {
    throw model::ModelError("prompt + max tokens (" + std::to_string(maxCtx) +
                            " tokens) do not fit in the KV cache (" +
                            std::to_string(static_cast<int64_t>(cache.numBlocks()) *
                                           cache.blockSizeTokens()) +
                            " token slots); lower max tokens or raise the KV cache memory");
  }

  GenerateResult result;
  result.promptTokens = nPrompt;
  Sampler sampler(request.sampling, hp.nVocab, prompt);
  model::StreamDecoder decoder(tokenizer);
  StopMatcher stops(request.stop);
  std::vector<float> logits;
  auto emit = [&](const std::string& text) {
    if (text.empty()) return;
    result.text += text;
    if (onText) onText(text);
  };

  // Prefill in chunks.
  const auto t0 = Clock::now();
  cache.allocateFor(seq, std::min(nPrompt, std::max(1, request.prefillChunkTokens)));
  SequenceGuard guard{cache, seq};
  if (request.promptLogits) request.promptLogits->clear();
  const int32_t chunk = std::max(1, request.prefillChunkTokens);
  for (int32_t pos = 0; pos < nPrompt; pos += chunk) {
    const int32_t n = std::min(chunk, nPrompt - pos);
    if (pos > 0) cache.appendTokens(seq, n);
    const model::BatchSequence b{seq, std::span<const int32_t>(prompt).subspan(pos, n), pos,
                                 request.promptLogits != nullptr};
    model.forward(std::span<const model::BatchSequence>(&b, 1), cache, logits);
    if (request.promptLogits) {
      request.promptLogits->insert(request.promptLogits->end(), logits.begin(), logits.end());
    }
  }
  result.prefillSeconds = secondsSince(t0);

  // Decode.
  const auto t1 = Clock::now();
  float* last = logits.data() + (logits.size() - static_cast<size_t>(hp.nVocab));
  int32_t pos = nPrompt;
  for (;;) {
    const int32_t token = sampler.sample(last);
    sampler.accept(token);
    result.tokens.push_back(token);
    ++result.completionTokens;
    if (!request.ignoreEos && tokenizer.isEndOfGeneration(token)) {
      result.finishReason = "stop";
      break;
    }
    emit(stops.push(decoder.push(token)));
    if (stops.stopped()) {
      result.finishReason = "stop";
      break;
    }
    if (result.completionTokens >= request.maxTokens || pos + 1 > hp.nCtxTrain) {
      result.finishReason = "length";
      break;
    }
    cache.appendToken(seq);
    const int32_t one[1] = {token};
    const model::BatchSequence b{seq, std::span<const int32_t>(one, 1), pos, false};
    model.forward(std::span<const model::BatchSequence>(&b, 1), cache, logits);
    last = logits.data();
    ++pos;
  }
  if (!stops.stopped()) {
    std::string tail = stops.push(decoder.flush());
    tail += stops.flush();
    emit(tail);
  }
  result.decodeSeconds = secondsSince(t1);
  return result;
}

}  // namespace cortex::engine
