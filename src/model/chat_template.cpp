#include "model/chat_template.h"

#include "model/errors.h"
#include "model/tokenizer.h"

namespace cortex::model {

namespace {

constexpr std::string_view kImStart = "<|im_start|>";
constexpr std::string_view kImEnd = "<|im_end|>";

// The Jinja string literal that contains position `at`, unescaped, or nullopt when `at` is not
// inside a quoted literal. Only the escapes Jinja templates use in practice are handled.
std::optional<std::string> enclosingLiteral(std::string_view text, size_t at) {
  // Find the opening quote: scan the template from the start, tracking literals, so quotes
  // inside other literals are not mistaken for openers.
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (c != '\'' && c != '"') {
      ++i;
      continue;
    }
    const size_t open = i++;
    std::string value;
    bool closed = false;
    while (i < text.size()) {
      const char d = text[i];
      if (d == '\\' && i + 1 < text.size()) {
        const char e = text[i + 1];
        value += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        i += 2;
        continue;
      }
      ++i;
      if (d == c) {
        closed = true;
        break;
      }
      value += d;
    }
    if (!closed) return std::nullopt;
    if (open < at && at < i) return value;
  }
  return std::nullopt;
}

// A default system prompt written literally in a ChatML template, e.g. SmolLM2's
// '<|im_start|>system\nYou are a helpful AI assistant named SmolLM...<|im_end|>\n'.
std::optional<std::string> findDefaultSystemPrompt(std::string_view jinja) {
  const std::string opening = std::string(kImStart) + "system";
  for (size_t at = jinja.find(opening); at != std::string_view::npos;
       at = jinja.find(opening, at + 1)) {
    const std::optional<std::string> literal = enclosingLiteral(jinja, at);
    if (!literal) continue;
    const std::string head = opening + "\n";
    const size_t start = literal->find(head);
    if (start == std::string::npos) continue;
    const size_t end = literal->find(kImEnd, start + head.size());
    if (end == std::string::npos) continue;  // the content comes from a variable
    return literal->substr(start + head.size(), end - start - head.size());
  }
  return std::nullopt;
}

}  // namespace

ChatTemplate detectChatTemplate(const std::optional<std::string>& jinjaTemplate) {
  if (!jinjaTemplate || jinjaTemplate->empty()) {
    throw ModelError(
        "the model has no chat template (tokenizer.chat_template); pass --chat-template chatml "
        "to use ChatML");
  }
  if (jinjaTemplate->find(kImStart) != std::string::npos) {
    return ChatTemplate{ChatTemplateFamily::ChatML, findDefaultSystemPrompt(*jinjaTemplate)};
  }
  std::string excerpt = jinjaTemplate->substr(0, 80);
  if (jinjaTemplate->size() > 80) excerpt += "...";
  throw ModelError("unsupported chat template (tokenizer.chat_template starts: \"" + excerpt +
                   "\"); pass --chat-template chatml to use ChatML instead");
}

ChatTemplate parseChatTemplateName(std::string_view name) {
  if (name == "chatml") return ChatTemplate{ChatTemplateFamily::ChatML, std::nullopt};
  throw ModelError("unknown chat template name '" + std::string(name) + "'; known: chatml");
}

std::string applyChatTemplate(const ChatTemplate& chatTemplate,
                              std::span<const ChatMessage> messages, bool addGenerationPrompt,
                              std::vector<size_t>* markerOffsets) {
  std::string out;
  auto marker = [&out, markerOffsets](std::string_view text) {
    if (markerOffsets != nullptr) markerOffsets->push_back(out.size());
    out += text;
  };
  switch (chatTemplate.family) {
    case ChatTemplateFamily::ChatML: {
      auto turn = [&out, &marker](std::string_view role, std::string_view content) {
        marker(kImStart);
        out += role;
        out += '\n';
        out += content;
        marker(kImEnd);
        out += '\n';
      };
      if (!messages.empty() && messages.front().role != "system" &&
          chatTemplate.defaultSystemPrompt) {
        turn("system", *chatTemplate.defaultSystemPrompt);
      }
      for (const ChatMessage& m : messages) turn(m.role, m.content);
      if (addGenerationPrompt) {
        marker(kImStart);
        out += "assistant\n";
      }
      break;
    }
  }
  return out;
}

std::vector<int32_t> encodeChat(const Tokenizer& tokenizer, const ChatTemplate& chatTemplate,
                                std::span<const ChatMessage> messages, bool addGenerationPrompt) {
  std::vector<size_t> markers;
  const std::string text = applyChatTemplate(chatTemplate, messages, addGenerationPrompt, &markers);
  return tokenizer.encode(text, true, markers);
}

}  // namespace cortex::model
