// Lexer and parser of the Jinja interpreter: source text -> syntax tree (jinja_internal.h).
// The lexer follows jinja2's rules with trim_blocks and lstrip_blocks on: newlines normalised to
// "\n", one trailing newline dropped, "-" strips all whitespace beside a tag, "+" keeps it,
// a block or comment tag alone on its line takes the line's indentation and its newline with it.
#include <algorithm>
#include <charconv>
#include <cstring>
#include <set>

#include "model/jinja_internal.h"
#include "model/utf8.h"

namespace cortex::model::jinja::detail {

namespace {

constexpr int kMaxNesting = 256;
constexpr int kMaxExprDepth = 400;

[[noreturn]] void syntaxError(int line, const std::string& message) {
  throw TemplateError("line " + std::to_string(line) + ": syntax error: " + message);
}

bool isSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }
bool isDigit(char c) { return c >= '0' && c <= '9'; }
bool isNameStart(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
bool isNameChar(char c) { return isNameStart(c) || isDigit(c); }

// Python's str.rstrip() for the whitespace templates contain (ASCII, and the separators
// 0x1c-0x1f that Python also counts).
std::string_view rstripSpace(std::string_view s) {
  size_t n = s.size();
  while (n > 0 && (isSpace(s[n - 1]) || (s[n - 1] >= 0x1c && s[n - 1] <= 0x1f))) --n;
  return s.substr(0, n);
}

size_t skipSpace(std::string_view s, size_t at) {
  while (at < s.size() && (isSpace(s[at]) || (s[at] >= 0x1c && s[at] <= 0x1f))) ++at;
  return at;
}

enum class TT : uint8_t { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  TT type = TT::Eof;
  std::string value;
  int line = 1;
  int64_t i = 0;
  double f = 0;
};

int hexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Python's "unicode-escape" decoding of a string literal's body, as jinja2 applies it.
std::string unescape(std::string_view body, int line) {
  std::string out;
  for (size_t i = 0; i < body.size(); ++i) {
    const char c = body[i];
    if (c != '\\' || i + 1 >= body.size()) {
      out += c;
      continue;
    }
    const char e = body[++i];
    switch (e) {
      case 'n': out += '\n'; break;
      case 't': out += '\t'; break;
      case 'r': out += '\r'; break;
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'v': out += '\v'; break;
      case '\n': break;  // line continuation
      case 'x': case 'u': case 'U': {
        const size_t digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
        uint32_t cp = 0;
        for (size_t k = 0; k < digits; ++k) {
          const int h = i + 1 + k < body.size() ? hexValue(body[i + 1 + k]) : -1;
          if (h < 0) syntaxError(line, "truncated \\" + std::string(1, e) + " escape in a string");
          cp = cp * 16 + static_cast<uint32_t>(h);
        }
        if (cp > 0x10FFFF) syntaxError(line, "escape beyond U+10FFFF in a string");
        i += digits;
        appendUtf8(out, cp);
        break;
      }
      default:
        if (e >= '0' && e <= '7') {
          uint32_t cp = static_cast<uint32_t>(e - '0');
          for (int k = 0; k < 2 && i + 1 < body.size() && body[i + 1] >= '0' && body[i + 1] <= '7'; ++k) {
            cp = cp * 8 + static_cast<uint32_t>(body[++i] - '0');
          }
          appendUtf8(out, cp);
        } else {
          out += '\\';
          out += e;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(std::string_view raw) {
    src_.reserve(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == '\r') {
        src_ += '\n';
        if (i + 1 < raw.size() && raw[i + 1] == '\n') ++i;
      } else {
        src_ += raw[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    bool lineStarting = true;
    while (pos_ < src_.size()) {
      const size_t start = findTag(pos_);
      if (start == std::string::npos) {
        emitText(std::string_view(src_).substr(pos_));
        pos_ = src_.size();
        break;
      }
      const char kind = src_[start + 1];  // '{', '%' or '#'
      const char sign = start + 2 < src_.size() ? src_[start + 2] : '\0';
      std::string_view text = std::string_view(src_).substr(pos_, start - pos_);
      const size_t rawBodyAt = kind == '%' ? matchRawBegin(start) : std::string::npos;
      if (sign == '-') {
        text = rstripSpace(text);
      } else if (sign != '+' && kind != '{') {
        const size_t lpos = text.rfind('\n') == std::string_view::npos ? 0 : text.rfind('\n') + 1;
        if (lpos > 0 || lineStarting) {
          if (text.find_first_not_of(" \t", lpos) == std::string_view::npos) text = text.substr(0, lpos);
        }
      }
      emitText(text);
      line_ += countLines(pos_, start);
      if (rawBodyAt != std::string::npos) {
        lineStarting = lexRaw(start, rawBodyAt);
      } else if (kind == '#') {
        lineStarting = lexComment(start + 2 + (sign == '-' || sign == '+' ? 1 : 0));
      } else {
        lineStarting = lexTag(kind == '%', start + 2 + (sign == '-' || sign == '+' ? 1 : 0));
      }
    }
    Token eof;
    eof.type = TT::Eof;
    eof.line = line_;
    tokens_.push_back(eof);
    return std::move(tokens_);
  }

 private:
  int countLines(size_t from, size_t to) const {
    return static_cast<int>(std::count(src_.begin() + static_cast<std::ptrdiff_t>(from),
                                       src_.begin() + static_cast<std::ptrdiff_t>(to), '\n'));
  }

  size_t findTag(size_t from) const {
    for (size_t at = src_.find('{', from); at != std::string::npos; at = src_.find('{', at + 1)) {
      if (at + 1 < src_.size() && (src_[at + 1] == '{' || src_[at + 1] == '%' || src_[at + 1] == '#')) {
        return at;
      }
    }
    return std::string::npos;
  }

  void emitText(std::string_view text) {
    if (text.empty()) return;
    if (!tokens_.empty() && tokens_.back().type == TT::Text) {
      tokens_.back().value += text;
      return;
    }
    Token t;
    t.type = TT::Text;
    t.value = std::string(text);
    t.line = line_;
    tokens_.push_back(std::move(t));
  }

  // `{% raw %}` at `start`: the offset just after its end tag, or npos.
  size_t matchRawBegin(size_t start) const {
    size_t at = start + 2;
    if (at < src_.size() && (src_[at] == '-' || src_[at] == '+')) ++at;
    at = skipSpace(src_, at);
    if (src_.compare(at, 3, "raw") != 0) return std::string::npos;
    at = skipSpace(src_, at + 3);
    if (src_.compare(at, 3, "-%}") == 0) return skipSpace(src_, at + 3);
    if (src_.compare(at, 2, "%}") == 0) return at + 2;
    return std::string::npos;
  }

  // The end of a block tag at `at` ("+%}", "-%}" and following whitespace, "%}" and one newline),
  // or npos.
  size_t matchBlockEnd(size_t at) const {
    if (src_.compare(at, 3, "+%}") == 0) return at + 3;
    if (src_.compare(at, 3, "-%}") == 0) return skipSpace(src_, at + 3);
    if (src_.compare(at, 2, "%}") == 0) return at + 2 < src_.size() && src_[at + 2] == '\n' ? at + 3 : at + 2;
    return std::string::npos;
  }

  bool lexRaw(size_t start, size_t bodyAt) {
    // The body runs to the first "{%[-+]? endraw %}".
    for (size_t at = src_.find("{%", bodyAt); at != std::string::npos; at = src_.find("{%", at + 1)) {
      size_t k = at + 2;
      const char sign = k < src_.size() ? src_[k] : '\0';
      if (sign == '-' || sign == '+') ++k;
      k = skipSpace(src_, k);
      if (src_.compare(k, 6, "endraw") != 0) continue;
      const size_t end = matchBlockEnd(skipSpace(src_, k + 6));
      if (end == std::string::npos) continue;
      std::string_view body = std::string_view(src_).substr(bodyAt, at - bodyAt);
      if (sign == '-') {
        body = rstripSpace(body);
      } else if (sign != '+') {
        const size_t lpos = body.rfind('\n') == std::string_view::npos ? 0 : body.rfind('\n') + 1;
        if (lpos > 0 && body.find_first_not_of(" \t", lpos) == std::string_view::npos) body = body.substr(0, lpos);
      }
      emitText(body);
      line_ += countLines(start, end);
      pos_ = end;
      return src_[end - 1] == '\n';
    }
    syntaxError(line_, "missing end of raw directive");
  }

  bool lexComment(size_t from) {
    for (size_t at = src_.find("#}", from); at != std::string::npos; at = src_.find("#}", at + 1)) {
      size_t end;
      if (at > from && src_[at - 1] == '+') {
        end = at + 2;
      } else if (at > from && src_[at - 1] == '-') {
        end = skipSpace(src_, at + 2);
      } else {
        end = at + 2 < src_.size() && src_[at + 2] == '\n' ? at + 3 : at + 2;
      }
      line_ += countLines(pos_, end);
      pos_ = end;
      return src_[end - 1] == '\n';
    }
    syntaxError(line_, "missing end of comment tag");
  }

  bool lexTag(bool block, size_t at) {
    Token begin;
    begin.type = block ? TT::BlockBegin : TT::VarBegin;
    begin.line = line_;
    tokens_.push_back(begin);
    std::vector<char> balance;
    while (true) {
      if (at >= src_.size()) syntaxError(line_, std::string("unexpected end of template inside ") + (block ? "{% %}" : "{{ }}"));
      if (balance.empty()) {
        size_t end = std::string::npos;
        if (block) {
          end = matchBlockEnd(at);
        } else if (src_.compare(at, 3, "-}}") == 0) {
          end = skipSpace(src_, at + 3);
        } else if (src_.compare(at, 2, "}}") == 0) {
          end = at + 2;
        }
        if (end != std::string::npos) {
          Token t;
          t.type = block ? TT::BlockEnd : TT::VarEnd;
          t.line = line_;
          tokens_.push_back(t);
          line_ += countLines(at, end);
          pos_ = end;
          return src_[end - 1] == '\n';
        }
      }
      const char c = src_[at];
      if (isSpace(c) || (c >= 0x1c && c <= 0x1f)) {
        if (c == '\n') ++line_;
        ++at;
        continue;
      }
      Token t;
      t.line = line_;
      if (isDigit(c)) {
        at = lexNumber(at, t);
      } else if (isNameStart(c)) {
        size_t e = at;
        while (e < src_.size() && isNameChar(src_[e])) ++e;
        t.type = TT::Name;
        t.value = src_.substr(at, e - at);
        at = e;
      } else if (c == '\'' || c == '"') {
        size_t e = at + 1;
        while (e < src_.size() && src_[e] != c) e += src_[e] == '\\' ? 2 : 1;
        if (e >= src_.size()) syntaxError(line_, "unterminated string");
        t.type = TT::String;
        t.value = unescape(std::string_view(src_).substr(at + 1, e - at - 1), line_);
        line_ += countLines(at, e);
        at = e + 1;
      } else {
        static constexpr const char* kOps2[] = {"//", "**", "==", "!=", ">=", "<="};
        t.type = TT::Op;
        for (const char* op : kOps2) {
          if (src_.compare(at, 2, op) == 0) t.value = op;
        }
        if (t.value.empty()) {
          if (std::strchr("+-/*%~[](){}><=.:|,;", c) == nullptr || c == '\0') {
            syntaxError(line_, std::string("unexpected character '") + c + "'");
          }
          t.value = std::string(1, c);
        }
        at += t.value.size();
        if (c == '(' || c == '[' || c == '{') {
          balance.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
        } else if (t.value.size() == 1 && (c == ')' || c == ']' || c == '}')) {
          if (balance.empty() || balance.back() != c) syntaxError(line_, std::string("unexpected '") + c + "'");
          balance.pop_back();
        }
      }
      tokens_.push_back(std::move(t));
    }
  }

  // Integer or float (digits may be grouped with '_'), as jinja2's integer and float rules.
  size_t lexNumber(size_t at, Token& t) {
    auto digits = [this](size_t k) {  // end of (\d+_)*\d+ starting at k, or k when none
      if (k >= src_.size() || !isDigit(src_[k])) return k;
      size_t e = k;
      while (true) {
        while (e < src_.size() && isDigit(src_[e])) ++e;
        if (e + 1 < src_.size() && src_[e] == '_' && isDigit(src_[e + 1])) {
          ++e;
          continue;
        }
        return e;
      }
    };
    size_t e = digits(at);
    bool isFloat = false;
    if (e < src_.size() && src_[e] == '.' && digits(e + 1) > e + 1) {
      e = digits(e + 1);
      isFloat = true;
    }
    if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
      size_t k = e + 1;
      if (k < src_.size() && (src_[k] == '+' || src_[k] == '-')) ++k;
      if (digits(k) > k) {
        e = digits(k);
        isFloat = true;
      }
    }
    std::string text;
    for (size_t k = at; k < e; ++k) {
      if (src_[k] != '_') text += src_[k];
    }
    if (isFloat) {
      t.type = TT::Float;
      t.f = std::strtod(text.c_str(), nullptr);
    } else {
      t.type = TT::Int;
      const auto r = std::from_chars(text.data(), text.data() + text.size(), t.i);
      if (r.ec != std::errc()) syntaxError(line_, "integer literal too large: " + text);
    }
    t.value = std::move(text);
    return e;
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> tokens_;
};

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : toks_(std::move(tokens)) {}

  Body parseAll() {
    std::string endName;
    Body body = parseBody({}, endName);
    return body;
  }

 private:
  const Token& cur() const { return toks_[pos_]; }
  const Token& peek(size_t k = 1) const { return toks_[std::min(pos_ + k, toks_.size() - 1)]; }
  const Token& next() {
    const Token& t = toks_[pos_];
    if (pos_ + 1 < toks_.size()) ++pos_;
    return t;
  }
  bool isOp(std::string_view op) const { return cur().type == TT::Op && cur().value == op; }
  bool isName(std::string_view n) const { return cur().type == TT::Name && cur().value == n; }
  bool skipOp(std::string_view op) {
    if (!isOp(op)) return false;
    next();
    return true;
  }
  bool skipName(std::string_view n) {
    if (!isName(n)) return false;
    next();
    return true;
  }
  std::string describe(const Token& t) const {
    switch (t.type) {
      case TT::Eof: return "end of template";
      case TT::BlockEnd: return "end of statement block";
      case TT::VarEnd: return "end of print statement";
      case TT::Text: return "template text";
      case TT::String: return "string";
      default: return "'" + t.value + "'";
    }
  }
  void expectOp(std::string_view op) {
    if (!skipOp(op)) syntaxError(cur().line, "expected '" + std::string(op) + "', got " + describe(cur()));
  }
  std::string expectName() {
    if (cur().type != TT::Name) syntaxError(cur().line, "expected a name, got " + describe(cur()));
    return next().value;
  }
  void expectBlockEnd() {
    if (cur().type != TT::BlockEnd) syntaxError(cur().line, "expected end of statement block, got " + describe(cur()));
    next();
  }

  struct Depth {
    explicit Depth(Parser& p) : parser(p) {
      if (++parser.depth_ > kMaxNesting) syntaxError(parser.cur().line, "nesting too deep");
    }
    ~Depth() { --parser.depth_; }
    Parser& parser;
  };

  // Statements up to a block tag whose first name is in `ends` (consumed; its name goes to
  // endName, the rest of that tag is left to the caller). With empty `ends`, up to the end.
  Body parseBody(const std::set<std::string>& ends, std::string& endName, int openLine = 0) {
    Depth guard(*this);
    Body body;
    const int startLine = openLine > 0 ? openLine : cur().line;
    while (true) {
      const Token& t = cur();
      if (t.type == TT::Eof) {
        if (ends.empty()) return body;
        std::string names;
        for (const std::string& e : ends) names += (names.empty() ? "'" : ", '") + e + "'";
        syntaxError(t.line, "unexpected end of template; looking for " + names +
                                " to close the block opened on line " + std::to_string(startLine));
      }
      if (t.type == TT::Text) {
        auto s = std::make_unique<Stmt>();
        s->kind = SK::Text;
        s->line = t.line;
        s->text = t.value;
        body.push_back(std::move(s));
        next();
      } else if (t.type == TT::VarBegin) {
        next();
        auto s = std::make_unique<Stmt>();
        s->kind = SK::Output;
        s->line = t.line;
        s->expr = parseTuple(true);
        if (cur().type != TT::VarEnd) syntaxError(cur().line, "expected end of print statement, got " + describe(cur()));
        next();
        body.push_back(std::move(s));
      } else if (t.type == TT::BlockBegin) {
        next();
        if (cur().type != TT::Name) syntaxError(cur().line, "expected a statement name, got " + describe(cur()));
        const std::string name = cur().value;
        if (ends.count(name) != 0) {
          next();
          endName = name;
          return body;
        }
        body.push_back(parseStatement());
      } else {
        syntaxError(t.line, "unexpected " + describe(t));
      }
    }
  }

  std::unique_ptr<Stmt> parseStatement() {
    const Token& t = cur();
    const std::string name = t.value;
    auto s = std::make_unique<Stmt>();
    s->line = t.line;
    next();
    std::string endName;
    if (name == "if") {
      s->kind = SK::If;
      ExprP test = parseTuple(false);
      while (true) {
        expectBlockEnd();
        Body b = parseBody({"elif", "else", "endif"}, endName, s->line);
        s->branches.emplace_back(std::move(test), std::move(b));
        if (endName == "elif") {
          test = parseTuple(false);
          continue;
        }
        if (endName == "else") {
          expectBlockEnd();
          s->elseBody = parseBody({"endif"}, endName, s->line);
        }
        break;
      }
    } else if (name == "for") {
      s->kind = SK::For;
      s->targets = parseTargets();
      if (!skipName("in")) syntaxError(cur().line, "expected 'in', got " + describe(cur()));
      s->expr = parseTuple(false, true);
      if (skipName("if")) s->cond = parseExpression();
      if (isName("recursive")) syntaxError(cur().line, "recursive for loops are not supported");
      expectBlockEnd();
      s->body = parseBody({"endfor", "else"}, endName, s->line);
      if (endName == "else") {
        expectBlockEnd();
        s->elseBody = parseBody({"endfor"}, endName, s->line);
      }
    } else if (name == "set") {
      if (cur().type == TT::Name && peek().type == TT::Op && peek().value == "." ) {
        s->kind = SK::Set;
        s->targets.push_back(next().value);
        next();
        s->attr = expectName();
        expectOp("=");
        s->expr = parseTuple(true);
      } else {
        s->targets = parseTargets();
        if (skipOp("=")) {
          s->kind = SK::Set;
          s->expr = parseTuple(true);
        } else {
          if (s->targets.size() != 1) syntaxError(s->line, "a block set takes one name");
          s->kind = SK::SetBlock;
          while (skipOp("|")) s->filters.push_back(parseFilter(nullptr));
          expectBlockEnd();
          s->body = parseBody({"endset"}, endName, s->line);
        }
      }
    } else if (name == "macro") {
      s->kind = SK::Macro;
      s->name = expectName();
      parseParams(*s);
      expectBlockEnd();
      s->body = parseBody({"endmacro"}, endName, s->line);
      if (cur().type == TT::Name) next();  // {% endmacro name %}
    } else if (name == "call") {
      s->kind = SK::CallBlock;
      if (isOp("(")) parseParams(*s);
      s->expr = parseExpression();
      if (s->expr->kind != EK::Call) syntaxError(s->line, "expected a call after {% call %}");
      expectBlockEnd();
      s->body = parseBody({"endcall"}, endName, s->line);
    } else if (name == "filter") {
      s->kind = SK::FilterBlock;
      s->filters.push_back(parseFilter(nullptr));
      while (skipOp("|")) s->filters.push_back(parseFilter(nullptr));
      expectBlockEnd();
      s->body = parseBody({"endfilter"}, endName, s->line);
    } else if (name == "generation") {
      // transformers' {% generation %}: marks the assistant's text, renders it unchanged.
      s->kind = SK::Block;
      expectBlockEnd();
      s->body = parseBody({"endgeneration"}, endName, s->line);
    } else if (name == "break" || name == "continue") {
      if (loopDepth_ == 0) syntaxError(s->line, "'" + name + "' outside a for loop");
      s->kind = name == "break" ? SK::Break : SK::Continue;
    } else {
      syntaxError(s->line, "unknown or unsupported statement '" + name + "'");
    }
    expectBlockEnd();
    return s;
  }

  std::vector<std::string> parseTargets() {
    std::vector<std::string> names;
    const bool paren = skipOp("(");
    do {
      if (paren && isOp(")")) break;
      names.push_back(expectName());
    } while (skipOp(","));
    if (paren) expectOp(")");
    for (const std::string& n : names) {
      if (n == "true" || n == "false" || n == "none" || n == "True" || n == "False" || n == "None") {
        syntaxError(cur().line, "cannot assign to '" + n + "'");
      }
    }
    if (names.empty()) syntaxError(cur().line, "expected a name");
    return names;
  }

  void parseParams(Stmt& s) {
    expectOp("(");
    while (!isOp(")")) {
      if (!s.params.empty()) expectOp(",");
      if (isOp(")")) break;
      std::string p = expectName();
      ExprP def;
      if (skipOp("=")) def = parseExpression();
      s.params.emplace_back(std::move(p), std::move(def));
    }
    next();
  }

  // ---- expressions ----
  // Records the height of a finished node; trees stay shallow enough to walk recursively.
  static ExprP done(ExprP e) {
    int d = 0;
    auto see = [&d](const ExprP& x) {
      if (x) d = std::max(d, x->depth);
    };
    see(e->a);
    see(e->b);
    see(e->c);
    for (const auto& x : e->items) see(x);
    for (const auto& kv : e->kwargs) see(kv.second);
    e->depth = d + 1;
    if (e->depth > kMaxExprDepth) syntaxError(e->line, "expression nested too deeply");
    return e;
  }

  ExprP make(EK kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // An expression, or several separated by commas (a tuple). forIter: the iterable of a for
  // loop, which stops at `if` and `recursive`.
  ExprP parseTuple(bool withCond, bool forIter = false) {
    const int line = cur().line;
    std::vector<ExprP> items;
    bool comma = false;
    while (true) {
      if (!items.empty()) {
        if (!skipOp(",")) break;
        comma = true;
      }
      if (cur().type == TT::VarEnd || cur().type == TT::BlockEnd || isOp(")") ||
          (forIter && (isName("if") || isName("recursive"))) || (!items.empty() && isOp("="))) {
        break;
      }
      items.push_back(withCond ? parseExpression() : parseOr());
    }
    if (!comma) {
      if (items.empty()) syntaxError(line, "expected an expression, got " + describe(cur()));
      return std::move(items.front());
    }
    ExprP t = make(EK::Tuple, line);
    t->items = std::move(items);
    return done(std::move(t));
  }

  ExprP parseExpression() {
    Depth guard(*this);
    const int line = cur().line;
    ExprP e = parseOr();
    while (skipName("if")) {
      ExprP c = make(EK::Cond, line);
      c->a = parseOr();  // the condition
      c->b = std::move(e);
      if (skipName("else")) c->c = parseExpression();
      e = done(std::move(c));
    }
    return e;
  }

  ExprP parseOr() {
    ExprP left = parseAnd();
    while (isName("or")) {
      ExprP n = make(EK::Or, next().line);
      n->a = std::move(left);
      n->b = parseAnd();
      left = done(std::move(n));
    }
    return left;
  }

  ExprP parseAnd() {
    ExprP left = parseNot();
    while (isName("and")) {
      ExprP n = make(EK::And, next().line);
      n->a = std::move(left);
      n->b = parseNot();
      left = done(std::move(n));
    }
    return left;
  }

  ExprP parseNot() {
    Depth guard(*this);
    if (isName("not")) {
      ExprP n = make(EK::Not, next().line);
      n->a = parseNot();
      return done(std::move(n));
    }
    return parseCompare();
  }

  ExprP parseCompare() {
    const int line = cur().line;
    ExprP first = parseMath1();
    ExprP cmp;
    while (true) {
      std::string op;
      if (cur().type == TT::Op && (cur().value == "==" || cur().value == "!=" || cur().value == "<" ||
                                    cur().value == ">" || cur().value == "<=" || cur().value == ">=")) {
        op = next().value;
      } else if (isName("in")) {
        next();
        op = "in";
      } else if (isName("not") && peek().type == TT::Name && peek().value == "in") {
        next();
        next();
        op = "notin";
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(EK::Compare, line);
        cmp->a = std::move(first);
      }
      cmp->ops.push_back(op);
      cmp->items.push_back(parseMath1());
    }
    return cmp ? done(std::move(cmp)) : std::move(first);
  }

  ExprP binary(std::string op, ExprP l, ExprP r, int line) {
    ExprP n = make(EK::Binary, line);
    n->name = std::move(op);
    n->a = std::move(l);
    n->b = std::move(r);
    return done(std::move(n));
  }

  ExprP parseMath1() {
    ExprP left = parseConcat();
    while (isOp("+") || isOp("-")) {
      const Token& t = next();
      const std::string op = t.value;
      left = binary(op, std::move(left), parseConcat(), t.line);
    }
    return left;
  }

  ExprP parseConcat() {
    ExprP first = parseMath2();
    if (!isOp("~")) return first;
    ExprP n = make(EK::Concat, cur().line);
    n->items.push_back(std::move(first));
    while (skipOp("~")) n->items.push_back(parseMath2());
    return done(std::move(n));
  }

  ExprP parseMath2() {
    ExprP left = parsePow();
    while (isOp("*") || isOp("/") || isOp("//") || isOp("%")) {
      const Token& t = next();
      const std::string op = t.value;
      left = binary(op, std::move(left), parsePow(), t.line);
    }
    return left;
  }

  ExprP parsePow() {
    ExprP left = parseUnary(true);
    while (isOp("**")) {
      const int line = next().line;
      left = binary("**", std::move(left), parseUnary(true), line);
    }
    return left;
  }

  ExprP parseUnary(bool withFilter) {
    Depth guard(*this);
    ExprP node;
    if (isOp("-") || isOp("+")) {
      const Token& t = next();
      node = make(t.value == "-" ? EK::Neg : EK::Pos, t.line);
      node->a = parseUnary(false);
      node = done(std::move(node));
    } else {
      node = parsePrimary();
    }
    node = parsePostfix(std::move(node));
    if (withFilter) node = parseFilterExpr(std::move(node));
    return node;
  }

  ExprP literal(Value v, int line) {
    ExprP e = make(EK::Literal, line);
    e->literal = std::move(v);
    return e;
  }

  ExprP parsePrimary() {
    Depth guard(*this);
    const Token& t = cur();
    const int line = t.line;
    switch (t.type) {
      case TT::Name: {
        const std::string n = next().value;
        if (n == "true" || n == "True") return literal(Value::boolean(true), line);
        if (n == "false" || n == "False") return literal(Value::boolean(false), line);
        if (n == "none" || n == "None") return literal(Value::none(), line);
        ExprP e = make(EK::Name, line);
        e->name = n;
        return e;
      }
      case TT::String: {
        std::string s;
        while (cur().type == TT::String) s += next().value;
        return literal(Value::trusted(std::move(s)), line);
      }
      case TT::Int: return literal(Value::integer(next().i), line);
      case TT::Float: return literal(Value::number(next().f), line);
      case TT::Op:
        if (t.value == "(") {
          next();
          if (skipOp(")")) {
            ExprP e = make(EK::Tuple, line);
            return e;
          }
          ExprP e = parseTuple(true);
          expectOp(")");
          return e;
        }
        if (t.value == "[") {
          next();
          ExprP e = make(EK::List, line);
          while (!isOp("]")) {
            if (!e->items.empty()) expectOp(",");
            if (isOp("]")) break;
            e->items.push_back(parseExpression());
          }
          next();
          return done(std::move(e));
        }
        if (t.value == "{") {
          next();
          ExprP e = make(EK::Dict, line);
          while (!isOp("}")) {
            if (!e->items.empty()) expectOp(",");
            if (isOp("}")) break;
            e->items.push_back(parseExpression());
            expectOp(":");
            e->items.push_back(parseExpression());
          }
          next();
          return done(std::move(e));
        }
        break;
      default: break;
    }
    syntaxError(line, "unexpected " + describe(t));
  }

  ExprP parsePostfix(ExprP node) {
    while (true) {
      if (isOp(".")) {
        const int line = next().line;
        if (cur().type == TT::Int) {
          ExprP e = make(EK::Item, line);
          e->a = std::move(node);
          e->b = literal(Value::integer(next().i), line);
          node = done(std::move(e));
        } else {
          ExprP e = make(EK::Attr, line);
          e->a = std::move(node);
          e->name = expectName();
          node = done(std::move(e));
        }
      } else if (isOp("[")) {
        node = parseSubscript(std::move(node));
      } else if (isOp("(")) {
        node = parseCall(std::move(node));
      } else {
        return node;
      }
    }
  }

  ExprP parseSubscript(ExprP node) {
    Depth guard(*this);
    const int line = next().line;  // '['
    std::vector<ExprP> parts(3);
    bool slice = false;
    int part = 0;
    while (!isOp("]")) {
      if (isOp(":")) {
        next();
        slice = true;
        if (++part > 2) syntaxError(line, "too many ':' in a slice");
        continue;
      }
      if (parts[static_cast<size_t>(part)]) syntaxError(cur().line, "expected ']' or ':', got " + describe(cur()));
      parts[static_cast<size_t>(part)] = slice ? parseExpression() : parseTuple(true);
    }
    next();
    if (!slice) {
      if (!parts[0]) syntaxError(line, "empty subscript");
      ExprP e = make(EK::Item, line);
      e->a = std::move(node);
      e->b = std::move(parts[0]);
      return done(std::move(e));
    }
    ExprP e = make(EK::Slice, line);
    e->a = std::move(node);
    e->b = std::move(parts[0]);
    e->c = std::move(parts[1]);
    e->items.push_back(std::move(parts[2]));
    return done(std::move(e));
  }

  void parseArgs(Expr& e) {
    expectOp("(");
    bool first = true;
    while (!isOp(")")) {
      if (!first) expectOp(",");
      first = false;
      if (isOp(")")) break;
      if (isOp("*") || isOp("**")) syntaxError(cur().line, "*args and **kwargs are not supported");
      if (cur().type == TT::Name && peek().type == TT::Op && peek().value == "=") {
        std::string key = next().value;
        next();
        e.kwargs.emplace_back(std::move(key), parseExpression());
      } else {
        if (!e.kwargs.empty()) syntaxError(cur().line, "positional argument after keyword argument");
        e.items.push_back(parseExpression());
      }
    }
    next();
  }

  ExprP parseCall(ExprP node) {
    Depth guard(*this);
    ExprP e = make(EK::Call, cur().line);
    e->a = std::move(node);
    parseArgs(*e);
    return done(std::move(e));
  }

  ExprP parseFilter(ExprP input) {
    ExprP e = make(EK::Filter, cur().line);
    e->a = std::move(input);
    e->name = expectName();
    while (isOp(".")) {
      next();
      e->name += "." + expectName();
    }
    if (isOp("(")) parseArgs(*e);
    return done(std::move(e));
  }

  ExprP parseFilterExpr(ExprP node) {
    while (true) {
      if (isOp("|")) {
        next();
        node = parseFilter(std::move(node));
      } else if (isName("is")) {
        const int line = next().line;
        ExprP e = make(EK::Test, line);
        e->negated = skipName("not");
        e->name = expectName();
        while (isOp(".")) {
          next();
          e->name += "." + expectName();
        }
        e->a = std::move(node);
        if (isOp("(")) {
          parseArgs(*e);
        } else if ((cur().type == TT::Name || cur().type == TT::String || cur().type == TT::Int ||
                    cur().type == TT::Float || isOp("(") || isOp("[") || isOp("{")) &&
                   !isName("else") && !isName("or") && !isName("and")) {
          if (isName("is")) syntaxError(cur().line, "you cannot chain multiple tests with is");
          e->items.push_back(parsePostfix(parsePrimary()));
        }
        node = done(std::move(e));
      } else if (isOp("(")) {
        node = parseCall(std::move(node));
      } else {
        return node;
      }
    }
  }

 public:
  int loopDepth_ = 0;

 private:
  std::vector<Token> toks_;
  size_t pos_ = 0;
  int depth_ = 0;
};

// Unknown filters and tests are errors when the template is compiled, except inside an `if`
// statement or an `a if b else c` expression (not within a loop, macro or block nested there),
// where jinja2 only fails if one is used.
void checkNames(const Expr& e, bool soft) {
  const bool inner = soft || e.kind == EK::Cond;
  if (!inner) {
    if (e.kind == EK::Filter && !isKnownFilter(e.name)) syntaxError(e.line, "no filter named '" + e.name + "'");
    if (e.kind == EK::Test && !isKnownTest(e.name)) syntaxError(e.line, "no test named '" + e.name + "'");
  }
  for (const Expr* x : {e.a.get(), e.b.get(), e.c.get()}) {
    if (x != nullptr) checkNames(*x, inner);
  }
  for (const auto& x : e.items) {
    if (x) checkNames(*x, inner);
  }
  for (const auto& kv : e.kwargs) checkNames(*kv.second, inner);
}

void checkNames(const Body& body, bool soft) {
  for (const auto& s : body) {
    if (s->expr) checkNames(*s->expr, soft);
    for (const auto& f : s->filters) checkNames(*f, soft);
    for (const auto& p : s->params) {
      if (p.second) checkNames(*p.second, false);
    }
    switch (s->kind) {
      case SK::If:
        for (const auto& [test, b] : s->branches) {
          checkNames(*test, true);
          checkNames(b, true);
        }
        checkNames(s->elseBody, true);
        break;
      case SK::For:
        if (s->cond) checkNames(*s->cond, false);
        checkNames(s->body, false);
        checkNames(s->elseBody, false);
        break;
      default: checkNames(s->body, false);
    }
  }
}

}  // namespace

Body parseTemplate(std::string_view source) {
  Parser p(Lexer(source).run());
  // break/continue are checked at run time too; the parser accepts them anywhere inside a for.
  p.loopDepth_ = 1;
  Body body = p.parseAll();
  checkNames(body, false);
  return body;
}

}  // namespace cortex::model::jinja::detail
