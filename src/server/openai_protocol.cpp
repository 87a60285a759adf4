#include "server/openai_protocol.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

namespace cortex::server {

using nlohmann::json;

void throwInvalid(const std::string& param, const std::string& message, const std::string& code) {
  ApiError e;
  e.status = 400;
  e.message = message;
  e.param = param;
  e.code = code;
  throw ApiException(std::move(e));
}

json errorJson(const ApiError& error) {
  return {{"error",
           {{"message", error.message},
            {"type", error.type},
            {"param", error.param.empty() ? json(nullptr) : json(error.param)},
            {"code", error.code.empty() ? json(nullptr) : json(error.code)}}}};
}

std::string dumpJson(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

namespace {

// The field, or nullptr when absent or null (clients send null for "not given").
const json* field(const json& body, const char* name) {
  const auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string typeName(const json& v) {
  switch (v.type()) {
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    case json::value_t::string: return "a string";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    default: return "null";
  }
}

[[noreturn]] void wrongType(const std::string& param, const char* expected, const json& v) {
  throwInvalid(param, "'" + param + "' must be " + expected + ", got " + typeName(v),
               "invalid_type");
}

std::string numberText(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

std::optional<double> getNumber(const json& body, const char* name, double lo, double hi,
                                bool loOpen = false) {
  const json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) wrongType(name, "a number", *v);
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi || (loOpen && x == lo)) {
    throwInvalid(name, "'" + std::string(name) + "' must be in " + (loOpen ? "(" : "[") +
                           numberText(lo) + ", " + numberText(hi) + "], got " + numberText(x));
  }
  return x;
}

// A value accepted in a range open at 0, as a float that is still > 0 (1e-300 would round to 0).
float positiveFloat(double x) {
  return std::max(static_cast<float>(x), std::numeric_limits<float>::min());
}

std::optional<int64_t> getInt(const json& body, const char* name, int64_t lo, int64_t hi) {
  const json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_number_integer()) wrongType(name, "an integer", *v);
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(hi)) {
    throwInvalid(name, "'" + std::string(name) + "' must be in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "], got " + std::to_string(v->get<uint64_t>()));
  }
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) {
    throwInvalid(name, "'" + std::string(name) + "' must be in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "], got " + std::to_string(x));
  }
  return x;
}

std::optional<bool> getBool(const json& body, const char* name) {
  const json* v = field(body, name);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) wrongType(name, "a boolean", *v);
  return v->get<bool>();
}

void rejectUnsupported(const json& body, const char* name, const std::string& why) {
  const json* v = field(body, name);
  if (!v) return;
  if ((v->is_array() || v->is_object() || v->is_string()) && v->empty()) return;
  throwInvalid(name, "'" + std::string(name) + "' is not supported: " + why, "unsupported");
}

// Fields shared by both endpoints.
void parseCommon(const json& body, ParsedRequest& r) {
  if (!body.is_object()) {
    throwInvalid("", "the request body must be a JSON object, got " + typeName(body));
  }
  if (const json* v = field(body, "model")) {
    if (!v->is_string()) wrongType("model", "a string", *v);
    r.model = v->get<std::string>();
  }
  if (const auto n = getInt(body, "n", 1, engine::kMaxChoices)) r.n = static_cast<int32_t>(*n);
  rejectUnsupported(body, "logit_bias", "send no logit_bias");
  rejectUnsupported(body, "tools", "function calling is not implemented");
  rejectUnsupported(body, "functions", "function calling is not implemented");
  if (const json* v = field(body, "response_format")) {
    if (!v->is_object()) wrongType("response_format", "an object", *v);
    const auto t = v->find("type");
    if (t != v->end() && !(t->is_string() && t->get<std::string>() == "text")) {
      throwInvalid("response_format", "only response_format {\"type\": \"text\"} is supported",
                   "unsupported");
    }
  }

  constexpr int64_t kMaxTokens = std::numeric_limits<int32_t>::max();
  if (auto v = getInt(body, "max_tokens", 1, kMaxTokens)) {
    r.maxTokens = static_cast<int32_t>(*v);
  }
  if (auto v = getInt(body, "max_completion_tokens", 1, kMaxTokens)) {
    r.maxTokens = static_cast<int32_t>(*v);
  }
  if (auto v = getNumber(body, "temperature", 0, 2)) r.sampling.temperature = static_cast<float>(*v);
  if (auto v = getNumber(body, "top_p", 0, 1, true)) r.sampling.topP = positiveFloat(*v);
  if (auto v = getInt(body, "top_k", -1, std::numeric_limits<int32_t>::max())) {
    r.sampling.topK = *v <= 0 ? 0 : static_cast<int32_t>(*v);  // -1 and 0: off (vLLM: -1)
  }
  if (auto v = getNumber(body, "min_p", 0, 1)) r.sampling.minP = static_cast<float>(*v);
  if (auto v = getNumber(body, "presence_penalty", -2, 2)) {
    r.sampling.presencePenalty = static_cast<float>(*v);
  }
  if (auto v = getNumber(body, "frequency_penalty", -2, 2)) {
    r.sampling.frequencyPenalty = static_cast<float>(*v);
  }
  if (auto v = getNumber(body, "repetition_penalty", 0, 100, true)) {
    r.sampling.repetitionPenalty = positiveFloat(*v);
  }
  if (const json* v = field(body, "seed")) {
    if (!v->is_number_integer()) wrongType("seed", "an integer", *v);
    r.sampling.seed = v->is_number_unsigned() ? v->get<uint64_t>()
                                              : static_cast<uint64_t>(v->get<int64_t>());
    r.seedGiven = true;
  }
  if (const json* v = field(body, "stop")) {
    if (v->is_string()) {
      r.stop.push_back(v->get<std::string>());
    } else if (v->is_array()) {
      if (v->size() > 4) throwInvalid("stop", "'stop' may hold at most 4 strings");
      for (const json& s : *v) {
        if (!s.is_string()) wrongType("stop", "a string or an array of strings", s);
        r.stop.push_back(s.get<std::string>());
      }
    } else {
      wrongType("stop", "a string or an array of strings", *v);
    }
    std::erase_if(r.stop, [](const std::string& s) { return s.empty(); });
  }
  if (auto v = getBool(body, "stream")) r.stream = *v;
  // note: after n and stream, which it is checked against. vLLM takes it on both endpoints.
  if (auto v = getInt(body, "best_of", 1, engine::kMaxChoices)) {
    r.bestOf = static_cast<int32_t>(*v);
    if (r.bestOf < r.n) {
      throwInvalid("best_of", "'best_of' must be >= n (" + std::to_string(r.n) + "), got " +
                                  std::to_string(r.bestOf));
    }
    if (r.bestOf > r.n && r.stream) {
      throwInvalid("best_of", "'best_of' > n cannot be streamed: the best choices are known only "
                              "when every candidate is finished");
    }
  }
  if (const json* v = field(body, "stream_options")) {
    if (!v->is_object()) wrongType("stream_options", "an object", *v);
    if (auto u = getBool(*v, "include_usage")) r.includeUsage = *u;
  }
  if (auto v = getBool(body, "ignore_eos")) r.ignoreEos = *v;
  if (auto v = getBool(body, "skip_special_tokens")) r.skipSpecialTokens = *v;
  if (auto v = getInt(body, "kv_window", 1, std::numeric_limits<int32_t>::max())) {
    r.kvWindow = static_cast<int32_t>(*v);
  }
  if (auto v = getInt(body, "kv_sinks", 0, std::numeric_limits<int32_t>::max())) {
    r.kvSinks = static_cast<int32_t>(*v);
    if (r.kvWindow == 0) throwInvalid("kv_sinks", "'kv_sinks' needs 'kv_window'");
  }
  const std::string bad = r.sampling.validate();
  if (!bad.empty()) throwInvalid("", bad);
}

std::vector<int32_t> tokenIds(const json& arr, const char* param) {
  std::vector<int32_t> ids;
  ids.reserve(arr.size());
  for (const json& t : arr) {
    if (!t.is_number_integer()) wrongType(param, "a string or an array of token ids", t);
    const int64_t id = t.get<int64_t>();
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      throwInvalid(param, "token id " + std::to_string(id) + " is out of range");
    }
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

std::string messageContent(const json& content, size_t index) {
  const std::string param = "messages[" + std::to_string(index) + "].content";
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) wrongType(param, "a string or an array of content parts", content);
  std::string text;
  for (const json& part : content) {
    if (!part.is_object()) wrongType(param, "an array of content parts", part);
    const auto type = part.find("type");
    if (type == part.end() || !type->is_string()) {
      throwInvalid(param, "each content part needs a string 'type'");
    }
    if (type->get<std::string>() != "text") {
      throwInvalid(param,
                   "content part type '" + type->get<std::string>() +
                       "' is not supported; only 'text' parts are",
                   "unsupported");
    }
    const auto t = part.find("text");
    if (t == part.end() || !t->is_string()) {
      throwInvalid(param, "a text content part needs a string 'text'");
    }
    text += t->get<std::string>();
  }
  return text;
}

}  // namespace

ParsedRequest parseCompletionRequest(const json& body) {
  ParsedRequest r;
  r.endpoint = Endpoint::Completions;
  parseCommon(body, r);
  rejectUnsupported(body, "suffix", "insertion is not implemented");
  if (auto v = getInt(body, "logprobs", 0, 5)) r.topLogprobs = static_cast<int32_t>(*v);
  if (auto v = getBool(body, "echo")) r.echo = *v;

  const json* p = field(body, "prompt");
  if (!p) throwInvalid("prompt", "'prompt' is required");
  if (p->is_string()) {
    r.promptText = p->get<std::string>();
  } else if (p->is_array()) {
    if (p->empty()) throwInvalid("prompt", "'prompt' must not be empty");
    const json& first = (*p)[0];
    if (first.is_string() || first.is_array()) {
      if (p->size() != 1) {
        throwInvalid("prompt",
                     "only one prompt per request is supported (got " +
                         std::to_string(p->size()) + "); send several requests instead",
                     "unsupported");
      }
      if (first.is_string()) {
        r.promptText = first.get<std::string>();
      } else {
        r.promptTokenIds = tokenIds(first, "prompt");
      }
    } else {
      r.promptTokenIds = tokenIds(*p, "prompt");
    }
  } else {
    wrongType("prompt", "a string, an array of one string, or an array of token ids", *p);
  }
  if (r.promptText && r.promptText->empty()) throwInvalid("prompt", "'prompt' must not be empty");
  if (!r.promptText && r.promptTokenIds.empty()) {
    throwInvalid("prompt", "'prompt' must not be empty");
  }
  return r;
}

ParsedRequest parseChatRequest(const json& body) {
  ParsedRequest r;
  r.endpoint = Endpoint::ChatCompletions;
  parseCommon(body, r);
  rejectUnsupported(body, "tool_choice", "function calling is not implemented");
  const bool logprobs = getBool(body, "logprobs").value_or(false);
  const auto top = getInt(body, "top_logprobs", 0, 20);
  if (top && !logprobs) {
    throwInvalid("top_logprobs", "'top_logprobs' needs 'logprobs': true");
  }
  if (logprobs) r.topLogprobs = static_cast<int32_t>(top.value_or(0));

  const json* m = field(body, "messages");
  if (!m) throwInvalid("messages", "'messages' is required");
  if (!m->is_array()) wrongType("messages", "an array", *m);
  if (m->empty()) throwInvalid("messages", "'messages' must not be empty");
  for (size_t i = 0; i < m->size(); ++i) {
    const json& msg = (*m)[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!msg.is_object()) wrongType(at, "an object", msg);
    const auto role = msg.find("role");
    if (role == msg.end() || !role->is_string()) {
      throwInvalid(at + ".role", "'" + at + ".role' must be a string");
    }
    std::string roleName = role->get<std::string>();
    if (roleName == "developer") roleName = "system";  // OpenAI's newer name for it
    if (roleName != "system" && roleName != "user" && roleName != "assistant" &&
        roleName != "tool") {
      throwInvalid(at + ".role", "unknown role '" + roleName +
                                     "' (expected system, developer, user, assistant or tool)");
    }
    const auto content = msg.find("content");
    std::string text;
    if (content == msg.end() || content->is_null()) {
      if (roleName != "assistant") {
        throwInvalid(at + ".content", "'" + at + ".content' is required");
      }
    } else {
      text = messageContent(*content, i);
    }
    r.messages.push_back({std::move(roleName), std::move(text)});
  }
  if (const json* kw = field(body, "chat_template_kwargs")) {
    if (!kw->is_object()) wrongType("chat_template_kwargs", "an object", *kw);
    for (const auto& [key, value] : kw->items()) {
      // The variables the server itself sets cannot be replaced.
      for (const char* reserved : {"messages", "add_generation_prompt", "bos_token", "eos_token",
                                   "tools", "documents"}) {
        if (key == reserved) {
          throwInvalid("chat_template_kwargs", "'chat_template_kwargs' cannot set '" + key +
                                                   "', which the server sets itself");
        }
      }
      r.chatTemplateKwargs[key] = nlohmann::ordered_json::parse(value.dump());
    }
  }
  return r;
}

namespace {

json bytesOf(const std::string& piece) {
  json b = json::array();
  for (const char c : piece) b.push_back(static_cast<int>(static_cast<unsigned char>(c)));
  return b;
}

}  // namespace

json completionLogprobs(const model::Tokenizer& tokenizer,
                        std::span<const engine::TokenLogprob> entries, bool firstIsNull,
                        int64_t& textOffset) {
  json tokens = json::array(), logprobs = json::array(), tops = json::array(),
       offsets = json::array();
  for (size_t i = 0; i < entries.size(); ++i) {
    const engine::TokenLogprob& e = entries[i];
    const std::string& piece = tokenizer.tokenToPiece(e.token);
    tokens.push_back(piece);
    offsets.push_back(textOffset);
    textOffset += static_cast<int64_t>(piece.size());
    if (i == 0 && firstIsNull) {
      logprobs.push_back(nullptr);
      tops.push_back(nullptr);
      continue;
    }
    logprobs.push_back(e.logprob);
    json top = json::object();
    for (const auto& [id, lp] : e.top) top[tokenizer.tokenToPiece(id)] = lp;
    tops.push_back(std::move(top));
  }
  return {{"tokens", std::move(tokens)},
          {"token_logprobs", std::move(logprobs)},
          {"top_logprobs", std::move(tops)},
          {"text_offset", std::move(offsets)}};
}

json chatLogprobContent(const model::Tokenizer& tokenizer,
                        std::span<const engine::TokenLogprob> entries) {
  json content = json::array();
  for (const engine::TokenLogprob& e : entries) {
    const std::string& piece = tokenizer.tokenToPiece(e.token);
    json top = json::array();
    for (const auto& [id, lp] : e.top) {
      const std::string& alt = tokenizer.tokenToPiece(id);
      top.push_back({{"token", alt}, {"logprob", lp}, {"bytes", bytesOf(alt)}});
    }
    content.push_back({{"token", piece},
                       {"logprob", e.logprob},
                       {"bytes", bytesOf(piece)},
                       {"top_logprobs", std::move(top)}});
  }
  return content;
}

std::string finishReasonString(engine::FinishReason reason) {
  return engine::toString(reason);
}

}  // namespace cortex::server
