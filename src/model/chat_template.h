// Chat templates: turning a list of messages into the prompt text a model was trained on.
// We do not run Jinja; we recognise the template family from tokenizer.chat_template and render
// it in C++, reproducing the model's template byte for byte (tests compare with the Jinja output).
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace cortex::model {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant", ...
  std::string content;  // UTF-8 text
};

enum class ChatTemplateFamily {
  ChatML,  // <|im_start|>role\ncontent<|im_end|>\n per message
};

// A recognised template: its family plus the details that vary between models of one family.
struct ChatTemplate {
  ChatTemplateFamily family = ChatTemplateFamily::ChatML;
  // System prompt the template inserts when the first message is not a system message
  // (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face").
  std::optional<std::string> defaultSystemPrompt;
};

// Recognises the family of a model's Jinja template (tokenizer.chat_template). ChatML: contains
// "<|im_start|>"; a literal default system prompt in it is picked up too. Throws ModelError when
// the template is missing or unknown, suggesting `--chat-template chatml`.
ChatTemplate detectChatTemplate(const std::optional<std::string>& jinjaTemplate);

// The template named on the command line (`--chat-template NAME`); "chatml" is plain ChatML with
// no default system prompt. Throws ModelError for an unknown name, listing the known ones.
ChatTemplate parseChatTemplateName(std::string_view name);

class Tokenizer;

// The prompt text for `messages`. addGenerationPrompt appends the opening of an assistant turn so
// the model answers next. With no messages the result is only that opening (or empty). When
// markerOffsets is given, the byte offsets where the template itself wrote a control token
// ("<|im_start|>", "<|im_end|>") are appended to it, ascending.
std::string applyChatTemplate(const ChatTemplate& chatTemplate,
                              std::span<const ChatMessage> messages, bool addGenerationPrompt,
                              std::vector<size_t>* markerOffsets = nullptr);

// The prompt's token ids (BOS as the model asks): the template's own markers are control tokens,
// while control-token text inside a message's content stays plain text, so a message cannot
// close its turn and forge another role's.
std::vector<int32_t> encodeChat(const Tokenizer& tokenizer, const ChatTemplate& chatTemplate,
                                std::span<const ChatMessage> messages, bool addGenerationPrompt);

}  // namespace cortex::model
