#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "server/byte_size.h"
#include "server/metrics.h"
#include "server/openai_protocol.h"

namespace cortex::server {
namespace {

using nlohmann::json;

TEST(ByteSize, PlainBytesAndUnits) {
  EXPECT_EQ(parseByteSize("1000000"), 1000000u);
  EXPECT_EQ(parseByteSize("0"), 0u);
  EXPECT_EQ(parseByteSize("12B"), 12u);
  EXPECT_EQ(parseByteSize("512MiB"), 512ull << 20);
  EXPECT_EQ(parseByteSize("1GiB"), 1ull << 30);
  EXPECT_EQ(parseByteSize("300MB"), 300000000u);
  EXPECT_EQ(parseByteSize("2KB"), 2000u);
  EXPECT_EQ(parseByteSize("2kib"), 2048u);
  EXPECT_EQ(parseByteSize("3G"), 3ull << 30);
  EXPECT_EQ(parseByteSize("3Gi"), 3ull << 30);
  EXPECT_EQ(parseByteSize("1TiB"), 1ull << 40);
  EXPECT_EQ(parseByteSize("4 MiB"), 4ull << 20);
  EXPECT_EQ(parseByteSize(" 7 "), 7u);
}

TEST(ByteSize, Fractions) {
  EXPECT_EQ(parseByteSize("1.5KiB"), 1536u);
  EXPECT_EQ(parseByteSize("0.5GiB"), 1ull << 29);
  EXPECT_EQ(parseByteSize("1.25MB"), 1250000u);
  EXPECT_EQ(parseByteSize("2."), 2u);
  EXPECT_THROW(parseByteSize("1.5"), std::invalid_argument);   // 1.5 bytes
  EXPECT_THROW(parseByteSize("1.0001KiB"), std::invalid_argument);
}

TEST(ByteSize, Rejects) {
  for (const char* bad : {"", " ", "MiB", "-1", "1XB", "1 MiBs", "1..5", "abc", "1e6", ".",
                          "18446744073709551616", "17000000TiB", "0x10"}) {
    EXPECT_THROW(parseByteSize(bad), std::invalid_argument) << bad;
  }
  EXPECT_EQ(parseByteSize("18446744073709551615"), 18446744073709551615ull);
}

int statusOf(const json& body, bool chat) {
  try {
    if (chat) {
      parseChatRequest(body);
    } else {
      parseCompletionRequest(body);
    }
  } catch (const ApiException& e) {
    return e.error().status;
  }
  return 200;
}

std::string paramOf(const json& body, bool chat) {
  try {
    if (chat) {
      parseChatRequest(body);
    } else {
      parseCompletionRequest(body);
    }
  } catch (const ApiException& e) {
    return e.error().param;
  }
  return "<ok>";
}

TEST(OpenAIProtocol, CompletionFields) {
  const ParsedRequest r = parseCompletionRequest(json::parse(R"({
    "model": "x", "prompt": "hi", "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": -1,
    "min_p": 0.1, "seed": -3, "stop": ["a", "", "b"], "n": 1, "logprobs": 2, "echo": true,
    "presence_penalty": 1, "frequency_penalty": -1.5, "repetition_penalty": 1.1,
    "stream": true, "stream_options": {"include_usage": true}, "user": "ignored", "suffix": null})"));
  EXPECT_EQ(r.promptText, "hi");
  EXPECT_EQ(r.maxTokens, 7);
  EXPECT_EQ(r.sampling.temperature, 0.0f);
  EXPECT_EQ(r.sampling.topP, 0.5f);
  EXPECT_EQ(r.sampling.topK, 0);
  EXPECT_TRUE(r.seedGiven);
  EXPECT_EQ(r.sampling.seed, static_cast<uint64_t>(-3));
  EXPECT_EQ(r.stop, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(r.topLogprobs, 2);
  EXPECT_TRUE(r.echo);
  EXPECT_TRUE(r.stream);
  EXPECT_TRUE(r.includeUsage);
}

TEST(OpenAIProtocol, PromptForms) {
  EXPECT_EQ(parseCompletionRequest(json::parse(R"({"prompt": ["one"]})")).promptText, "one");
  EXPECT_EQ(parseCompletionRequest(json::parse(R"({"prompt": [1, 2, 3]})")).promptTokenIds,
            (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(parseCompletionRequest(json::parse(R"({"prompt": [[4, 5]]})")).promptTokenIds,
            (std::vector<int32_t>{4, 5}));
  EXPECT_EQ(statusOf(json::parse(R"({"prompt": ["a", "b"]})"), false), 400);
  EXPECT_EQ(statusOf(json::parse(R"({"prompt": []})"), false), 400);
  EXPECT_EQ(statusOf(json::parse(R"({"prompt": ""})"), false), 400);
  EXPECT_EQ(statusOf(json::parse(R"({"prompt": [1, "x"]})"), false), 400);
  EXPECT_EQ(statusOf(json::parse(R"({"prompt": [-1]})"), false), 400);
  EXPECT_EQ(statusOf(json::parse(R"({"prompt": 5})"), false), 400);
  EXPECT_EQ(statusOf(json::parse(R"({})"), false), 400);
  EXPECT_EQ(statusOf(json::parse(R"([1])"), false), 400);
}

TEST(OpenAIProtocol, RejectsBadValuesNamingTheField) {
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "n": 0})"), false), "n");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "max_tokens": "5"})"), false), "max_tokens");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "max_tokens": 0})"), false), "max_tokens");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "max_tokens": 1.5})"), false), "max_tokens");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "temperature": 3})"), false), "temperature");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "temperature": true})"), false),
            "temperature");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "top_p": 0})"), false), "top_p");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "logprobs": 6})"), false), "logprobs");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "stop": ["a","b","c","d","e"]})"), false),
            "stop");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "stop": 3})"), false), "stop");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "stream": "yes"})"), false), "stream");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "n": 3, "best_of": 2})"), false), "best_of");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "n": 129})"), false), "n");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "best_of": 3, "stream": true})"), false),
            "best_of");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "n": 2, "best_of": 3})"), false), "<ok>");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "suffix": "y"})"), false), "suffix");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "logit_bias": {"1": 5}})"), false),
            "logit_bias");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "n": 18446744073709551615})"), false), "n");
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "max_tokens": 9999999999999})"), false),
            "max_tokens");
  // null means "not given"
  EXPECT_EQ(paramOf(json::parse(R"({"prompt": "x", "max_tokens": null, "n": null})"), false),
            "<ok>");
}

TEST(OpenAIProtocol, ChatMessages) {
  const ParsedRequest r = parseChatRequest(json::parse(R"({"messages": [
      {"role": "developer", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null}],
      "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 9})"));
  ASSERT_EQ(r.messages.size(), 3u);
  EXPECT_EQ(r.messages[0].role, "system");
  EXPECT_EQ(r.messages[1].content, "ab");
  EXPECT_EQ(r.messages[2].content, "");
  EXPECT_EQ(r.topLogprobs, 3);
  EXPECT_EQ(r.maxTokens, 9);
  EXPECT_EQ(parseChatRequest(json::parse(R"({"messages": [{"role": "user", "content": "x"}],
      "logprobs": true})")).topLogprobs, 0);
  EXPECT_EQ(paramOf(json::parse(R"({"messages": [{"role": "user", "content": "x"}],
      "top_logprobs": 2})"), true), "top_logprobs");
  EXPECT_EQ(paramOf(json::parse(R"({"messages": [{"role": "user", "content": "x"}],
      "logprobs": true, "top_logprobs": 21})"), true), "top_logprobs");
  EXPECT_EQ(paramOf(json::parse(R"({"messages": []})"), true), "messages");
  EXPECT_EQ(paramOf(json::parse(R"({"messages": "hi"})"), true), "messages");
  EXPECT_EQ(paramOf(json::parse(R"({"messages": [{"role": "wizard", "content": "x"}]})"), true),
            "messages[0].role");
  EXPECT_EQ(paramOf(json::parse(R"({"messages": [{"role": "user"}]})"), true),
            "messages[0].content");
  EXPECT_EQ(paramOf(json::parse(R"({"messages": [{"role": "user", "content":
      [{"type": "image_url", "image_url": {"url": "x"}}]}]})"), true), "messages[0].content");
}

TEST(OpenAIProtocol, ErrorObject) {
  ApiError e;
  e.message = "m";
  e.param = "n";
  const json j = errorJson(e);
  EXPECT_EQ(j["error"]["message"], "m");
  EXPECT_EQ(j["error"]["type"], "invalid_request_error");
  EXPECT_EQ(j["error"]["param"], "n");
  EXPECT_TRUE(j["error"]["code"].is_null());
  // Invalid UTF-8 (a token piece holding half a character) must not throw.
  std::string halfChar(2, 'a');
  halfChar[1] = static_cast<char>(0xe2);
  const std::string dumped = dumpJson(json(halfChar));
  EXPECT_EQ(dumped.size(), 6u);  // "a" + U+FFFD (3 bytes) in quotes
  EXPECT_EQ(static_cast<unsigned char>(dumped[2]), 0xefu);
}

TEST(Metrics, PrometheusText) {
  engine::EngineStats s;
  s.kv.totalBlocks = 10;
  s.kv.usedBlocks = 4;
  s.kv.freeBlocks = 6;
  s.kv.liveTokens = 40;
  s.blockSizeTokens = 16;
  s.running = 2;
  s.preemptions = 3;
  s.finishedLength = 5;
  s.timeToFirstToken.bounds = {0.1, 1};
  s.timeToFirstToken.counts = {0, 0, 0};
  s.timeToFirstToken.observe(0.5);
  s.timeToFirstToken.observe(2);
  const std::string text = renderPrometheus(s, {}, "m\"x");
  auto has = [&](const std::string& line) {
    return text.find(line + "\n") != std::string::npos;
  };
  EXPECT_TRUE(has("cortexstream:num_requests_running{model_name=\"m\\\"x\"} 2")) << text;
  EXPECT_TRUE(has("cortexstream:kv_cache_usage_perc{model_name=\"m\\\"x\"} 0.4"));
  EXPECT_TRUE(has("cortexstream:kv_cache_token_usage_perc{model_name=\"m\\\"x\"} 0.25"));
  EXPECT_TRUE(has("cortexstream:num_preemptions_total{model_name=\"m\\\"x\"} 3"));
  EXPECT_TRUE(has("cortexstream:request_success_total{model_name=\"m\\\"x\",finished_reason=\"length\"} 5"));
  EXPECT_TRUE(has("cortexstream:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"0.1\"} 0"));
  EXPECT_TRUE(has("cortexstream:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"1\"} 1"));
  EXPECT_TRUE(has("cortexstream:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"+Inf\"} 2"));
  EXPECT_TRUE(has("cortexstream:time_to_first_token_seconds_count{model_name=\"m\\\"x\"} 2"));
  EXPECT_TRUE(has("# TYPE cortexstream:e2e_request_latency_seconds histogram"));
}

}  // namespace
}  // namespace cortex::server
