// Chat templates: turning a list of messages into the prompt text a model was trained on.
// The model's own Jinja template (tokenizer.chat_template) is rendered by our Jinja interpreter
// (jinja.h) byte for byte as Python's jinja2 renders it in Hugging Face transformers; models
// without one get a built-in template for their architecture. docs/chat-templates.md has the
// details: the supported Jinja subset, the built-in templates, and how a template is chosen.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "model/jinja.h"

namespace cortex::model {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant", ...
  std::string content;  // UTF-8 text
};

// A compiled chat template. Copies share the compiled form; thread-safe to render.
class ChatTemplate {
 public:
  // Compiles Jinja `source`. `origin` names where it came from in messages ("the model's
  // tokenizer.chat_template", "built-in template 'gemma'", a file path). Throws ModelError
  // (jinja::TemplateError) on a syntax error, naming origin and line.
  ChatTemplate(std::string source, std::string origin);

  const std::string& source() const { return source_; }
  const std::string& origin() const { return origin_; }
  const jinja::Template& compiled() const { return *compiled_; }

 private:
  std::string source_;
  std::string origin_;
  std::shared_ptr<const jinja::Template> compiled_;
};

// The built-in templates (Jinja written for CortexStream): "chatml", "gemma", "llama3".
std::vector<std::string_view> builtinChatTemplateNames();
// The built-in template called `name`, or nullopt.
std::optional<ChatTemplate> builtinChatTemplate(std::string_view name);
// The built-in template for a model of GGUF general.architecture `architecture` that has no
// template of its own: gemma/gemma2/gemma3 -> "gemma", llama -> "llama3", qwen2/qwen3 (and
// their MoE variants) -> "chatml"; nullopt for others.
std::optional<std::string_view> builtinTemplateNameFor(std::string_view architecture);

// The template to use for a model:
//  - overrideNameOrPath non-empty (`--chat-template`): the built-in of that name, else the Jinja
//    file at that path; ModelError when neither exists (listing the names).
//  - else the model's own template (fileTemplate, tokenizer.chat_template) when it has one;
//  - else the built-in for `architecture` (when not empty), saying so on stderr (once per
//    process);
//  - else ModelError suggesting --chat-template.
ChatTemplate chatTemplateFor(const std::optional<std::string>& fileTemplate,
                             std::string_view architecture, std::string_view overrideNameOrPath);

// The model's own template; ModelError when it has none (or it does not compile).
ChatTemplate detectChatTemplate(const std::optional<std::string>& jinjaTemplate);
// `--chat-template NAME|FILE`: a built-in name or a Jinja file; ModelError otherwise.
ChatTemplate parseChatTemplateName(std::string_view nameOrPath);

// Variables a template sees besides messages and add_generation_prompt. bos_token and
// eos_token are template text (their control tokens count); tools and documents default to
// none as in transformers; `extra` holds any others (enable_thinking, ...), as a JSON object.
struct ChatVariables {
  std::string bosToken;
  std::string eosToken;
  const nlohmann::ordered_json* tools = nullptr;  // a JSON array, or null for none
  const nlohmann::ordered_json* extra = nullptr;  // a JSON object, or null
};

// Renders the template with `messages` (a JSON array of message objects, as the OpenAI API
// sends them). Throws ModelError (jinja::TemplateError) naming the template line when the
// template fails (raise_exception, an undefined value, a limit).
jinja::Rendered renderChat(const ChatTemplate& chatTemplate, const nlohmann::ordered_json& messages,
                           bool addGenerationPrompt, const ChatVariables& variables = {});

// The prompt text for plain role/content messages. addGenerationPrompt appends the opening of
// an assistant turn so the model answers next.
std::string applyChatTemplate(const ChatTemplate& chatTemplate,
                              std::span<const ChatMessage> messages, bool addGenerationPrompt,
                              const ChatVariables& variables = {});

class Tokenizer;

// Byte offsets in rendered.text where a control token of `tokenizer` starts and lies wholly
// inside text the template wrote (ascending): what Tokenizer::encode takes as controlOffsets.
std::vector<size_t> controlTokenOffsets(const Tokenizer& tokenizer, const jinja::Rendered& rendered);

// The prompt's token ids: the template's own control tokens are control tokens, while
// control-token text inside a message's content stays plain text, so a message cannot close its
// turn and forge another role's. BOS is added as the model asks, once: a template that writes
// bos_token itself gets no second one. bos_token/eos_token come from the tokenizer.
std::vector<int32_t> encodeChat(const Tokenizer& tokenizer, const ChatTemplate& chatTemplate,
                                std::span<const ChatMessage> messages, bool addGenerationPrompt);
std::vector<int32_t> encodeChat(const Tokenizer& tokenizer, const ChatTemplate& chatTemplate,
                                const nlohmann::ordered_json& messages, bool addGenerationPrompt,
                                const nlohmann::ordered_json* tools = nullptr,
                                const nlohmann::ordered_json* extra = nullptr);

}  // namespace cortex::model
