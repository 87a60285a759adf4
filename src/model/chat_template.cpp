#include "model/chat_template.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include <nlohmann/json.hpp>

#include "model/errors.h"
#include "model/tokenizer.h"

namespace cortex::model {

namespace {

// ChatML: <|im_start|>role\ncontent<|im_end|>\n per message (Qwen 2 and 3, SmolLM).
constexpr std::string_view kChatML = R"({%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%})";

// Gemma: <start_of_turn>user\n...<end_of_turn>\n turns after BOS; the assistant's role is
// "model", and a system message is folded into the first user turn.
constexpr std::string_view kGemma = R"({{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}
{{- message['content'] | trim -}}
{{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\n' -}}
{%- endif -%})";

// Llama 3: a header per message, the content trimmed, <|eot_id|> after each.
constexpr std::string_view kLlama3 = R"({{- bos_token -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%})";

struct Builtin {
  std::string_view name;
  std::string_view source;
};
constexpr Builtin kBuiltins[] = {{"chatml", kChatML}, {"gemma", kGemma}, {"llama3", kLlama3}};

std::string knownNames() {
  std::string out;
  for (const Builtin& b : kBuiltins) out += (out.empty() ? "" : ", ") + std::string(b.name);
  return out;
}

const std::string& pieceOrEmpty(const Tokenizer& tokenizer, int32_t id) {
  static const std::string empty;
  return id >= 0 ? tokenizer.tokenToPiece(id) : empty;
}

}  // namespace

ChatTemplate::ChatTemplate(std::string source, std::string origin)
    : source_(std::move(source)), origin_(std::move(origin)) {
  try {
    compiled_ = std::make_shared<const jinja::Template>(source_);
  } catch (const jinja::TemplateError& e) {
    throw jinja::TemplateError(origin_ + ": " + e.what());
  }
}

std::vector<std::string_view> builtinChatTemplateNames() {
  std::vector<std::string_view> names;
  for (const Builtin& b : kBuiltins) names.push_back(b.name);
  return names;
}

std::optional<ChatTemplate> builtinChatTemplate(std::string_view name) {
  for (const Builtin& b : kBuiltins) {
    if (b.name == name) return ChatTemplate(std::string(b.source), "built-in template '" + std::string(name) + "'");
  }
  return std::nullopt;
}

std::optional<std::string_view> builtinTemplateNameFor(std::string_view architecture) {
  if (architecture == "gemma" || architecture == "gemma2" || architecture == "gemma3") return "gemma";
  if (architecture == "llama") return "llama3";
  if (architecture == "qwen2" || architecture == "qwen3" || architecture == "qwen2moe" ||
      architecture == "qwen3moe") {
    return "chatml";
  }
  return std::nullopt;
}

ChatTemplate chatTemplateFor(const std::optional<std::string>& fileTemplate,
                             std::string_view architecture, std::string_view overrideNameOrPath) {
  if (!overrideNameOrPath.empty()) return parseChatTemplateName(overrideNameOrPath);
  if (fileTemplate && !fileTemplate->empty()) return detectChatTemplate(fileTemplate);
  if (architecture.empty()) return detectChatTemplate(fileTemplate);  // says what to pass
  const std::optional<std::string_view> name = builtinTemplateNameFor(architecture);
  if (!name) {
    throw ModelError("the model has no chat template (tokenizer.chat_template) and there is no "
                     "built-in one for architecture '" + std::string(architecture) +
                     "'; pass --chat-template NAME|FILE (built-in: " + knownNames() + ")");
  }
  static std::atomic<bool> said{false};
  if (!said.exchange(true)) {
    std::cerr << "note: the model has no chat template; using the built-in '" << *name
              << "' template for architecture " << architecture << "\n";
  }
  return *builtinChatTemplate(*name);
}

ChatTemplate detectChatTemplate(const std::optional<std::string>& jinjaTemplate) {
  if (!jinjaTemplate || jinjaTemplate->empty()) {
    throw ModelError("the model has no chat template (tokenizer.chat_template); pass "
                     "--chat-template NAME|FILE (built-in: " + knownNames() + ")");
  }
  return ChatTemplate(*jinjaTemplate, "the model's tokenizer.chat_template");
}

ChatTemplate parseChatTemplateName(std::string_view nameOrPath) {
  if (std::optional<ChatTemplate> b = builtinChatTemplate(nameOrPath)) return *b;
  const std::string path(nameOrPath);
  std::error_code ec;
  if (std::filesystem::is_regular_file(path, ec)) {
    std::ifstream in(path, std::ios::binary);
    std::ostringstream text;
    text << in.rdbuf();
    if (!in.good() && !in.eof()) throw ModelError(path + ": cannot read the chat template file");
    return ChatTemplate(text.str(), path);
  }
  throw ModelError("unknown chat template '" + path + "': not a built-in name (" + knownNames() +
                   ") nor a Jinja file");
}

jinja::Rendered renderChat(const ChatTemplate& chatTemplate, const nlohmann::ordered_json& messages,
                           bool addGenerationPrompt, const ChatVariables& variables) {
  nlohmann::ordered_json context = nlohmann::ordered_json::object();
  if (variables.extra != nullptr && variables.extra->is_object()) {
    for (const auto& [k, v] : variables.extra->items()) context[k] = v;
  }
  context["messages"] = messages;
  context["tools"] = variables.tools != nullptr ? *variables.tools : nlohmann::ordered_json(nullptr);
  if (!context.contains("documents")) context["documents"] = nullptr;
  context["add_generation_prompt"] = addGenerationPrompt;
  context["bos_token"] = variables.bosToken;
  context["eos_token"] = variables.eosToken;
  static const std::string kTrusted[] = {"bos_token", "eos_token"};
  try {
    return chatTemplate.compiled().render(context, kTrusted);
  } catch (const jinja::TemplateError& e) {
    throw jinja::TemplateError(chatTemplate.origin() + ": " + e.what());
  }
}

namespace {

nlohmann::ordered_json messagesJson(std::span<const ChatMessage> messages) {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const ChatMessage& m : messages) {
    list.push_back(nlohmann::ordered_json{{"role", m.role}, {"content", m.content}});
  }
  return list;
}

}  // namespace

std::string applyChatTemplate(const ChatTemplate& chatTemplate,
                              std::span<const ChatMessage> messages, bool addGenerationPrompt,
                              const ChatVariables& variables) {
  return renderChat(chatTemplate, messagesJson(messages), addGenerationPrompt, variables).text;
}

std::vector<size_t> controlTokenOffsets(const Tokenizer& tokenizer, const jinja::Rendered& rendered) {
  // Control tokens by first byte, longest first, so the longest one starting at a byte wins.
  std::map<unsigned char, std::vector<const std::string*>> byFirst;
  for (int32_t id = 0; id < tokenizer.vocabSize(); ++id) {
    if (tokenizer.tokenType(id) != TokenType::Control) continue;
    const std::string& piece = tokenizer.tokenToPiece(id);
    if (!piece.empty()) byFirst[static_cast<unsigned char>(piece[0])].push_back(&piece);
  }
  for (auto& [first, pieces] : byFirst) {
    std::sort(pieces.begin(), pieces.end(), [](const std::string* a, const std::string* b) { return a->size() > b->size(); });
  }
  std::vector<size_t> offsets;
  const std::string& text = rendered.text;
  for (const jinja::ByteRange& r : rendered.templateRanges) {
    size_t at = r.begin;
    while (at < r.end) {
      const auto it = byFirst.find(static_cast<unsigned char>(text[at]));
      size_t matched = 0;
      if (it != byFirst.end()) {
        for (const std::string* piece : it->second) {
          if (piece->size() <= r.end - at && text.compare(at, piece->size(), *piece) == 0) {
            matched = piece->size();
            break;
          }
        }
      }
      if (matched > 0) {
        offsets.push_back(at);
        at += matched;
      } else {
        ++at;
      }
    }
  }
  return offsets;
}

std::vector<int32_t> encodeChat(const Tokenizer& tokenizer, const ChatTemplate& chatTemplate,
                                const nlohmann::ordered_json& messages, bool addGenerationPrompt,
                                const nlohmann::ordered_json* tools,
                                const nlohmann::ordered_json* extra) {
  ChatVariables vars;
  vars.bosToken = pieceOrEmpty(tokenizer, tokenizer.bos());
  vars.eosToken = pieceOrEmpty(tokenizer, tokenizer.eos());
  vars.tools = tools;
  vars.extra = extra;
  const jinja::Rendered rendered = renderChat(chatTemplate, messages, addGenerationPrompt, vars);
  const std::vector<size_t> offsets = controlTokenOffsets(tokenizer, rendered);
  // A template that starts with bos_token has added BOS itself.
  const bool templateWroteBos = tokenizer.addBos() && !vars.bosToken.empty() &&
                                rendered.text.compare(0, vars.bosToken.size(), vars.bosToken) == 0 &&
                                !offsets.empty() && offsets.front() == 0;
  return tokenizer.encode(rendered.text, !templateWroteBos, offsets);
}

std::vector<int32_t> encodeChat(const Tokenizer& tokenizer, const ChatTemplate& chatTemplate,
                                std::span<const ChatMessage> messages, bool addGenerationPrompt) {
  return encodeChat(tokenizer, chatTemplate, messagesJson(messages), addGenerationPrompt);
}

}  // namespace cortex::model
