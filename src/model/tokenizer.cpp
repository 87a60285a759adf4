#include "model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <queue>
#include <unordered_map>
#include <utility>

#include "model/errors.h"
#include "model/gguf.h"
#include "model/utf8.h"

namespace cortex::model {

namespace {

// ---- UTF-8 helpers ------------------------------------------------------------------------------

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

// Result of looking at the UTF-8 sequence that starts at bytes[0].
struct Utf8Step {
  enum Kind { Valid, Invalid, Incomplete } kind;
  size_t length;  // Valid: bytes of the character; Invalid: bytes of the maximal ill-formed
                  // subpart (>= 1); Incomplete: bytes present (a valid prefix that ran out).
};

// Classifies the sequence at the start of `s` (non-empty) per the Unicode table of well-formed
// UTF-8 byte sequences, so invalid input is replaced the same way browsers and Python do.
Utf8Step utf8Step(std::string_view s) {
  const auto b0 = static_cast<uint8_t>(s[0]);
  if (b0 < 0x80) return {Utf8Step::Valid, 1};
  size_t need = 0;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return {Utf8Step::Invalid, 1};
  }
  for (size_t i = 1; i <= need; ++i) {
    if (i >= s.size()) return {Utf8Step::Incomplete, i};
    const auto b = static_cast<uint8_t>(s[i]);
    const uint8_t l = i == 1 ? lo : uint8_t{0x80};
    const uint8_t h = i == 1 ? hi : uint8_t{0xBF};
    if (b < l || b > h) return {Utf8Step::Invalid, i};
  }
  return {Utf8Step::Valid, need + 1};
}

// Decodes one code point of valid UTF-8 at s[i..], advancing i; invalid bytes come back as
// themselves with `valid` false (the caller copies them through).
uint32_t nextCodePoint(std::string_view s, size_t& i, bool& valid) {
  const Utf8Step step = utf8Step(s.substr(i));
  if (step.kind != Utf8Step::Valid) {
    valid = false;
    return static_cast<uint8_t>(s[i++]);
  }
  valid = true;
  const auto b0 = static_cast<uint8_t>(s[i]);
  uint32_t cp = step.length == 1 ? b0 : b0 & (0x7F >> step.length);
  for (size_t k = 1; k < step.length; ++k) cp = (cp << 6) | (static_cast<uint8_t>(s[i + k]) & 0x3F);
  i += step.length;
  return cp;
}

// ---- GPT-2 byte <-> unicode mapping --------------------------------------------------------------

// GPT-2 maps each byte to a printable code point so BPE runs on visible text: printable Latin-1
// bytes map to themselves, the other 68 bytes to U+0100.. in byte order. All code points < 324.
struct ByteMap {
  std::array<std::string, 256> byteToText;  // UTF-8 of the mapped code point
  std::array<int16_t, 324> cpToByte;        // -1 where the code point is not a mapped byte
  ByteMap() {
    cpToByte.fill(-1);
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      const uint32_t cp = printable ? b : next++;
      appendUtf8(byteToText[b], cp);
      cpToByte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteMap& byteMap() {
  static const ByteMap map;
  return map;
}

// ---- pre-tokenizer regexes (llama.cpp's llm_tokenizer_bpe, by tokenizer.ggml.pre) ----------------

constexpr const char* kGpt2Regex =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";
constexpr const char* kLlama3Regex =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Regexes applied in order; each splits every piece left by the previous one into its matches
// and the gaps between them (both kept).
std::vector<std::string> preTokenizerRegexes(const std::string& pre) {
  // note: "smollm" is SmolLM2's HF Sequence[Digits(individual_digits), ByteLevel]: each digit
  // alone, then the GPT-2 split.
  if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" ||
      pre == "codeshell" || pre == "exaone") {
    return {"\\p{N}", kGpt2Regex};
  }
  if (pre == "gpt2" || pre == "mpt" || pre == "olmo" || pre == "jais") return {kGpt2Regex};
  if (pre == "llama3" || pre == "llama-v3" || pre == "llama-bpe" || pre == "dbrx" ||
      pre == "smaug-bpe") {
    return {kLlama3Regex};
  }
  if (pre == "default" || pre.empty()) {
    return {"[\\p{P}\\$\\+<=>\\^~\\|]+", kGpt2Regex, "\\p{N}+", "[0-9][0-9][0-9]"};
  }
  throw ModelError("unknown pre-tokenizer '" + pre +
                   "' (tokenizer.ggml.pre); supported: smollm, starcoder, refact, command-r, "
                   "codeshell, exaone, gpt2, mpt, olmo, jais, llama3, llama-bpe, dbrx, "
                   "smaug-bpe, default");
}

// A compiled PCRE2 pattern, shared read-only between threads (matching uses per-call data).
class Regex {
 public:
  explicit Regex(const std::string& pattern) {
    int err = 0;
    PCRE2_SIZE errOffset = 0;
    // note: UCP makes \s, \p{..} Unicode-aware; MATCH_INVALID_UTF lets invalid bytes pass through
    // as unmatched gaps instead of failing the whole match.
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &errOffset,
                          nullptr);
    if (code_ == nullptr) {
      std::array<PCRE2_UCHAR, 256> msg{};
      pcre2_get_error_message(err, msg.data(), msg.size());
      throw ModelError("pre-tokenizer regex failed to compile at offset " +
                       std::to_string(errOffset) + ": " +
                       reinterpret_cast<const char*>(msg.data()));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // best effort: falls back to the interpreter
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }
  const pcre2_code* code() const { return code_; }

 private:
  pcre2_code* code_ = nullptr;
};

struct MatchData {
  explicit MatchData(const Regex& re) : md(pcre2_match_data_create_from_pattern(re.code(), nullptr)) {
    if (md == nullptr) throw std::bad_alloc();
  }
  MatchData(const MatchData&) = delete;
  MatchData& operator=(const MatchData&) = delete;
  ~MatchData() { pcre2_match_data_free(md); }
  pcre2_match_data* md;
};

struct Span {
  size_t offset, length;  // bytes
};

// Splits each span of `text` by `re` into matches and the gaps between them, in order.
std::vector<Span> splitByRegex(std::string_view text, const std::vector<Span>& spans,
                               const Regex& re) {
  MatchData data(re);
  std::vector<Span> out;
  out.reserve(spans.size() * 2);
  for (const Span& span : spans) {
    // note: the subject is the span alone, so look-arounds do not see neighbouring pieces.
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data() + span.offset);
    size_t pos = 0;      // next byte to search from
    size_t emitted = 0;  // bytes of the span already emitted
    while (pos < span.length) {
      const int rc = pcre2_match(re.code(), subject, span.length, pos, 0, data.md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        std::array<PCRE2_UCHAR, 256> msg{};
        pcre2_get_error_message(rc, msg.data(), msg.size());
        throw ModelError(std::string("pre-tokenizer regex match failed: ") +
                         reinterpret_cast<const char*>(msg.data()));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data.md);
      const size_t start = ov[0], end = ov[1];
      if (end == start) {  // an empty match cannot split anything; step over one byte
        pos = start + 1;
        continue;
      }
      if (start > emitted) out.push_back({span.offset + emitted, start - emitted});
      out.push_back({span.offset + start, end - start});
      emitted = pos = end;
    }
    if (emitted < span.length) out.push_back({span.offset + emitted, span.length - emitted});
  }
  return out;
}

uint64_t pairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// "gpt2": control tokens with these texts end a generation.
constexpr std::array<std::string_view, 9> kEndOfGenerationTexts = {
    "<|eot_id|>", "<|im_end|>",  "<|end|>",         "<end_of_turn>", "<|endoftext|>",
    "<EOT>",      "_<EOT>",      "<|end_of_text|>", "<｜end▁of▁sentence｜>"};

// "llama": llama.cpp finds end-of-generation tokens by these texts, whatever their type, and
// treats them as control tokens from then on.
constexpr std::array<std::string_view, 23> kSpmEndOfGenerationTexts = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[", "<|plamo:eos|>"};
// Fill-in-the-middle pad/repo/separator markers: control tokens that also end a generation.
constexpr std::array<std::string_view, 11> kSpmFimEndTexts = {
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|repo_name|>",
    "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>"};
// Fill-in-the-middle prefix/suffix/middle markers: control tokens.
constexpr std::array<std::string_view, 24> kSpmFimTexts = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
    "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>",
    "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
    "<|middle|>"};

template <size_t N>
bool oneOf(const std::array<std::string_view, N>& texts, std::string_view text) {
  return std::find(texts.begin(), texts.end(), text) != texts.end();
}

// What llama.cpp makes of a "llama" token by its text alone.
enum class TextRule : uint8_t { None, Control, EndOfGeneration, AlwaysRendered };

TextRule textRule(std::string_view text) {
  static const std::unordered_map<std::string_view, TextRule> rules = [] {
    std::unordered_map<std::string_view, TextRule> m;
    for (const std::string_view t : kSpmFimTexts) m.emplace(t, TextRule::Control);
    for (const std::string_view t : kSpmFimEndTexts) m.emplace(t, TextRule::EndOfGeneration);
    for (const std::string_view t : kSpmEndOfGenerationTexts) m.emplace(t, TextRule::EndOfGeneration);
    for (const std::string_view t : {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}) {
      m.emplace(t, TextRule::AlwaysRendered);
    }
    return m;
  }();
  // note: every listed text starts with one of these bytes; most tokens are skipped by that.
  if (text.empty() || (text[0] != '<' && text[0] != '[' && text[0] != '_' && text[0] != '\xE2')) {
    return TextRule::None;
  }
  const auto it = rules.find(text);
  return it == rules.end() ? TextRule::None : it->second;
}

// Token attributes as bits, as llama.cpp's llama_token_attr.
enum Attr : uint8_t {
  kAttrUnknown = 1,
  kAttrUnused = 2,
  kAttrNormal = 4,
  kAttrControl = 8,
  kAttrUserDefined = 16,
  kAttrByte = 32,
};

uint8_t attrOfType(TokenType t) {
  switch (t) {
    case TokenType::Unknown: return kAttrUnknown;
    case TokenType::Normal: return kAttrNormal;
    case TokenType::Control: return kAttrControl;
    case TokenType::UserDefined: return kAttrUserDefined;
    case TokenType::Unused: return kAttrUnused;
    case TokenType::Byte: return kAttrByte;
    case TokenType::Undefined: break;
  }
  return 0;
}

constexpr std::string_view kSpmSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

// Lengths of a UTF-8 sequence by the high nibble of its first byte, as llama.cpp splits text for
// SentencePiece (a stray continuation byte is a character of its own).
constexpr std::array<uint8_t, 16> kUtf8LengthByNibble = {1, 1, 1, 1, 1, 1, 1, 1,
                                                         1, 1, 1, 1, 2, 2, 3, 4};

// Token ids by their text: open addressing over ids, the texts staying in the vocabulary.
class TokenIndex {
 public:
  // Indexes `texts`, which must outlive this index and not move; the first of equal texts wins.
  void build(const std::vector<std::string>& texts) {
    texts_ = &texts;
    size_t capacity = 16;
    while (capacity < texts.size() * 2) capacity <<= 1;
    slots_.assign(capacity, Slot{-1, 0});
    mask_ = capacity - 1;
    for (size_t i = 0; i < texts.size(); ++i) {
      const size_t h = hashOf(texts[i]);
      for (size_t s = h & mask_;; s = (s + 1) & mask_) {
        Slot& slot = slots_[s];
        if (slot.id < 0) {
          slot = {static_cast<int32_t>(i), static_cast<uint32_t>(h)};
          break;
        }
        if (slot.hash == static_cast<uint32_t>(h) && texts[static_cast<size_t>(slot.id)] == texts[i]) {
          break;  // a duplicate: the first one stays
        }
      }
    }
  }
  // The id whose text is `text`, or -1.
  int32_t find(std::string_view text) const {
    const size_t h = hashOf(text);
    for (size_t s = h & mask_;; s = (s + 1) & mask_) {
      const Slot& slot = slots_[s];
      if (slot.id < 0) return -1;
      if (slot.hash == static_cast<uint32_t>(h) && (*texts_)[static_cast<size_t>(slot.id)] == text) {
        return slot.id;
      }
    }
  }

 private:
  struct Slot {
    int32_t id;
    uint32_t hash;  // low bits of the text's hash, to skip most text comparisons
  };
  static size_t hashOf(std::string_view s) { return std::hash<std::string_view>{}(s); }

  const std::vector<std::string>* texts_ = nullptr;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// The special tokens that are cut out of a text before tokenizing it, and where they occur.
class SpecialMatcher {
 public:
  struct Entry {
    std::string_view text;
    int32_t id;
    int32_t rank;  // priority: lower ranks are cut out first
    bool control;  // cut out only when parsing special tokens
  };
  // `entries` in priority order (rank = index); the texts must outlive the matcher.
  void build(std::vector<Entry> entries) {
    for (size_t i = 0; i < entries.size(); ++i) entries[i].rank = static_cast<int32_t>(i);
    // note: by text, so the entries sharing a prefix form a range (shorter ones first).
    std::sort(entries.begin(), entries.end(),
              [](const Entry& a, const Entry& b) { return a.text < b.text; });
    entries_ = std::move(entries);
    byRank_.resize(entries_.size());
    for (size_t i = 0; i < entries_.size(); ++i) {
      byRank_[static_cast<size_t>(entries_[i].rank)] = static_cast<uint32_t>(i);
    }
    firstRange_.fill({0, 0});
    for (size_t i = entries_.size(); i-- > 0;) {
      auto& range = firstRange_[static_cast<uint8_t>(entries_[i].text[0])];
      if (range.second == 0) range.second = static_cast<uint32_t>(i + 1);
      range.first = static_cast<uint32_t>(i);
    }
  }
  size_t size() const { return entries_.size(); }
  const Entry& byRank(int32_t rank) const { return entries_[byRank_[static_cast<size_t>(rank)]]; }

  // Calls f(entry) for every entry whose text occurs in `text` at `pos`.
  template <typename F>
  void forEachAt(std::string_view text, size_t pos, F&& f) const {
    const auto c0 = static_cast<uint8_t>(text[pos]);
    auto lo = entries_.begin() + firstRange_[c0].first;
    auto hi = entries_.begin() + firstRange_[c0].second;
    // [lo, hi) holds the entries whose first k + 1 bytes are text[pos, pos + k + 1).
    for (size_t k = 0; lo != hi; ++k) {
      for (; lo != hi && lo->text.size() == k + 1; ++lo) f(*lo);  // ends here: a match
      if (lo == hi || pos + k + 1 >= text.size()) return;
      const auto c = static_cast<uint8_t>(text[pos + k + 1]);
      lo = std::lower_bound(lo, hi, c, [k](const Entry& e, uint8_t v) {
        return static_cast<uint8_t>(e.text[k + 1]) < v;
      });
      hi = std::upper_bound(lo, hi, c, [k](uint8_t v, const Entry& e) {
        return v < static_cast<uint8_t>(e.text[k + 1]);
      });
    }
  }

 private:
  std::vector<Entry> entries_;
  std::vector<uint32_t> byRank_;  // index in entries_ of each rank
  std::array<std::pair<uint32_t, uint32_t>, 256> firstRange_{};  // entries by first byte
};

}  // namespace

// ---- Tokenizer ----------------------------------------------------------------------------------

struct Tokenizer::Impl {
  VocabData data;
  bool spm = false;                 // "llama" (SentencePiece); otherwise "gpt2"
  std::vector<TokenType> types;
  std::vector<uint8_t> attrs;       // Attr bits per token, as llama.cpp sees them
  // Decoded bytes per id: the token's own text where pieceSlot is -1 (most control, user-defined
  // and plain tokens), else otherPieces[pieceSlot].
  std::vector<int32_t> pieceSlot;
  std::vector<std::string> otherPieces;
  TokenIndex textToId;
  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  std::unordered_map<uint64_t, Merge> merges;  // "gpt2": (left id, right id) -> rank, merged id
  std::array<int32_t, 256> byteToken{};        // id of each single byte, -1 if none
  SpecialMatcher specials;
  std::vector<bool> endOfGeneration;
  std::vector<std::unique_ptr<Regex>> regexes;
  uint8_t hiddenAttrs = kAttrControl;  // decode(renderSpecial = false) leaves these out

  // Tokenizer::encode; controlAt, when given, lists where control tokens may start.
  std::vector<int32_t> encode(std::string_view text, bool addSpecial, bool parseSpecial,
                              const std::span<const size_t>* controlAt) const;

  void checkId(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= data.tokens.size()) {
      throw ModelError("token id " + std::to_string(id) + " is out of range [0, " +
                       std::to_string(data.tokens.size()) + ")");
    }
  }
  bool hidden(int32_t id) const { return (attrs[static_cast<size_t>(id)] & hiddenAttrs) != 0; }
  const std::string& piece(int32_t id) const {
    const int32_t slot = pieceSlot[static_cast<size_t>(id)];
    return slot < 0 ? data.tokens[static_cast<size_t>(id)] : otherPieces[static_cast<size_t>(slot)];
  }
  // Records the piece of token `id` when it differs from the token's text.
  void setPiece(size_t id, std::string piece) {
    if (piece == data.tokens[id]) return;
    pieceSlot[id] = static_cast<int32_t>(otherPieces.size());
    otherPieces.push_back(std::move(piece));
  }

  void buildGpt2();
  void buildSpm();

  // A piece of the text: a special token's id, or raw text (id -1).
  struct Fragment {
    int32_t id;
    size_t offset, length;
  };
  // Cuts special tokens out of `text`, as llama.cpp: in priority order, each takes its leftmost
  // non-overlapping occurrences in the raw text that earlier ones left.
  std::vector<Fragment> partition(std::string_view text, bool parseSpecial,
                                  const std::span<const size_t>* controlAt) const;

  // Appends the BPE tokens of one pre-tokenized piece (raw bytes) to `out` ("gpt2").
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  // Appends the SentencePiece tokens of one raw-text fragment to `out` ("llama").
  struct SpmScratch;
  void spmFragment(std::string_view fragment, bool spacePrefix, SpmScratch& scratch,
           std::vector<int32_t>& out) const;
  // The token of byte `b` when no token covers it.
  int32_t byteFallback(uint8_t b) const;
};

namespace {

// Bytes a "gpt2" vocabulary entry stands for, from its stored text and type.
std::string decodePiece(const std::string& text, TokenType type) {
  if (type == TokenType::Control || type == TokenType::UserDefined) return text;
  if (type == TokenType::Byte && text.size() == 6 && text.starts_with("<0x") && text[5] == '>') {
    return std::string(1, static_cast<char>(std::stoi(text.substr(3, 2), nullptr, 16)));
  }
  const ByteMap& map = byteMap();
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const size_t start = i;
    bool valid = false;
    const uint32_t cp = nextCodePoint(text, i, valid);
    if (valid && cp < map.cpToByte.size() && map.cpToByte[cp] >= 0) {
      out += static_cast<char>(map.cpToByte[cp]);
    } else {
      out.append(text, start, i - start);  // not a mapped byte: keep the text as it is
    }
  }
  return out;
}

int hexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Bytes a "llama" vocabulary entry stands for, from its stored text and attributes (llama.cpp's
// token_to_piece for SentencePiece with special tokens rendered).
std::string decodeSpmPiece(const std::string& text, uint8_t attrs) {
  if (attrs & (kAttrControl | kAttrUnknown | kAttrUserDefined)) return text;
  if (attrs & kAttrNormal) {
    std::string out;
    out.reserve(text.size());
    for (size_t pos = 0;;) {
      const size_t hit = text.find(kSpmSpace, pos);
      if (hit == std::string::npos) {
        out.append(text, pos);
        return out;
      }
      out.append(text, pos, hit - pos);
      out += ' ';
      pos = hit + kSpmSpace.size();
    }
  }
  if (attrs & kAttrByte) {
    // note: as llama.cpp, the hex digits after "<0x" (up to the first non-digit) are the byte.
    int value = 0;
    for (size_t i = 3; i < text.size() && hexValue(text[i]) >= 0; ++i) {
      value = value * 16 + hexValue(text[i]);
    }
    return std::string(1, static_cast<char>(value & 0xFF));
  }
  return {};  // unused or undefined: nothing, as llama.cpp
}

}  // namespace

Tokenizer::Tokenizer(VocabData data) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (data.model != "gpt2" && data.model != "llama") {
    throw ModelError("unsupported tokenizer model '" + data.model +
                     "' (tokenizer.ggml.model); supported: byte-level BPE 'gpt2', "
                     "SentencePiece 'llama'");
  }
  const size_t n = data.tokens.size();
  if (n == 0) throw ModelError("tokenizer vocabulary is empty (tokenizer.ggml.tokens)");
  if (n > static_cast<size_t>(INT32_MAX)) throw ModelError("tokenizer vocabulary is too large");
  if (!data.tokenTypes.empty() && data.tokenTypes.size() != n) {
    throw ModelError("tokenizer.ggml.token_type has " + std::to_string(data.tokenTypes.size()) +
                     " entries but tokenizer.ggml.tokens has " + std::to_string(n));
  }
  if (!data.scores.empty() && data.scores.size() != n) {
    throw ModelError("tokenizer.ggml.scores has " + std::to_string(data.scores.size()) +
                     " entries but tokenizer.ggml.tokens has " + std::to_string(n));
  }
  for (auto [name, id] : {std::pair{"bos", data.bos}, std::pair{"eos", data.eos},
                          std::pair{"unk", data.unk}, std::pair{"pad", data.pad}}) {
    if (id < -1 || id >= static_cast<int64_t>(n)) {
      throw ModelError(std::string("tokenizer ") + name + " token id " + std::to_string(id) +
                       " is out of range [0, " + std::to_string(n) + ")");
    }
  }
  if (data.addBos && data.bos < 0) {
    throw ModelError("tokenizer asks to add a BOS token but has no bos token id");
  }
  if (data.addEos && data.eos < 0) {
    throw ModelError("tokenizer asks to add an EOS token but has no eos token id");
  }

  m.spm = data.model == "llama";
  m.data = std::move(data);  // note: first, so that the index below points at the final texts
  m.types.resize(n, TokenType::Normal);
  for (size_t i = 0; i < n && !m.data.tokenTypes.empty(); ++i) {
    const int32_t t = m.data.tokenTypes[i];
    if (t < 0 || t > 6) {
      throw ModelError("token " + std::to_string(i) + " has unknown token type " +
                       std::to_string(t));
    }
    m.types[i] = static_cast<TokenType>(t);
  }
  m.textToId.build(m.data.tokens);
  if (m.spm) {
    m.buildSpm();
  } else {
    m.buildGpt2();
  }
}

void Tokenizer::Impl::buildGpt2() {
  const size_t n = data.tokens.size();
  for (const std::string& re : preTokenizerRegexes(data.pre)) {
    regexes.push_back(std::make_unique<Regex>(re));
  }
  attrs.resize(n);
  pieceSlot.assign(n, -1);
  endOfGeneration.assign(n, false);
  std::vector<SpecialMatcher::Entry> special;
  for (size_t i = 0; i < n; ++i) {
    const auto id = static_cast<int32_t>(i);
    const TokenType t = types[i];
    attrs[i] = attrOfType(t);
    setPiece(i, decodePiece(data.tokens[i], t));
    if ((t == TokenType::Control || t == TokenType::UserDefined) && !data.tokens[i].empty()) {
      special.push_back({data.tokens[i], id, 0, t == TokenType::Control});
    }
    if (t == TokenType::Control && oneOf(kEndOfGenerationTexts, data.tokens[i])) {
      endOfGeneration[i] = true;
    }
  }
  if (data.eos >= 0) endOfGeneration[static_cast<size_t>(data.eos)] = true;
  // note: longest first, so a special token that contains another wins (as llama.cpp).
  std::stable_sort(special.begin(), special.end(), [](const auto& a, const auto& b) {
    return a.text.size() > b.text.size();
  });
  specials.build(std::move(special));

  const ByteMap& map = byteMap();
  for (size_t b = 0; b < 256; ++b) byteToken[b] = textToId.find(map.byteToText[b]);

  merges.reserve(data.merges.size());
  std::string joined;
  for (size_t r = 0; r < data.merges.size(); ++r) {
    const std::string& merge = data.merges[r];
    const size_t space = merge.find(' ', 1);  // note: the left part is never empty
    if (space == std::string::npos) {
      throw ModelError("tokenizer merge " + std::to_string(r) + " ('" + merge +
                       "') is not of the form 'left right'");
    }
    const std::string_view left(merge.data(), space);
    const std::string_view right(merge.data() + space + 1, merge.size() - space - 1);
    const int32_t l = textToId.find(left);
    const int32_t rt = textToId.find(right);
    joined.assign(left);
    joined += right;
    const int32_t merged = textToId.find(joined);
    // note: a merge whose parts or result are not in the vocabulary can never apply; skip it.
    if (l < 0 || rt < 0 || merged < 0) continue;
    merges.emplace(pairKey(l, rt), Merge{static_cast<int32_t>(r), merged});  // first rank wins
  }
}

void Tokenizer::Impl::buildSpm() {
  const size_t n = data.tokens.size();
  attrs.resize(n);
  endOfGeneration.assign(n, false);
  // Attributes by type, then llama.cpp's adjustments by token text.
  int32_t toolResponse = -1, plamoEos = -1, closingS = -1;
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = data.tokens[i];
    uint8_t a = attrOfType(types[i]);
    const TextRule rule = textRule(text);
    const bool eog = rule == TextRule::EndOfGeneration;
    if (eog || rule == TextRule::Control) a |= kAttrControl;
    if (rule == TextRule::AlwaysRendered) a = kAttrUserDefined;  // as llama.cpp
    attrs[i] = a;
    endOfGeneration[i] = eog;
    if (eog && text == "<|tool_response>") toolResponse = static_cast<int32_t>(i);
    if (eog && text == "<|plamo:eos|>") plamoEos = static_cast<int32_t>(i);
    if (eog && text == "</s>") closingS = static_cast<int32_t>(i);
  }
  if ((toolResponse >= 0 || plamoEos >= 0) && closingS >= 0) {
    // note: where such markers exist "</s>" is an ordinary token (llama.cpp).
    endOfGeneration[static_cast<size_t>(closingS)] = false;
    attrs[static_cast<size_t>(closingS)] = kAttrNormal;
  }
  if (data.eos >= 0) endOfGeneration[static_cast<size_t>(data.eos)] = true;
  hiddenAttrs = kAttrControl | kAttrUnknown;

  pieceSlot.assign(n, -1);
  std::vector<SpecialMatcher::Entry> special;
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = data.tokens[i];
    const bool plain = (attrs[i] & (kAttrControl | kAttrUnknown | kAttrUserDefined)) ||
                       ((attrs[i] & kAttrNormal) && text.find(kSpmSpace) == std::string::npos);
    if (!plain) setPiece(i, decodeSpmPiece(text, attrs[i]));
    if ((attrs[i] & (kAttrControl | kAttrUserDefined | kAttrUnknown)) && !text.empty()) {
      special.push_back({text, static_cast<int32_t>(i), 0,
                         (attrs[i] & (kAttrControl | kAttrUnknown)) != 0});
    }
  }
  // note: longest first; std::sort over ascending ids, exactly as llama.cpp orders them, so that
  // equally long specials that overlap resolve the same way.
  std::sort(special.begin(), special.end(),
            [](const auto& a, const auto& b) { return a.text.size() > b.text.size(); });
  specials.build(std::move(special));

  static constexpr std::string_view kHex = "0123456789ABCDEF";
  for (size_t b = 0; b < 256; ++b) {
    const std::string name = {'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
    int32_t id = textToId.find(name);
    if (id < 0) id = textToId.find(std::string(1, static_cast<char>(b)));
    byteToken[b] = id;
  }
}

Tokenizer Tokenizer::fromGGUF(const GGUFFile& file) {
  auto context = [&file](const std::string& what) {
    return ModelError(file.path() + ": " + what);
  };
  VocabData d;
  d.model = file.getString("tokenizer.ggml.model");
  const bool spm = d.model == "llama";
  d.pre = file.has("tokenizer.ggml.pre") ? file.getString("tokenizer.ggml.pre") : "default";
  d.tokens = file.getStringArray("tokenizer.ggml.tokens");
  if (file.has("tokenizer.ggml.merges")) d.merges = file.getStringArray("tokenizer.ggml.merges");
  if (spm && file.has("tokenizer.ggml.scores")) {
    d.scores = file.getF32Array("tokenizer.ggml.scores");
  }
  if (file.has("tokenizer.ggml.token_type")) {
    d.tokenTypes = file.getI32Array("tokenizer.ggml.token_type");
  }
  const auto n = static_cast<int64_t>(d.tokens.size());
  auto optionalId = [&](std::string_view key, int32_t fallback) -> int32_t {
    if (!file.has(key)) return fallback < n ? fallback : -1;
    const int64_t v = file.getI64(key);
    if (v < -1 || v > INT32_MAX) {
      throw context(std::string(key) + " = " + std::to_string(v) + " is not a valid token id");
    }
    return static_cast<int32_t>(v);
  };
  // note: llama.cpp's defaults for SentencePiece vocabularies that do not name their specials.
  d.bos = optionalId("tokenizer.ggml.bos_token_id", spm ? 1 : -1);
  d.eos = optionalId("tokenizer.ggml.eos_token_id", spm ? 2 : -1);
  d.unk = optionalId("tokenizer.ggml.unknown_token_id", spm ? 0 : -1);
  d.pad = optionalId("tokenizer.ggml.padding_token_id", -1);
  auto optionalBool = [&](std::string_view key, bool fallback) {
    return file.has(key) ? file.getBool(key) : fallback;
  };
  d.addBos = optionalBool("tokenizer.ggml.add_bos_token", spm);
  d.addEos = optionalBool("tokenizer.ggml.add_eos_token", false);
  d.addSpacePrefix = optionalBool("tokenizer.ggml.add_space_prefix", spm);
  if (file.has("tokenizer.chat_template")) d.chatTemplate = file.getString("tokenizer.chat_template");
  try {
    return Tokenizer(std::move(d));
  } catch (const ModelError& e) {
    throw context(e.what());
  }
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;



std::vector<Tokenizer::Impl::Fragment> Tokenizer::Impl::partition(
    std::string_view text, bool parseSpecial, const std::span<const size_t>* controlAt) const {
  std::vector<Fragment> fragments;
  if (!text.empty()) fragments.push_back({-1, 0, text.size()});
  // First the special tokens that occur in the text at all (one walk over it), then llama.cpp's
  // pass per special token, in priority order, over the raw fragments the previous passes left:
  // each takes its leftmost non-overlapping occurrences.
  std::vector<uint8_t> seen(specials.size(), 0);
  std::vector<int32_t> ranks;
  for (size_t pos = 0; pos < text.size(); ++pos) {
    specials.forEachAt(text, pos, [&](const SpecialMatcher::Entry& e) {
      if ((e.control && !parseSpecial) || seen[static_cast<size_t>(e.rank)]) return;
      seen[static_cast<size_t>(e.rank)] = 1;
      ranks.push_back(e.rank);
    });
  }
  std::sort(ranks.begin(), ranks.end());
  std::vector<Fragment> next;
  for (const int32_t rank : ranks) {
    const SpecialMatcher::Entry& e = specials.byRank(rank);
    next.clear();
    next.reserve(fragments.size() + 2);
    for (const Fragment& f : fragments) {
      if (f.id >= 0) {
        next.push_back(f);
        continue;
      }
      const std::string_view raw = text.substr(f.offset, f.length);
      size_t pos = 0;
      for (size_t hit = raw.find(e.text); hit != std::string_view::npos;
           hit = raw.find(e.text, std::max(pos, hit + 1))) {
        if (e.control && controlAt != nullptr &&
            !std::binary_search(controlAt->begin(), controlAt->end(), f.offset + hit)) {
          continue;  // not where the template put one: plain text
        }
        if (hit > pos) next.push_back({-1, f.offset + pos, hit - pos});
        next.push_back({e.id, f.offset + hit, e.text.size()});
        pos = hit + e.text.size();
      }
      if (pos < raw.size()) next.push_back({-1, f.offset + pos, raw.size() - pos});
    }
    fragments.swap(next);
  }
  return fragments;
}

void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  // Symbols form a linked list over the bytes of the word; merging absorbs the right symbol into
  // the left one. Candidate pairs sit in a min-heap by (rank, position); stale entries (a side
  // already merged) are recognised by their recorded ids and skipped.
  struct Symbol {
    int32_t id;
    int32_t prev, next;  // indices, -1 at the ends
    bool alive;
  };
  struct Candidate {
    int32_t rank, left, right, leftId, rightId, merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  for (size_t i = 0; i < word.size(); ++i) {
    const auto byte = static_cast<uint8_t>(word[i]);
    int32_t id = byteToken[byte];
    if (id < 0) {
      if (data.unk < 0) {
        constexpr std::string_view kHex = "0123456789abcdef";
        throw ModelError(std::string("byte 0x") + kHex[byte >> 4] + kHex[byte & 0xF] +
                         " has no token in the vocabulary and there is no unknown token");
      }
      id = data.unk;
    }
    const auto idx = static_cast<int32_t>(i);
    symbols.push_back({id, idx - 1, i + 1 < word.size() ? idx + 1 : -1, true});
  }
  if (symbols.size() == 1) {
    out.push_back(symbols[0].id);
    return;
  }
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  auto consider = [&](int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const int32_t leftId = symbols[static_cast<size_t>(left)].id;
    const int32_t rightId = symbols[static_cast<size_t>(right)].id;
    const auto it = merges.find(pairKey(leftId, rightId));
    if (it == merges.end()) return;
    heap.push({it->second.rank, left, right, leftId, rightId, it->second.merged});
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    consider(static_cast<int32_t>(i), static_cast<int32_t>(i + 1));
  }
  while (!heap.empty()) {
    const Candidate c = heap.top();
    heap.pop();
    Symbol& l = symbols[static_cast<size_t>(c.left)];
    Symbol& r = symbols[static_cast<size_t>(c.right)];
    if (!l.alive || !r.alive || l.next != c.right || l.id != c.leftId || r.id != c.rightId) {
      continue;  // stale
    }
    l.id = c.merged;
    l.next = r.next;
    r.alive = false;
    if (r.next >= 0) symbols[static_cast<size_t>(r.next)].prev = c.left;
    consider(l.prev, c.left);
    consider(c.left, l.next);
  }
  for (int32_t i = 0; i >= 0; i = symbols[static_cast<size_t>(i)].next) {
    out.push_back(symbols[static_cast<size_t>(i)].id);
  }
}


// Buffers one encode call reuses across its fragments.
struct Tokenizer::Impl::SpmScratch {
  struct Symbol {
    size_t offset, length;  // bytes of the escaped text; length 0 once merged into the left
    int64_t prev, next;     // indices, -1 at the ends
  };
  struct Bigram {
    float score;
    int64_t left, right;
    size_t length;  // bytes of both sides when queued: a side that changed since differs
  };
  // Highest score on top; among equal scores the leftmost pair.
  struct Lower {
    bool operator()(const Bigram& a, const Bigram& b) const {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    }
  };
  std::string text;
  std::vector<Symbol> symbols;
  std::vector<Bigram> heap;
};

int32_t Tokenizer::Impl::byteFallback(uint8_t b) const {
  if (byteToken[b] >= 0) return byteToken[b];
  if (data.unk >= 0) return data.unk;
  constexpr std::string_view kHex = "0123456789ABCDEF";
  throw ModelError(std::string("byte 0x") + kHex[b >> 4] + kHex[b & 0xF] +
                   " has no token in the vocabulary (no <0x..> byte token) and there is no "
                   "unknown token");
}

void Tokenizer::Impl::spmFragment(std::string_view fragment, bool spacePrefix, SpmScratch& s,
                          std::vector<int32_t>& out) const {
  using Symbol = SpmScratch::Symbol;
  using Bigram = SpmScratch::Bigram;
  std::string& text = s.text;
  text.clear();
  text.reserve(fragment.size() + 3);
  if (spacePrefix) text += kSpmSpace;
  for (const char c : fragment) {
    if (c == ' ') {
      text += kSpmSpace;
    } else {
      text += c;
    }
  }

  std::vector<Symbol>& symbols = s.symbols;
  symbols.clear();
  for (size_t offset = 0; offset < text.size();) {
    const size_t length = std::min<size_t>(
        kUtf8LengthByNibble[static_cast<uint8_t>(text[offset]) >> 4], text.size() - offset);
    const auto index = static_cast<int64_t>(symbols.size());
    offset += length;
    symbols.push_back({offset - length, length, index - 1, offset == text.size() ? -1 : index + 1});
  }

  std::vector<Bigram>& heap = s.heap;
  heap.clear();
  const SpmScratch::Lower lower;
  const bool scored = !data.scores.empty();
  auto tryPair = [&](int64_t left, int64_t right) {
    if (left < 0 || right < 0) return;
    const Symbol& l = symbols[static_cast<size_t>(left)];
    const Symbol& r = symbols[static_cast<size_t>(right)];
    const size_t length = l.length + r.length;
    const int32_t id = textToId.find(std::string_view(text).substr(l.offset, length));
    if (id < 0) return;
    heap.push_back({scored ? data.scores[static_cast<size_t>(id)] : 0.0f, left, right, length});
    std::push_heap(heap.begin(), heap.end(), lower);
  };
  for (size_t i = 1; i < symbols.size(); ++i) {
    tryPair(static_cast<int64_t>(i - 1), static_cast<int64_t>(i));
  }
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), lower);
    const Bigram b = heap.back();
    heap.pop_back();
    Symbol& l = symbols[static_cast<size_t>(b.left)];
    Symbol& r = symbols[static_cast<size_t>(b.right)];
    // note: sides only grow or vanish, so an unchanged total length means both are as queued.
    if (l.length == 0 || r.length == 0 || l.length + r.length != b.length) continue;
    l.length += r.length;
    r.length = 0;
    l.next = r.next;
    if (r.next >= 0) symbols[static_cast<size_t>(r.next)].prev = b.left;
    tryPair(l.prev, b.left);
    tryPair(b.left, l.next);
  }

  for (int64_t i = symbols.empty() ? -1 : 0; i >= 0; i = symbols[static_cast<size_t>(i)].next) {
    const Symbol& sym = symbols[static_cast<size_t>(i)];
    const std::string_view piece = std::string_view(text).substr(sym.offset, sym.length);
    const int32_t id = textToId.find(piece);
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    // note: merged symbols are always tokens; a single character without one becomes bytes.
    for (const char c : piece) out.push_back(byteFallback(static_cast<uint8_t>(c)));
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool addSpecial,
                                       bool parseSpecial) const {
  return impl_->encode(text, addSpecial, parseSpecial, nullptr);
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool addSpecial,
                                       std::span<const size_t> controlOffsets) const {
  return impl_->encode(text, addSpecial, true, &controlOffsets);
}

std::vector<int32_t> Tokenizer::Impl::encode(std::string_view text, bool addSpecial,
                                             bool parseSpecial,
                                             const std::span<const size_t>* controlAt) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (addSpecial && data.addBos) out.push_back(data.bos);
  const std::vector<Fragment> fragments = partition(text, parseSpecial, controlAt);
  if (spm) {
    SpmScratch scratch;
    bool afterSpecial = true;  // note: the start of the text counts as following a special
    for (const Fragment& f : fragments) {
      if (f.id >= 0) {
        out.push_back(f.id);
        afterSpecial = true;
        continue;
      }
      spmFragment(text.substr(f.offset, f.length), data.addSpacePrefix && afterSpecial, scratch, out);
      afterSpecial = false;
    }
  } else {
    for (const Fragment& f : fragments) {
      if (f.id >= 0) {
        out.push_back(f.id);
        continue;
      }
      std::vector<Span> words{{f.offset, f.length}};
      for (const auto& re : regexes) words = splitByRegex(text, words, *re);
      for (const Span& w : words) bpe(text.substr(w.offset, w.length), out);
    }
  }
  if (addSpecial && data.addEos) out.push_back(data.eos);
  return out;
}

const std::string& Tokenizer::tokenToPiece(int32_t id) const {
  impl_->checkId(id);
  return impl_->piece(id);
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool renderSpecial) const {
  std::string out;
  // note: llama.cpp drops one leading space of the first piece where it put a space in front.
  bool dropSpace = impl_->spm && impl_->data.addSpacePrefix;
  for (const int32_t id : ids) {
    impl_->checkId(id);
    const bool skip = !renderSpecial && impl_->hidden(id);
    const std::string& piece = impl_->piece(id);
    if (!skip) out.append(piece, dropSpace && piece.starts_with(' ') ? 1 : 0);
    dropSpace = false;
  }
  return out;
}

const std::string& Tokenizer::tokenText(int32_t id) const {
  impl_->checkId(id);
  return impl_->data.tokens[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::findToken(std::string_view text) const {
  const int32_t id = impl_->textToId.find(text);
  if (id < 0) return std::nullopt;
  return id;
}

TokenType Tokenizer::tokenType(int32_t id) const {
  impl_->checkId(id);
  return impl_->types[static_cast<size_t>(id)];
}

bool Tokenizer::isControl(int32_t id) const {
  impl_->checkId(id);
  return impl_->hidden(id);
}

int32_t Tokenizer::vocabSize() const { return static_cast<int32_t>(impl_->data.tokens.size()); }
int32_t Tokenizer::bos() const { return impl_->data.bos; }
int32_t Tokenizer::eos() const { return impl_->data.eos; }
int32_t Tokenizer::unk() const { return impl_->data.unk; }
int32_t Tokenizer::pad() const { return impl_->data.pad; }
bool Tokenizer::addBos() const { return impl_->data.addBos; }
bool Tokenizer::addEos() const { return impl_->data.addEos; }
bool Tokenizer::addSpacePrefix() const { return impl_->spm && impl_->data.addSpacePrefix; }
const std::string& Tokenizer::model() const { return impl_->data.model; }

bool Tokenizer::isEndOfGeneration(int32_t id) const {
  impl_->checkId(id);
  return impl_->endOfGeneration[static_cast<size_t>(id)];
}

const std::optional<std::string>& Tokenizer::chatTemplate() const {
  return impl_->data.chatTemplate;
}

const std::string& Tokenizer::preTokenizerName() const { return impl_->data.pre; }


// ---- StreamDecoder ------------------------------------------------------------------------------

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool renderSpecial)
    : tokenizer_(&tokenizer), renderSpecial_(renderSpecial) {}

std::string StreamDecoder::push(int32_t id) {
  const std::string& piece = tokenizer_->tokenToPiece(id);  // throws before any change
  if (!renderSpecial_ && tokenizer_->isControl(id)) return {};
  pending_ += piece;
  std::string out;
  out.reserve(pending_.size());
  const std::string_view buf = pending_;
  size_t i = 0;
  while (i < buf.size()) {
    const Utf8Step step = utf8Step(buf.substr(i));
    if (step.kind == Utf8Step::Incomplete) break;  // may still complete: hold it back
    if (step.kind == Utf8Step::Valid) {
      out.append(buf.substr(i, step.length));
    } else {
      out += kReplacementChar;
    }
    i += step.length;
  }
  pending_.erase(0, i);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out = replaceInvalidUtf8(pending_);
  pending_.clear();
  return out;
}

std::string replaceInvalidUtf8(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    const Utf8Step step = utf8Step(bytes.substr(i));
    if (step.kind == Utf8Step::Valid) {
      out.append(bytes.substr(i, step.length));
    } else {
      out += kReplacementChar;
    }
    i += step.length;
  }
  return out;
}

}  // namespace cortex::model
