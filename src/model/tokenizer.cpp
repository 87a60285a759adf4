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

namespace cortex::model {

namespace {

// ---- UTF-8 helpers ------------------------------------------------------------------------------

void appendUtf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

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

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

uint64_t pairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

constexpr std::array<std::string_view, 9> kEndOfGenerationTexts = {
    "<|eot_id|>", "<|im_end|>",  "<|end|>",         "<end_of_turn>", "<|endoftext|>",
    "<EOT>",      "_<EOT>",      "<|end_of_text|>", "<｜end▁of▁sentence｜>"};

}  // namespace

// ---- Tokenizer ----------------------------------------------------------------------------------

struct Tokenizer::Impl {
  VocabData data;
  std::vector<TokenType> types;
  std::vector<std::string> pieces;  // decoded bytes per id
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> textToId;
  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  std::unordered_map<uint64_t, Merge> merges;  // (left id, right id) -> rank, merged id
  std::array<int32_t, 256> byteToken{};        // id of each single mapped byte, -1 if none
  std::vector<std::pair<std::string, int32_t>> specials;  // longest text first
  std::vector<bool> endOfGeneration;
  std::vector<std::unique_ptr<Regex>> regexes;

  // Tokenizer::encode; controlAt, when given, lists where control tokens may start.
  std::vector<int32_t> encode(std::string_view text, bool addSpecial, bool parseSpecial,
                              const std::span<const size_t>* controlAt) const;

  void checkId(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= data.tokens.size()) {
      throw ModelError("token id " + std::to_string(id) + " is out of range [0, " +
                       std::to_string(data.tokens.size()) + ")");
    }
  }

  // Appends the BPE tokens of one pre-tokenized piece (raw bytes) to `out`.
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
};

namespace {

// Bytes a vocabulary entry stands for, from its stored text and type.
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

}  // namespace

Tokenizer::Tokenizer(VocabData data) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (data.model == "llama") {
    throw ModelError("SentencePiece (llama) tokenizers are not supported yet");
  }
  if (data.model != "gpt2") {
    throw ModelError("unsupported tokenizer model '" + data.model +
                     "' (tokenizer.ggml.model); only byte-level BPE 'gpt2' is supported");
  }
  const size_t n = data.tokens.size();
  if (n == 0) throw ModelError("tokenizer vocabulary is empty (tokenizer.ggml.tokens)");
  if (n > static_cast<size_t>(INT32_MAX)) throw ModelError("tokenizer vocabulary is too large");
  if (!data.tokenTypes.empty() && data.tokenTypes.size() != n) {
    throw ModelError("tokenizer.ggml.token_type has " + std::to_string(data.tokenTypes.size()) +
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

  for (const std::string& re : preTokenizerRegexes(data.pre)) {
    m.regexes.push_back(std::make_unique<Regex>(re));
  }

  m.types.resize(n, TokenType::Normal);
  m.pieces.resize(n);
  m.endOfGeneration.assign(n, false);
  m.textToId.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const auto id = static_cast<int32_t>(i);
    if (!data.tokenTypes.empty()) {
      const int32_t t = data.tokenTypes[i];
      if (t < 0 || t > 6) {
        throw ModelError("token " + std::to_string(i) + " has unknown token type " +
                         std::to_string(t));
      }
      m.types[i] = static_cast<TokenType>(t);
    }
    m.pieces[i] = decodePiece(data.tokens[i], m.types[i]);
    m.textToId.emplace(data.tokens[i], id);  // first occurrence wins on duplicates
    const TokenType t = m.types[i];
    if ((t == TokenType::Control || t == TokenType::UserDefined) && !data.tokens[i].empty()) {
      m.specials.emplace_back(data.tokens[i], id);
    }
    if (t == TokenType::Control &&
        std::find(kEndOfGenerationTexts.begin(), kEndOfGenerationTexts.end(), data.tokens[i]) !=
            kEndOfGenerationTexts.end()) {
      m.endOfGeneration[i] = true;
    }
  }
  if (data.eos >= 0) m.endOfGeneration[static_cast<size_t>(data.eos)] = true;
  // note: longest first, so a special token that contains another wins (as llama.cpp).
  std::stable_sort(m.specials.begin(), m.specials.end(), [](const auto& a, const auto& b) {
    return a.first.size() > b.first.size();
  });

  const ByteMap& map = byteMap();
  for (size_t b = 0; b < 256; ++b) {
    auto it = m.textToId.find(map.byteToText[b]);
    m.byteToken[b] = it == m.textToId.end() ? -1 : it->second;
  }

  m.merges.reserve(data.merges.size());
  for (size_t r = 0; r < data.merges.size(); ++r) {
    const std::string& merge = data.merges[r];
    const size_t space = merge.find(' ', 1);  // note: the left part is never empty
    if (space == std::string::npos) {
      throw ModelError("tokenizer merge " + std::to_string(r) + " ('" + merge +
                       "') is not of the form 'left right'");
    }
    const std::string_view left(merge.data(), space);
    const std::string_view right(merge.data() + space + 1, merge.size() - space - 1);
    const auto l = m.textToId.find(left);
    const auto rt = m.textToId.find(right);
    const auto merged = m.textToId.find(std::string(left) + std::string(right));
    // note: a merge whose parts or result are not in the vocabulary can never apply; skip it.
    if (l == m.textToId.end() || rt == m.textToId.end() || merged == m.textToId.end()) continue;
    m.merges.emplace(pairKey(l->second, rt->second),
                     Impl::Merge{static_cast<int32_t>(r), merged->second});  // first rank wins
  }
  m.data = std::move(data);
}

Tokenizer Tokenizer::fromGGUF(const GGUFFile& file) {
  auto context = [&file](const std::string& what) {
    return ModelError(file.path() + ": " + what);
  };
  VocabData d;
  d.model = file.getString("tokenizer.ggml.model");
  if (d.model == "llama") throw context("SentencePiece (llama) tokenizers are not supported yet");
  d.pre = file.has("tokenizer.ggml.pre") ? file.getString("tokenizer.ggml.pre") : "default";
  d.tokens = file.getStringArray("tokenizer.ggml.tokens");
  if (file.has("tokenizer.ggml.merges")) d.merges = file.getStringArray("tokenizer.ggml.merges");
  if (file.has("tokenizer.ggml.token_type")) {
    d.tokenTypes = file.getI32Array("tokenizer.ggml.token_type");
  }
  auto optionalId = [&](std::string_view key) -> int32_t {
    if (!file.has(key)) return -1;
    const int64_t v = file.getI64(key);
    if (v < -1 || v > INT32_MAX) {
      throw context(std::string(key) + " = " + std::to_string(v) + " is not a valid token id");
    }
    return static_cast<int32_t>(v);
  };
  d.bos = optionalId("tokenizer.ggml.bos_token_id");
  d.eos = optionalId("tokenizer.ggml.eos_token_id");
  d.unk = optionalId("tokenizer.ggml.unknown_token_id");
  d.pad = optionalId("tokenizer.ggml.padding_token_id");
  d.addBos = file.has("tokenizer.ggml.add_bos_token") && file.getBool("tokenizer.ggml.add_bos_token");
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
  const Impl& m = *this;
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 2);
  if (addSpecial && m.data.addBos) out.push_back(m.data.bos);

  // Cut special tokens out first: fragments are either a token id or a span of raw text.
  struct Fragment {
    int32_t id;  // -1 for raw text
    Span span;
  };
  std::vector<Fragment> fragments{{-1, {0, text.size()}}};
  for (const auto& [special, id] : m.specials) {
    if (!parseSpecial && m.types[static_cast<size_t>(id)] == TokenType::Control) continue;
    std::vector<Fragment> next;
    next.reserve(fragments.size());
    for (const Fragment& f : fragments) {
      if (f.id >= 0) {
        next.push_back(f);
        continue;
      }
      const std::string_view raw = text.substr(f.span.offset, f.span.length);
      const bool control = m.types[static_cast<size_t>(id)] == TokenType::Control;
      size_t pos = 0;
      for (size_t hit = raw.find(special); hit != std::string_view::npos;
           hit = raw.find(special, std::max(pos, hit + 1))) {
        if (control && controlAt != nullptr &&
            !std::binary_search(controlAt->begin(), controlAt->end(), f.span.offset + hit)) {
          continue;  // not where the template put one: plain text
        }
        if (hit > pos) next.push_back({-1, {f.span.offset + pos, hit - pos}});
        next.push_back({id, {f.span.offset + hit, special.size()}});
        pos = hit + special.size();
      }
      if (pos < raw.size()) next.push_back({-1, {f.span.offset + pos, raw.size() - pos}});
    }
    fragments = std::move(next);
  }

  for (const Fragment& f : fragments) {
    if (f.id >= 0) {
      out.push_back(f.id);
      continue;
    }
    std::vector<Span> words{f.span};
    for (const auto& re : m.regexes) words = splitByRegex(text, words, *re);
    for (const Span& w : words) m.bpe(text.substr(w.offset, w.length), out);
  }
  return out;
}

const std::string& Tokenizer::tokenToPiece(int32_t id) const {
  impl_->checkId(id);
  return impl_->pieces[static_cast<size_t>(id)];
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool renderSpecial) const {
  std::string out;
  for (const int32_t id : ids) {
    impl_->checkId(id);
    if (!renderSpecial && impl_->types[static_cast<size_t>(id)] == TokenType::Control) continue;
    out += impl_->pieces[static_cast<size_t>(id)];
  }
  return out;
}

const std::string& Tokenizer::tokenText(int32_t id) const {
  impl_->checkId(id);
  return impl_->data.tokens[static_cast<size_t>(id)];
}

std::optional<int32_t> Tokenizer::findToken(std::string_view text) const {
  const auto it = impl_->textToId.find(text);
  if (it == impl_->textToId.end()) return std::nullopt;
  return it->second;
}

TokenType Tokenizer::tokenType(int32_t id) const {
  impl_->checkId(id);
  return impl_->types[static_cast<size_t>(id)];
}

int32_t Tokenizer::vocabSize() const { return static_cast<int32_t>(impl_->data.tokens.size()); }
int32_t Tokenizer::bos() const { return impl_->data.bos; }
int32_t Tokenizer::eos() const { return impl_->data.eos; }
int32_t Tokenizer::unk() const { return impl_->data.unk; }
int32_t Tokenizer::pad() const { return impl_->data.pad; }
bool Tokenizer::addBos() const { return impl_->data.addBos; }

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
  if (!renderSpecial_ && tokenizer_->tokenType(id) == TokenType::Control) return {};
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
