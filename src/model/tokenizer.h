// The tokenizers of GGUF models, and StreamDecoder, the incremental detokenizer that streaming
// uses. Two kinds, by tokenizer.ggml.model:
//   "gpt2"   byte-level BPE, as llama.cpp's llm_tokenizer_bpe: special tokens are cut out first,
//            the rest is split by the pre-tokenizer regexes (PCRE2, Unicode properties) named by
//            tokenizer.ggml.pre, and each piece is mapped byte -> unicode and merged pairwise by
//            merge rank.
//   "llama"  SentencePiece BPE by scores, as llama.cpp's SPM tokenizer: special tokens are cut
//            out first, spaces become U+2581 ("▁"), optionally after a space put in front
//            (add_space_prefix), and each remaining fragment is split into UTF-8 characters that
//            are merged pairwise, the adjacent pair whose merged text is the vocabulary entry with
//            the highest score first (ties: the leftmost); characters left without a token become
//            their bytes' <0xXX> tokens (byte fallback), or the unknown token.
//
// Text in and out is UTF-8 bytes in std::string. Token ids are int32_t in [0, vocabSize()).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace cortex::model {

class GGUFFile;

// Token types as GGUF stores them in tokenizer.ggml.token_type (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  Undefined = 0,
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
};

// Everything a tokenizer is built from, as plain values (what tokenizer.ggml.* holds).
struct VocabData {
  // Token text as stored: byte->unicode mapped ("gpt2") or with U+2581 for spaces ("llama");
  // index = id.
  std::vector<std::string> tokens;
  std::vector<std::string> merges;   // "gpt2": "left right", highest priority first
  std::vector<float> scores;         // "llama": merge priority per token; empty means all 0
  std::vector<int32_t> tokenTypes;   // TokenType per token; empty means all Normal
  std::string model = "gpt2";        // tokenizer.ggml.model: "gpt2" or "llama"
  std::string pre = "default";       // tokenizer.ggml.pre ("gpt2" only)
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;  // -1 if absent
  bool addBos = false;
  bool addEos = false;
  bool addSpacePrefix = true;        // "llama" only: a space in front of the text (see encode)
  std::optional<std::string> chatTemplate;
};

class Tokenizer {
 public:
  // Builds a tokenizer from plain data. Throws ModelError when the model is neither "gpt2" nor
  // "llama", the pre-tokenizer name is unknown ("gpt2"), arrays disagree in length, or a special
  // id is out of range.
  explicit Tokenizer(VocabData data);
  // Reads tokenizer.ggml.* and tokenizer.chat_template from a GGUF file; same errors as above,
  // plus ModelError when a required key is missing or has the wrong type. For "llama" the
  // defaults are llama.cpp's: bos 1, eos 2, unk 0 (when in range), add_bos_token true,
  // add_eos_token false, add_space_prefix true.
  static Tokenizer fromGGUF(const GGUFFile& file);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids for `text` (any bytes; invalid UTF-8 is kept byte for byte). addSpecial prepends
  // BOS when the model asks for it (addBos) and appends EOS when it asks for that (addEos).
  // parseSpecial lets control tokens written in the text (e.g. "<|im_start|>") become their
  // single ids; user-defined tokens always do (as llama.cpp). Where several special tokens could
  // match, the longer one wins. "llama": every raw-text fragment that starts the text or follows
  // a special token gets a space in front when addSpacePrefix.
  // Thread-safe (const, no shared mutable state).
  std::vector<int32_t> encode(std::string_view text, bool addSpecial = true,
                              bool parseSpecial = true) const;
  // The same, with control tokens recognised only where one starts at a byte offset listed in
  // controlOffsets (ascending): elsewhere their text is plain text. For prompts built from a
  // template around untrusted content (encodeChat in chat_template.h), so that a user who types
  // "<|im_end|>" cannot end their own turn.
  std::vector<int32_t> encode(std::string_view text, bool addSpecial,
                              std::span<const size_t> controlOffsets) const;

  // The bytes token `id` stands for: byte-level decoded ("gpt2") or with U+2581 turned back into
  // spaces ("llama") for normal tokens, the byte itself for <0xXX> byte tokens, the literal text
  // for control/user-defined ones ("llama": nothing for unused/undefined ones, as llama.cpp).
  // The bytes need not be valid UTF-8 on their own (a token may hold part of a character).
  // Throws ModelError for an id outside [0, vocabSize()).
  const std::string& tokenToPiece(int32_t id) const;

  // Concatenated pieces of `ids` (raw bytes; possibly invalid UTF-8, which the caller may pass to
  // replaceInvalidUtf8). Control tokens (isControl) are rendered only when renderSpecial is true.
  // "llama" with addSpacePrefix: the first token's piece loses one leading space, as llama.cpp's
  // detokenize (so a text that starts with BOS keeps the space after it). Throws ModelError on an
  // invalid id.
  std::string decode(std::span<const int32_t> ids, bool renderSpecial = true) const;

  // Token text exactly as stored in the vocabulary (mapped form); ModelError on an invalid id.
  const std::string& tokenText(int32_t id) const;
  // Id of the vocabulary entry whose stored text is exactly `text`, if any.
  std::optional<int32_t> findToken(std::string_view text) const;
  TokenType tokenType(int32_t id) const;
  // True for the tokens decode leaves out unless renderSpecial: control tokens, and for "llama"
  // also unknown-type tokens and those llama.cpp treats as control by their text (end-of-
  // generation and fill-in-the-middle markers such as "</s>").
  bool isControl(int32_t id) const;

  // Number of tokens in the vocabulary.
  int32_t vocabSize() const;
  int32_t bos() const;  // -1 if the model has none; likewise eos/unk/pad
  int32_t eos() const;
  int32_t unk() const;
  int32_t pad() const;
  bool addBos() const;
  bool addEos() const;
  // "llama" with tokenizer.ggml.add_space_prefix; false for "gpt2".
  bool addSpacePrefix() const;
  // tokenizer.ggml.model: "gpt2" or "llama".
  const std::string& model() const;
  // True for ids that end a generation: eos, and tokens such as <|im_end|>, <|endoftext|>,
  // <|eot_id|>, <end_of_turn> (the set llama.cpp treats as end-of-generation; "gpt2": control
  // tokens only).
  bool isEndOfGeneration(int32_t id) const;
  // tokenizer.chat_template, if the file had one.
  const std::optional<std::string>& chatTemplate() const;
  // The tokenizer.ggml.pre name this tokenizer splits text with.
  const std::string& preTokenizerName() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Incremental detokenizer for streaming. push(id) returns only text that is complete UTF-8: an
// incomplete multi-byte character at the end is held back until later tokens complete it. Bytes
// that can never form a valid character are replaced by U+FFFD as soon as that is certain, so the
// output is always valid UTF-8. Pieces are tokenToPiece's: unlike decode, the first one keeps a
// leading space (a stream continues a text). Holds a reference to the tokenizer, which must
// outlive it.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool renderSpecial = true);
  // Appends token `id` and returns the newly completed text (possibly empty). Throws ModelError
  // on an invalid id, leaving the decoder unchanged.
  std::string push(int32_t id);
  // Returns the held-back bytes (an incomplete character becomes U+FFFD) and empties the decoder.
  std::string flush();
  // Bytes currently held back (0..3).
  size_t pendingBytes() const { return pending_.size(); }

 private:
  const Tokenizer* tokenizer_;
  bool renderSpecial_;
  std::string pending_;
};

// Returns `bytes` with every maximal ill-formed UTF-8 subsequence replaced by U+FFFD (the
// Unicode "maximal subpart" practice); valid input comes back unchanged.
std::string replaceInvalidUtf8(std::string_view bytes);

}  // namespace cortex::model
