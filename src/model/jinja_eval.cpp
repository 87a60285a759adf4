// Evaluator of the Jinja interpreter: runs the syntax tree (jinja_internal.h) with jinja2's
// semantics for scopes, undefined values, filters, tests and the methods templates call.
#include <algorithm>
#include <cmath>
#include <ctime>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "model/jinja_internal.h"

namespace cortex::model::jinja::detail {

enum class Flow { Normal, Break, Continue };

struct Scope {
  std::shared_ptr<Scope> parent;
  std::vector<std::pair<std::string, Value>> vars;

  const Value* find(std::string_view name) const {
    for (const Scope* s = this; s != nullptr; s = s->parent.get()) {
      for (const auto& [k, v] : s->vars) {
        if (k == name) return &v;
      }
    }
    return nullptr;
  }
  Value* findLocal(std::string_view name) {
    for (auto& [k, v] : vars) {
      if (k == name) return &v;
    }
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    if (Value* old = findLocal(name)) {
      *old = std::move(v);
    } else {
      vars.emplace_back(name, std::move(v));
    }
  }
};

namespace {

// ---- string helpers (byte offsets; Python's whitespace in ASCII) ----

bool pySpace(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

Str sub(const Str& s, size_t begin, size_t end) {
  StrBuilder b(SIZE_MAX);
  b.append(s, begin, end);
  return b.take();
}

bool ascii(const Str& s) { return isAscii(s.text); }

// Number of code points.
int64_t pyLen(const std::string& s) {
  if (isAscii(s)) return static_cast<int64_t>(s.size());
  return static_cast<int64_t>(codePointOffsets(s).size() - 1);
}

char asciiUpper(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c; }
char asciiLower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; }
bool asciiAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }

// The same string with each byte mapped (ASCII case changes keep byte offsets).
Str mapBytes(const Str& s, const std::function<char(size_t, char)>& f) {
  Str out = s;
  for (size_t k = 0; k < out.text.size(); ++k) out.text[k] = f(k, out.text[k]);
  return out;
}

Str upperStr(const Str& s) { return mapBytes(s, [](size_t, char c) { return asciiUpper(c); }); }
Str lowerStr(const Str& s) { return mapBytes(s, [](size_t, char c) { return asciiLower(c); }); }
Str capitalizeStr(const Str& s) {
  return mapBytes(s, [](size_t k, char c) { return k == 0 ? asciiUpper(c) : asciiLower(c); });
}
// Python's str.title(): a letter after a non-letter is upper-cased, others lower-cased.
Str pyTitle(const Str& s) {
  bool prevLetter = false;
  return mapBytes(s, [&prevLetter](size_t, char c) {
    const bool letter = asciiAlpha(c) || static_cast<unsigned char>(c) >= 0x80;
    const char r = letter ? (prevLetter ? asciiLower(c) : asciiUpper(c)) : c;
    prevLetter = letter;
    return r;
  });
}
// jinja2's title filter: words begin after '-', whitespace, '(', '{', '[' or '<'.
Str jinjaTitle(const Str& s) {
  bool start = true;
  return mapBytes(s, [&start](size_t, char c) {
    const bool sep = c == '-' || pySpace(static_cast<unsigned char>(c)) || c == '(' || c == '{' ||
                     c == '[' || c == '<';
    char r = c;
    if (!sep) r = start ? asciiUpper(c) : asciiLower(c);
    start = sep;
    return r;
  });
}

Str stripStr(const Str& s, const std::optional<std::string>& chars, bool left, bool right) {
  auto strip = [&chars](char c) {
    return chars ? chars->find(c) != std::string::npos : pySpace(static_cast<unsigned char>(c));
  };
  size_t b = 0, e = s.text.size();
  if (left) {
    while (b < e && strip(s.text[b])) ++b;
  }
  if (right) {
    while (e > b && strip(s.text[e - 1])) --e;
  }
  return sub(s, b, e);
}

Str replaceStr(const Str& s, const Str& from, const Str& to, int64_t count, size_t limit) {
  StrBuilder b(limit);
  if (from.text.empty()) {
    const std::vector<size_t> cps = codePointOffsets(s.text);
    int64_t done = 0;
    for (size_t k = 0; k + 1 < cps.size(); ++k) {
      if (count < 0 || done < count) {
        b.append(to);
        ++done;
      }
      b.append(s, cps[k], cps[k + 1]);
    }
    if (count < 0 || done < count) b.append(to);
    return b.take();
  }
  size_t at = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t hit = s.text.find(from.text, at);
    if (hit == std::string::npos) break;
    b.append(s, at, hit);
    b.append(to);
    at = hit + from.text.size();
    ++done;
  }
  b.append(s, at, s.text.size());
  return b.take();
}

// Python's str.split / rsplit. sep nullopt: runs of whitespace, empty pieces dropped.
std::vector<Str> splitStr(const Str& s, const std::optional<std::string>& sep, int64_t maxsplit, bool fromRight) {
  std::vector<std::pair<size_t, size_t>> parts;
  const std::string& t = s.text;
  if (!sep) {
    std::vector<std::pair<size_t, size_t>> words;
    size_t k = 0;
    while (k < t.size()) {
      while (k < t.size() && pySpace(static_cast<unsigned char>(t[k]))) ++k;
      if (k >= t.size()) break;
      size_t e = k;
      while (e < t.size() && !pySpace(static_cast<unsigned char>(t[e]))) ++e;
      words.emplace_back(k, e);
      k = e;
    }
    if (maxsplit < 0 || static_cast<size_t>(maxsplit) + 1 >= words.size()) {
      parts = words;
    } else if (!fromRight) {
      const auto n = static_cast<size_t>(maxsplit);
      parts.assign(words.begin(), words.begin() + static_cast<std::ptrdiff_t>(n));
      size_t e = t.size();
      while (e > words[n].first && pySpace(static_cast<unsigned char>(t[e - 1]))) --e;
      parts.emplace_back(words[n].first, e);
    } else {
      const size_t keep = words.size() - static_cast<size_t>(maxsplit);
      size_t b = 0;
      while (b < words[keep - 1].second && pySpace(static_cast<unsigned char>(t[b]))) ++b;
      parts.emplace_back(b, words[keep - 1].second);
      parts.insert(parts.end(), words.begin() + static_cast<std::ptrdiff_t>(keep), words.end());
    }
  } else {
    if (sep->empty()) fail("empty separator");
    if (!fromRight) {
      size_t at = 0;
      int64_t n = 0;
      while (maxsplit < 0 || n < maxsplit) {
        const size_t hit = t.find(*sep, at);
        if (hit == std::string::npos) break;
        parts.emplace_back(at, hit);
        at = hit + sep->size();
        ++n;
      }
      parts.emplace_back(at, t.size());
    } else {
      size_t end = t.size();
      int64_t n = 0;
      std::vector<std::pair<size_t, size_t>> rev;
      while ((maxsplit < 0 || n < maxsplit) && end >= sep->size()) {
        const size_t hit = t.rfind(*sep, end - sep->size());
        if (hit == std::string::npos) break;
        rev.emplace_back(hit + sep->size(), end);
        end = hit;
        ++n;
      }
      rev.emplace_back(0, end);
      parts.assign(rev.rbegin(), rev.rend());
    }
  }
  std::vector<Str> out;
  out.reserve(parts.size());
  for (const auto& [b, e] : parts) out.push_back(sub(s, b, e));
  return out;
}

std::vector<Str> splitLines(const Str& s, bool keepEnds) {
  std::vector<Str> out;
  const std::string& t = s.text;
  size_t start = 0, k = 0;
  while (k < t.size()) {
    const auto c = static_cast<unsigned char>(t[k]);
    size_t brk = 0;
    if (c == '\r' && k + 1 < t.size() && t[k + 1] == '\n') brk = 2;
    else if (c == '\n' || c == '\r' || c == '\v' || c == '\f' || (c >= 0x1c && c <= 0x1e)) brk = 1;
    else if (c == 0xC2 && k + 1 < t.size() && static_cast<unsigned char>(t[k + 1]) == 0x85) brk = 2;
    else if (c == 0xE2 && k + 2 < t.size() && static_cast<unsigned char>(t[k + 1]) == 0x80 &&
             (static_cast<unsigned char>(t[k + 2]) == 0xA8 || static_cast<unsigned char>(t[k + 2]) == 0xA9)) brk = 3;
    if (brk == 0) {
      ++k;
      continue;
    }
    out.push_back(sub(s, start, keepEnds ? k + brk : k));
    k += brk;
    start = k;
  }
  if (start < t.size()) out.push_back(sub(s, start, t.size()));
  return out;
}

int64_t toInt(const Value& v, const char* what) {
  if (v.kind == Kind::Int) return v.i;
  if (v.kind == Kind::Bool) return v.b ? 1 : 0;
  if (v.isUndefined()) failUndefined(v);
  fail(std::string(what) + " must be an integer, not '" + typeName(v) + "'");
}

double toDouble(const Value& v) {
  if (v.kind == Kind::Float) return v.f;
  if (v.kind == Kind::Int) return static_cast<double>(v.i);
  if (v.kind == Kind::Bool) return v.b ? 1 : 0;
  if (v.isUndefined()) failUndefined(v);
  fail("expected a number, got '" + typeName(v) + "'");
}

std::optional<std::string> optString(const std::optional<Value>& v) {
  if (!v || v->kind == Kind::None) return std::nullopt;
  if (v->kind != Kind::String) fail("expected a string argument, got '" + typeName(*v) + "'");
  return v->str();
}

// Byte offset of code point `index` of s (index within [0, length]).
size_t byteOffset(const std::string& s, int64_t index) {
  if (isAscii(s)) return static_cast<size_t>(index);
  return codePointOffsets(s)[static_cast<size_t>(index)];
}

int64_t cpIndex(const std::string& s, size_t byte) {
  if (isAscii(s)) return static_cast<int64_t>(byte);
  const std::vector<size_t> cps = codePointOffsets(s);
  return static_cast<int64_t>(std::lower_bound(cps.begin(), cps.end(), byte) - cps.begin());
}

// Python's slice index adjustment: the indices a slice selects.
std::vector<int64_t> sliceIndices(int64_t len, std::optional<int64_t> start, std::optional<int64_t> stop,
                                  std::optional<int64_t> stepOpt) {
  const int64_t step = stepOpt.value_or(1);
  if (step == 0) fail("slice step cannot be zero");
  auto adjust = [len, step](std::optional<int64_t> v, bool isStart) {
    if (!v) return step > 0 ? (isStart ? int64_t{0} : len) : (isStart ? len - 1 : int64_t{-1});
    int64_t x = *v;
    if (x < 0) {
      x += len;
      if (x < 0) x = step < 0 ? -1 : 0;
    } else if (x >= len) {
      x = step < 0 ? len - 1 : len;
    }
    return x;
  };
  const int64_t b = adjust(start, true), e = adjust(stop, false);
  std::vector<int64_t> out;
  if (step > 0) {
    for (int64_t k = b; k < e; k += step) out.push_back(k);
  } else {
    for (int64_t k = b; k > e; k += step) out.push_back(k);
  }
  return out;
}

// markupsafe.escape, keeping the provenance of the unescaped bytes.
Str escapeStr(const Str& s) {
  StrBuilder b(SIZE_MAX);
  size_t run = 0;
  for (size_t k = 0; k < s.text.size(); ++k) {
    const char* entity = nullptr;
    switch (s.text[k]) {
      case '&': entity = "&amp;"; break;
      case '<': entity = "&lt;"; break;
      case '>': entity = "&gt;"; break;
      case '"': entity = "&#34;"; break;
      case '\'': entity = "&#39;"; break;
      default: break;
    }
    if (entity == nullptr) continue;
    b.append(s, run, k);
    b.appendPlain(entity);
    run = k + 1;
  }
  b.append(s, run, s.text.size());
  return b.take();
}

const std::set<std::string, std::less<>>& knownFilters() {
  static const std::set<std::string, std::less<>> names = {
      "abs", "attr", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first",
      "float", "indent", "int", "items", "join", "last", "length", "list", "lower", "map", "max",
      "min", "reject", "rejectattr", "replace", "reverse", "round", "safe", "select",
      "selectattr", "sort", "string", "sum", "title", "tojson", "trim", "unique", "upper",
      "wordcount"};
  return names;
}

const std::set<std::string, std::less<>>& knownTests() {
  static const std::set<std::string, std::less<>> names = {
      "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped", "even",
      "false", "filter", "float", "ge", "greaterthan", "gt", "in", "integer", "iterable", "le",
      "lessthan", "lower", "lt", "mapping", "ne", "none", "number", "odd", "sameas", "sequence",
      "string", "test", "true", "undefined", "upper", "==", "!=", "<", ">", "<=", ">="};
  return names;
}

}  // namespace

class Interp {
 public:
  explicit Interp(const Limits& limits) : limits_(limits) {}

  const Limits& limits() const { return limits_; }
  void step(uint64_t n = 1) {
    steps_ += n;
    if (steps_ > limits_.maxSteps) {
      fail("the template ran more than " + std::to_string(limits_.maxSteps) +
           " steps (statements, loop iterations, expressions)");
    }
  }
  StrBuilder builder() const { return StrBuilder(limits_.maxOutputBytes); }

  Str run(const Body& body, std::shared_ptr<Scope> root) {
    scope_ = std::move(root);
    StrBuilder out = builder();
    out_ = &out;
    if (exec(body) != Flow::Normal) fail("'break' or 'continue' outside a for loop");
    return out.take();
  }

  std::map<std::string, Value, std::less<>> globals;
  // Namespaces are the only mutable values, so the only way to a reference cycle; their contents
  // are dropped when rendering ends.
  std::vector<std::shared_ptr<DictData>> namespaces;
  ~Interp() {
    for (const auto& ns : namespaces) ns->items.clear();
  }

  // ---- statements ----

  Flow exec(const Body& body) {
    for (const auto& s : body) {
      const Flow f = execStmt(*s);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  // Bounds how deeply statements, expressions and calls nest while running.
  struct Recursion {
    explicit Recursion(Interp& in) : interp(in) {
      if (++interp.recursion_ > kMaxRecursion) fail("the template nests too deeply while rendering");
    }
    ~Recursion() { --interp.recursion_; }
    Interp& interp;
  };
  static constexpr int kMaxRecursion = 1500;

  Flow execStmt(const Stmt& s) {
    Recursion guard(*this);
    try {
      return execStmtInner(s);
    } catch (Failure& f) {
      if (f.line == 0) f.line = s.line;
      throw;
    }
  }

  Flow execStmtInner(const Stmt& s) {
    step();
    switch (s.kind) {
      case SK::Text: out_->appendTrusted(s.text); return Flow::Normal;
      case SK::Output: out_->append(toStr(eval(*s.expr))); return Flow::Normal;
      case SK::If:
        for (const auto& [test, body] : s.branches) {
          if (truthy(eval(*test))) return exec(body);
        }
        return exec(s.elseBody);
      case SK::For: return execFor(s);
      case SK::Set: {
        Value v = eval(*s.expr);
        if (!s.attr.empty()) {
          const Value* ns = scope_->find(s.targets[0]);
          if (ns == nullptr || ns->kind != Kind::Namespace) {
            fail("cannot assign attribute on non-namespace object");
          }
          ns->dict->set(s.attr, std::move(v));
        } else {
          assign(s.targets, std::move(v));
        }
        return Flow::Normal;
      }
      case SK::SetBlock: {
        Value v = Value::string(capture(s.body));
        for (const auto& f : s.filters) v = applyFilter(*f, std::move(v));
        scope_->set(s.targets[0], std::move(v));
        return Flow::Normal;
      }
      case SK::FilterBlock: {
        Value v = Value::string(capture(s.body));
        for (const auto& f : s.filters) v = applyFilter(*f, std::move(v));
        out_->append(toStr(v));
        return Flow::Normal;
      }
      case SK::Macro: scope_->set(s.name, makeMacro(s)); return Flow::Normal;
      case SK::CallBlock: {
        Value caller = makeCaller(s);
        out_->append(toStr(evalCall(*s.expr, &caller)));
        return Flow::Normal;
      }
      case SK::Break: return Flow::Break;
      case SK::Continue: return Flow::Continue;
      case SK::Block: return exec(s.body);
    }
    return Flow::Normal;
  }

  Str capture(const Body& body) {
    StrBuilder b = builder();
    StrBuilder* saved = out_;
    out_ = &b;
    const Flow f = exec(body);
    out_ = saved;
    if (f != Flow::Normal) fail("'break' or 'continue' outside a for loop");
    return b.take();
  }

  void assign(const std::vector<std::string>& targets, Value v) {
    if (targets.size() == 1) {
      scope_->set(targets[0], std::move(v));
      return;
    }
    const Items items = iterate(v);
    if (items.size() != targets.size()) {
      fail("cannot unpack " + std::to_string(items.size()) + " values into " + std::to_string(targets.size()) + " names");
    }
    for (size_t k = 0; k < targets.size(); ++k) scope_->set(targets[k], items[k]);
  }

  Flow execFor(const Stmt& s) {
    const Items all = iterate(eval(*s.expr));
    std::shared_ptr<Scope> outer = scope_;
    Items items;
    if (s.cond) {
      for (const Value& x : all) {
        step();
        scope_ = std::make_shared<Scope>();
        scope_->parent = outer;
        assign(s.targets, x);
        const bool keep = truthy(eval(*s.cond));
        scope_ = outer;
        if (keep) items.push_back(x);
      }
    } else {
      items = all;
    }
    if (items.empty()) return exec(s.elseBody);
    const auto n = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < n; ++k) {
      step();
      auto loop = std::make_shared<DictData>();
      loop->items = {{"index", Value::integer(k + 1)},     {"index0", Value::integer(k)},
                     {"revindex", Value::integer(n - k)},  {"revindex0", Value::integer(n - k - 1)},
                     {"first", Value::boolean(k == 0)},    {"last", Value::boolean(k == n - 1)},
                     {"length", Value::integer(n)},        {"depth", Value::integer(1)},
                     {"depth0", Value::integer(0)}};
      if (k > 0) loop->items.emplace_back("previtem", items[static_cast<size_t>(k - 1)]);
      if (k + 1 < n) loop->items.emplace_back("nextitem", items[static_cast<size_t>(k + 1)]);
      loop->items.emplace_back("cycle", Value::function("cycle", [k](Interp&, Args& a) {
        if (a.pos.empty()) fail("no items for cycling given");
        return a.pos[static_cast<size_t>(k) % a.pos.size()];
      }));
      scope_ = std::make_shared<Scope>();
      scope_->parent = outer;
      assign(s.targets, items[static_cast<size_t>(k)]);
      scope_->set("loop", Value::makeDict(std::move(loop)));
      const Flow f = exec(s.body);
      scope_ = outer;
      if (f == Flow::Break) break;
    }
    return Flow::Normal;
  }

  struct DepthGuard {
    explicit DepthGuard(Interp& in) : interp(in) {
      if (++interp.depth_ > interp.limits_.maxCallDepth) {
        fail("calls nested deeper than " + std::to_string(interp.limits_.maxCallDepth));
      }
    }
    ~DepthGuard() { --interp.depth_; }
    Interp& interp;
  };

  Value makeMacro(const Stmt& s) {
    std::weak_ptr<Scope> defScope = scope_;
    const Stmt* stmt = &s;
    return Value::function(s.name, [stmt, defScope](Interp& in, Args& args) {
      DepthGuard guard(in);
      std::shared_ptr<Scope> parent = defScope.lock();
      if (!parent) fail("macro '" + stmt->name + "' called after its scope ended");
      auto ms = std::make_shared<Scope>();
      ms->parent = parent;
      std::shared_ptr<Scope> saved = in.scope_;
      in.scope_ = ms;
      Items varargs;
      for (size_t k = 0; k < args.pos.size(); ++k) {
        if (k < stmt->params.size()) ms->set(stmt->params[k].first, args.pos[k]);
        else varargs.push_back(args.pos[k]);
      }
      auto kwargs = std::make_shared<DictData>();
      for (auto& [name, v] : args.kw) {
        const bool isParam = std::any_of(stmt->params.begin(), stmt->params.end(),
                                         [&name](const auto& p) { return p.first == name; });
        if (isParam || name == "caller") ms->set(name, v);
        else kwargs->set(name, v);
      }
      for (const auto& [name, def] : stmt->params) {
        if (ms->findLocal(name) != nullptr) continue;
        ms->set(name, def ? in.eval(*def) : Value::undefined("parameter '" + name + "' was not provided"));
      }
      ms->set("varargs", Value::makeList(std::move(varargs)));
      ms->set("kwargs", Value::makeDict(std::move(kwargs)));
      Str text = in.capture(stmt->body);
      in.scope_ = saved;
      return Value::string(std::move(text));
    });
  }

  Value makeCaller(const Stmt& s) {
    std::weak_ptr<Scope> defScope = scope_;
    const Stmt* stmt = &s;
    return Value::function("caller", [stmt, defScope](Interp& in, Args& args) {
      DepthGuard guard(in);
      std::shared_ptr<Scope> parent = defScope.lock();
      if (!parent) fail("caller() called after its scope ended");
      auto cs = std::make_shared<Scope>();
      cs->parent = parent;
      for (size_t k = 0; k < stmt->params.size(); ++k) {
        const auto& [name, def] = stmt->params[k];
        std::optional<Value> v = args.get(k, name);
        cs->set(name, v ? *v : def ? in.eval(*def) : Value::undefined("parameter '" + name + "' was not provided"));
      }
      std::shared_ptr<Scope> saved = in.scope_;
      in.scope_ = cs;
      Str text = in.capture(stmt->body);
      in.scope_ = saved;
      return Value::string(std::move(text));
    });
  }

  // ---- expressions ----

  Value eval(const Expr& e) {
    Recursion guard(*this);
    try {
      return evalInner(e);
    } catch (Failure& f) {
      if (f.line == 0) f.line = e.line;
      throw;
    }
  }

  Value evalInner(const Expr& e) {
    step();
    switch (e.kind) {
      case EK::Literal: return e.literal;
      case EK::Name: {
        if (const Value* v = scope_->find(e.name)) return *v;
        if (auto it = globals.find(e.name); it != globals.end()) return it->second;
        return Value::undefined("'" + e.name + "' is undefined");
      }
      case EK::List:
      case EK::Tuple: {
        Items l;
        l.reserve(e.items.size());
        for (const auto& x : e.items) l.push_back(eval(*x));
        return Value::makeList(std::move(l), e.kind == EK::Tuple);
      }
      case EK::Dict: {
        auto d = std::make_shared<DictData>();
        for (size_t k = 0; k + 1 < e.items.size(); k += 2) {
          Value key = eval(*e.items[k]);
          d->set(dictKey(key), eval(*e.items[k + 1]));
        }
        return Value::makeDict(std::move(d));
      }
      case EK::Attr: return getAttr(eval(*e.a), e.name);
      case EK::Item: return getItem(eval(*e.a), eval(*e.b));
      case EK::Slice: return evalSlice(e);
      case EK::Call: return evalCall(e, nullptr);
      case EK::Filter: return applyFilter(e, eval(*e.a));
      case EK::Test: {
        const bool r = applyTest(e, eval(*e.a));
        return Value::boolean(e.negated ? !r : r);
      }
      case EK::Not: return Value::boolean(!truthy(eval(*e.a)));
      case EK::Neg:
      case EK::Pos: {
        Value v = eval(*e.a);
        if (v.isUndefined()) failUndefined(v);
        if (v.kind == Kind::Float) return Value::number(e.kind == EK::Neg ? -v.f : v.f);
        if (v.kind == Kind::Int || v.kind == Kind::Bool) {
          const int64_t x = v.kind == Kind::Int ? v.i : v.b;
          if (e.kind == EK::Neg && x == INT64_MIN) fail("integer overflow");
          return Value::integer(e.kind == EK::Neg ? -x : x);
        }
        fail("bad operand type for unary " + std::string(e.kind == EK::Neg ? "-" : "+") + ": '" + typeName(v) + "'");
      }
      case EK::Binary: return binary(e.name, eval(*e.a), eval(*e.b));
      case EK::Compare: {
        Value left = eval(*e.a);
        for (size_t k = 0; k < e.items.size(); ++k) {
          Value right = eval(*e.items[k]);
          if (!compareOp(e.ops[k], left, right)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case EK::And: {
        Value l = eval(*e.a);
        return truthy(l) ? eval(*e.b) : l;
      }
      case EK::Or: {
        Value l = eval(*e.a);
        return truthy(l) ? l : eval(*e.b);
      }
      case EK::Cond:
        if (truthy(eval(*e.a))) return eval(*e.b);
        if (e.c) return eval(*e.c);
        return Value::undefined("the inline if-expression on line " + std::to_string(e.line) +
                                " evaluated to false and no else section was defined");
      case EK::Concat: {
        StrBuilder b = builder();
        for (const auto& x : e.items) b.append(toStr(eval(*x)));
        return Value::string(b.take());
      }
    }
    return Value::none();
  }

  Args evalArgs(const Expr& e) {
    Args a;
    a.pos.reserve(e.items.size());
    for (const auto& x : e.items) a.pos.push_back(eval(*x));
    for (const auto& [k, x] : e.kwargs) a.kw.emplace_back(k, eval(*x));
    return a;
  }

  Value evalCall(const Expr& e, const Value* caller) {
    Value fn = eval(*e.a);
    Args args = evalArgs(e);
    if (caller != nullptr) args.kw.emplace_back("caller", *caller);
    return callValue(fn, args);
  }

  Value callValue(const Value& fn, Args& args) {
    if (fn.kind == Kind::Func) return fn.fn->call(*this, args);
    if (fn.isUndefined()) failUndefined(fn);
    fail("'" + typeName(fn) + "' object is not callable");
  }

  Value evalSlice(const Expr& e) {
    Value obj = eval(*e.a);
    auto bound = [this](const ExprP& x) -> std::optional<int64_t> {
      if (!x) return std::nullopt;
      Value v = eval(*x);
      if (v.kind == Kind::None) return std::nullopt;
      if (v.kind != Kind::Int && v.kind != Kind::Bool) {
        fail("slice indices must be integers or None, not '" + typeName(v) + "'");
      }
      return v.kind == Kind::Int ? v.i : v.b;
    };
    const auto start = bound(e.b), stop = bound(e.c), stepv = bound(e.items[0]);
    if (obj.kind == Kind::List && !obj.generator) {
      Items out;
      for (int64_t k : sliceIndices(static_cast<int64_t>(obj.list->size()), start, stop, stepv)) {
        out.push_back((*obj.list)[static_cast<size_t>(k)]);
      }
      return Value::makeList(std::move(out), obj.tuple);
    }
    if (obj.kind == Kind::String) {
      const Str& s = *obj.s;
      const bool plainAscii = ascii(s);
      const std::vector<size_t> cps = plainAscii ? std::vector<size_t>{} : codePointOffsets(s.text);
      const int64_t len = plainAscii ? static_cast<int64_t>(s.text.size()) : static_cast<int64_t>(cps.size() - 1);
      StrBuilder b = builder();
      for (int64_t k : sliceIndices(len, start, stop, stepv)) {
        const auto u = static_cast<size_t>(k);
        if (plainAscii) b.append(s, u, u + 1);
        else b.append(s, cps[u], cps[u + 1]);
      }
      return Value::string(b.take());
    }
    if (obj.isUndefined()) failUndefined(obj);
    fail("'" + typeName(obj) + "' object is not subscriptable");
  }

  // ---- operators ----

  static bool numeric(const Value& v) { return v.isNumber(); }

  Value binary(const std::string& op, const Value& a, const Value& b) {
    if (a.isUndefined()) failUndefined(a);
    if (b.isUndefined()) failUndefined(b);
    auto unsupported = [&]() -> Value {
      fail("unsupported operand type(s) for " + op + ": '" + typeName(a) + "' and '" + typeName(b) + "'");
    };
    if (numeric(a) && numeric(b)) {
      const bool isFloat = a.kind == Kind::Float || b.kind == Kind::Float;
      if (!isFloat) {
        const int64_t x = a.kind == Kind::Int ? a.i : a.b, y = b.kind == Kind::Int ? b.i : b.b;
        int64_t r = 0;
        if (op == "+") {
          if (__builtin_add_overflow(x, y, &r)) fail("integer overflow");
          return Value::integer(r);
        }
        if (op == "-") {
          if (__builtin_sub_overflow(x, y, &r)) fail("integer overflow");
          return Value::integer(r);
        }
        if (op == "*") {
          if (__builtin_mul_overflow(x, y, &r)) fail("integer overflow");
          return Value::integer(r);
        }
        if (op == "/") {
          if (y == 0) fail("division by zero");
          return Value::number(static_cast<double>(x) / static_cast<double>(y));
        }
        if (op == "//" || op == "%") {
          if (y == 0) fail("integer division or modulo by zero");
          if (x == INT64_MIN && y == -1) fail("integer overflow");
          int64_t q = x / y, m = x % y;
          if (m != 0 && ((m < 0) != (y < 0))) {
            --q;
            m += y;
          }
          return Value::integer(op == "//" ? q : m);
        }
        if (op == "**") {
          if (y < 0) return Value::number(std::pow(static_cast<double>(x), static_cast<double>(y)));
          int64_t acc = 1;
          for (int64_t k = 0; k < y; ++k) {
            if (__builtin_mul_overflow(acc, x, &acc)) fail("integer overflow");
            if (acc == 0 || acc == 1) break;
          }
          return Value::integer(acc);
        }
      } else {
        const double x = toDouble(a), y = toDouble(b);
        if (op == "+") return Value::number(x + y);
        if (op == "-") return Value::number(x - y);
        if (op == "*") return Value::number(x * y);
        if (op == "/") {
          if (y == 0) fail("float division by zero");
          return Value::number(x / y);
        }
        if (op == "//" || op == "%") {
          if (y == 0) fail("float modulo");
          double m = std::fmod(x, y);
          if (m != 0 && ((m < 0) != (y < 0))) m += y;
          if (op == "%") return Value::number(m);
          return Value::number(std::floor(x / y));
        }
        if (op == "**") return Value::number(std::pow(x, y));
      }
      return unsupported();
    }
    if (op == "+") {
      if (a.kind == Kind::String && b.kind == Kind::String) {
        StrBuilder sb = builder();
        const bool markup = a.markup || b.markup;
        sb.append(markup && !a.markup ? escapeStr(*a.s) : *a.s);
        sb.append(markup && !b.markup ? escapeStr(*b.s) : *b.s);
        Value r = Value::string(sb.take());
        r.markup = markup;
        return r;
      }
      if (a.kind == Kind::List && b.kind == Kind::List && a.tuple == b.tuple && !a.generator && !b.generator) {
        Items l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        checkSize(l.size());
        return Value::makeList(std::move(l), a.tuple);
      }
      return unsupported();
    }
    if (op == "*") {
      const Value* seq = a.kind == Kind::String || a.kind == Kind::List ? &a : &b;
      const Value* n = seq == &a ? &b : &a;
      if ((seq->kind == Kind::String || (seq->kind == Kind::List && !seq->generator)) && (n->kind == Kind::Int || n->kind == Kind::Bool)) {
        const int64_t times = std::max<int64_t>(0, n->kind == Kind::Int ? n->i : n->b);
        const size_t unit = seq->kind == Kind::String ? seq->s->text.size() : seq->list->size();
        if (unit > 0 && static_cast<uint64_t>(times) > limits_.maxOutputBytes / unit) {
          fail("a repetition larger than " + std::to_string(limits_.maxOutputBytes) + " bytes or items");
        }
        if (seq->kind == Kind::String) {
          StrBuilder sb = builder();
          for (int64_t k = 0; k < times && !seq->s->text.empty(); ++k) {
            step();
            sb.append(*seq->s);
          }
          Value r = Value::string(sb.take());
          r.markup = seq->markup;
          return r;
        }
        Items l;
        for (int64_t k = 0; k < times && !seq->list->empty(); ++k) {
          step();
          checkSize(l.size() + seq->list->size());
          l.insert(l.end(), seq->list->begin(), seq->list->end());
        }
        return Value::makeList(std::move(l), seq->tuple);
      }
      return unsupported();
    }
    if (op == "%" && a.kind == Kind::String) fail("printf-style string formatting ('%') is not supported");
    return unsupported();
  }

  void checkSize(size_t n) {
    step(n / 16);
    if (n > limits_.maxOutputBytes) fail("a list longer than " + std::to_string(limits_.maxOutputBytes) + " items");
  }

  bool contains(const Value& container, const Value& item) {
    switch (container.kind) {
      case Kind::String:
        if (item.kind != Kind::String) {
          if (item.isUndefined()) failUndefined(item);
          fail("'in <string>' requires string as left operand, not " + typeName(item));
        }
        return container.str().find(item.str()) != std::string::npos;
      case Kind::List:
        return std::any_of(container.list->begin(), container.list->end(),
                           [&item](const Value& x) { return equals(x, item); });
      case Kind::Dict: return container.dict->find(dictKey(item)) != nullptr;
      case Kind::Undefined: return false;
      default: fail("argument of type '" + typeName(container) + "' is not iterable");
    }
  }

  bool compareOp(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return equals(a, b);
    if (op == "!=") return !equals(a, b);
    if (op == "in") return contains(b, a);
    if (op == "notin") return !contains(b, a);
    const int c = compare(a, b);
    if (op == "<") return c < 0;
    if (op == ">") return c > 0;
    if (op == "<=") return c <= 0;
    return c >= 0;
  }

  // ---- iteration, attributes, items ----

  Items iterate(const Value& v) {
    switch (v.kind) {
      case Kind::List: return *v.list;
      case Kind::Dict: {
        Items l;
        for (const auto& kv : v.dict->items) l.push_back(keyValue(kv.first));
        return l;
      }
      case Kind::String: {
        Items l;
        const Str& s = *v.s;
        const std::vector<size_t> cps = codePointOffsets(s.text);
        for (size_t k = 0; k + 1 < cps.size(); ++k) l.push_back(Value::string(sub(s, cps[k], cps[k + 1])));
        return l;
      }
      case Kind::Undefined: return {};
      default: fail("'" + typeName(v) + "' object is not iterable");
    }
  }

  static Value unsafe(const std::string& attr, const Value& obj) {
    return Value::undefined("access to attribute '" + attr + "' of '" + typeName(obj) + "' object is unsafe");
  }

  Value getAttr(const Value& obj, const std::string& name) {
    switch (obj.kind) {
      case Kind::Undefined: failUndefined(obj);
      case Kind::String:
        if (Value m = stringMethod(obj, name); m.kind == Kind::Func) return m;
        break;
      case Kind::Dict: {
        if (Value m = dictMethod(obj, name); m.kind == Kind::Func || !m.s) return m.kind == Kind::Func ? m : unsafe(name, obj);
        if (const Value* v = obj.dict->find(name)) return *v;
        break;
      }
      case Kind::Namespace:
        if (const Value* v = obj.dict->find(name)) return *v;
        break;
      case Kind::List:
        if (Value m = listMethod(obj, name); m.kind == Kind::Func || !m.s) return m.kind == Kind::Func ? m : unsafe(name, obj);
        break;
      default: break;
    }
    return Value::undefined("'" + describeObject(obj) + "' has no attribute '" + name + "'");
  }

  static std::string describeObject(const Value& obj) {
    if (obj.kind == Kind::None) return "None";
    return typeName(obj) + " object";
  }

  Value getItem(const Value& obj, const Value& key) {
    if (obj.isUndefined()) failUndefined(obj);
    switch (obj.kind) {
      case Kind::Dict:
        if (key.kind == Kind::String) {
          if (const Value* v = obj.dict->find(key.str())) return *v;
          return getAttr(obj, key.str());
        }
        if (const Value* v = obj.dict->find(dictKey(key))) return *v;
        break;
      case Kind::Namespace:
        if (key.kind == Kind::String) return getAttr(obj, key.str());
        break;
      case Kind::List:
      case Kind::String: {
        if (obj.generator) break;
        if (key.kind == Kind::Int || key.kind == Kind::Bool) {
          int64_t k = key.kind == Kind::Int ? key.i : key.b;
          const int64_t len = obj.kind == Kind::List ? static_cast<int64_t>(obj.list->size()) : pyLen(obj.str());
          if (k < 0) k += len;
          if (k < 0 || k >= len) {
            return Value::undefined("'" + typeName(obj) + " object' has no element " + std::to_string(key.kind == Kind::Int ? key.i : key.b));
          }
          if (obj.kind == Kind::List) return (*obj.list)[static_cast<size_t>(k)];
          const size_t b = byteOffset(obj.str(), k), e = byteOffset(obj.str(), k + 1);
          return Value::string(sub(*obj.s, b, e));
        }
        if (key.kind == Kind::String) return getAttr(obj, key.str());
        break;
      }
      default: break;
    }
    if (key.kind == Kind::String) return getAttr(obj, key.str());
    return Value::undefined("'" + describeObject(obj) + "' has no element " + repr(key));
  }

  // A bound method: fn(args) with the object captured.
  static Value method(const Value& obj, const std::string& name,
                      std::function<Value(Interp&, const Value&, Args&)> f) {
    return Value::function(name, [obj, f = std::move(f)](Interp& in, Args& a) { return f(in, obj, a); });
  }

  // Mutating methods: the sandbox refuses them (an undefined value without a hint marks them).
  static bool mutating(const std::string& name) {
    static const std::set<std::string, std::less<>> names = {
        "append", "extend", "insert", "pop", "remove", "reverse", "sort", "clear", "update",
        "setdefault", "popitem", "add", "discard"};
    return names.count(name) != 0;
  }

  Value dictMethod(const Value& obj, const std::string& name) {
    if (name == "items") {
      return method(obj, name, [](Interp&, const Value& o, Args&) {
        Items l;
        for (const auto& [k, v] : o.dict->items) l.push_back(Value::makeList({keyValue(k), v}, true));
        return Value::makeList(std::move(l));
      });
    }
    if (name == "keys") {
      return method(obj, name, [](Interp&, const Value& o, Args&) {
        Items l;
        for (const auto& kv : o.dict->items) l.push_back(keyValue(kv.first));
        return Value::makeList(std::move(l));
      });
    }
    if (name == "values") {
      return method(obj, name, [](Interp&, const Value& o, Args&) {
        Items l;
        for (const auto& kv : o.dict->items) l.push_back(kv.second);
        return Value::makeList(std::move(l));
      });
    }
    if (name == "get") {
      return method(obj, name, [](Interp&, const Value& o, Args& a) {
        if (a.pos.empty()) fail("get expected at least 1 argument, got 0");
        if (const Value* v = o.dict->find(dictKey(a.pos[0]))) return *v;
        return a.pos.size() > 1 ? a.pos[1] : Value::none();
      });
    }
    if (name == "copy") {
      return method(obj, name, [](Interp&, const Value& o, Args&) {
        return Value::makeDict(std::make_shared<DictData>(*o.dict));
      });
    }
    if (mutating(name)) {
      Value u;  // undefined without a hint: unsafe
      return u;
    }
    return Value::undefined("");
  }

  Value listMethod(const Value& obj, const std::string& name) {
    if (name == "index") {
      return method(obj, name, [](Interp&, const Value& o, Args& a) {
        if (a.pos.empty()) fail("index expected 1 argument");
        for (size_t k = 0; k < o.list->size(); ++k) {
          if (equals((*o.list)[k], a.pos[0])) return Value::integer(static_cast<int64_t>(k));
        }
        fail(repr(a.pos[0]) + " is not in list");
      });
    }
    if (name == "count") {
      return method(obj, name, [](Interp&, const Value& o, Args& a) {
        if (a.pos.empty()) fail("count expected 1 argument");
        return Value::integer(std::count_if(o.list->begin(), o.list->end(),
                                            [&a](const Value& x) { return equals(x, a.pos[0]); }));
      });
    }
    if (mutating(name)) {
      Value u;
      return u;
    }
    return Value::undefined("");
  }

  Value stringMethod(const Value& obj, const std::string& name) {
    using F = std::function<Value(Interp&, const Value&, Args&)>;
    static const std::map<std::string, F, std::less<>> methods = {
        {"strip", [](Interp&, const Value& o, Args& a) { return Value::string(stripStr(*o.s, optString(a.get(0, "chars")), true, true)); }},
        {"lstrip", [](Interp&, const Value& o, Args& a) { return Value::string(stripStr(*o.s, optString(a.get(0, "chars")), true, false)); }},
        {"rstrip", [](Interp&, const Value& o, Args& a) { return Value::string(stripStr(*o.s, optString(a.get(0, "chars")), false, true)); }},
        {"upper", [](Interp&, const Value& o, Args&) { return Value::string(upperStr(*o.s)); }},
        {"lower", [](Interp&, const Value& o, Args&) { return Value::string(lowerStr(*o.s)); }},
        {"title", [](Interp&, const Value& o, Args&) { return Value::string(pyTitle(*o.s)); }},
        {"capitalize", [](Interp&, const Value& o, Args&) { return Value::string(capitalizeStr(*o.s)); }},
        {"split", [](Interp&, const Value& o, Args& a) { return splitMethod(o, a, false); }},
        {"rsplit", [](Interp&, const Value& o, Args& a) { return splitMethod(o, a, true); }},
        {"splitlines", [](Interp&, const Value& o, Args& a) {
           const std::optional<Value> keep = a.get(0, "keepends");
           Items l;
           for (Str& s : splitLines(*o.s, keep && truthy(*keep))) l.push_back(Value::string(std::move(s)));
           return Value::makeList(std::move(l));
         }},
        {"startswith", [](Interp&, const Value& o, Args& a) { return affix(o, a, true); }},
        {"endswith", [](Interp&, const Value& o, Args& a) { return affix(o, a, false); }},
        {"replace", [](Interp& in, const Value& o, Args& a) {
           const std::optional<Value> from = a.get(0, "old"), to = a.get(1, "new"), count = a.get(2, "count");
           if (!from || !to || from->kind != Kind::String || to->kind != Kind::String) fail("replace expects two strings");
           return Value::string(replaceStr(*o.s, *from->s, *to->s, count ? toInt(*count, "count") : -1, in.limits().maxOutputBytes));
         }},
        {"find", [](Interp&, const Value& o, Args& a) { return findMethod(o, a, false, false); }},
        {"rfind", [](Interp&, const Value& o, Args& a) { return findMethod(o, a, true, false); }},
        {"index", [](Interp&, const Value& o, Args& a) { return findMethod(o, a, false, true); }},
        {"rindex", [](Interp&, const Value& o, Args& a) { return findMethod(o, a, true, true); }},
        {"count", [](Interp&, const Value& o, Args& a) {
           const std::optional<std::string> needle = optString(a.get(0, "sub"));
           if (!needle) fail("count expects a string");
           if (needle->empty()) return Value::integer(pyLen(o.str()) + 1);
           int64_t n = 0;
           for (size_t at = o.str().find(*needle); at != std::string::npos; at = o.str().find(*needle, at + needle->size())) ++n;
           return Value::integer(n);
         }},
        {"join", [](Interp& in, const Value& o, Args& a) {
           if (a.pos.empty()) fail("join expects an iterable");
           StrBuilder b = in.builder();
           bool first = true;
           for (const Value& x : in.iterate(a.pos[0])) {
             if (x.kind != Kind::String) fail("sequence item: expected str instance, " + typeName(x) + " found");
             if (!first) b.append(*o.s);
             first = false;
             b.append(*x.s);
           }
           return Value::string(b.take());
         }},
        {"format", [](Interp& in, const Value& o, Args& a) { return formatMethod(in, o, a); }},
        {"isdigit", [](Interp&, const Value& o, Args&) { return charClass(o, [](char c) { return c >= '0' && c <= '9'; }); }},
        {"isalpha", [](Interp&, const Value& o, Args&) { return charClass(o, asciiAlpha); }},
        {"isalnum", [](Interp&, const Value& o, Args&) { return charClass(o, [](char c) { return asciiAlpha(c) || (c >= '0' && c <= '9'); }); }},
        {"isspace", [](Interp&, const Value& o, Args&) { return charClass(o, [](char c) { return pySpace(static_cast<unsigned char>(c)); }); }},
        {"islower", [](Interp&, const Value& o, Args&) { return casedTest(o, true); }},
        {"isupper", [](Interp&, const Value& o, Args&) { return casedTest(o, false); }},
    };
    if (auto it = methods.find(name); it != methods.end()) return method(obj, name, it->second);
    return Value::undefined("");
  }

  static Value charClass(const Value& o, bool (*pred)(char)) {
    const std::string& s = o.str();
    return Value::boolean(!s.empty() && std::all_of(s.begin(), s.end(), pred));
  }

  static Value casedTest(const Value& o, bool lower) {
    bool cased = false;
    for (char c : o.str()) {
      if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) {
        cased = true;
        if (lower ? (c >= 'A' && c <= 'Z') : (c >= 'a' && c <= 'z')) return Value::boolean(false);
      }
    }
    return Value::boolean(cased);
  }

  static Value splitMethod(const Value& o, Args& a, bool fromRight) {
    const std::optional<std::string> sep = optString(a.get(0, "sep"));
    const std::optional<Value> maxsplit = a.get(1, "maxsplit");
    Items l;
    for (Str& s : splitStr(*o.s, sep, maxsplit ? toInt(*maxsplit, "maxsplit") : -1, fromRight)) {
      l.push_back(Value::string(std::move(s)));
    }
    return Value::makeList(std::move(l));
  }

  static Value affix(const Value& o, Args& a, bool prefix) {
    const std::optional<Value> arg = a.get(0, prefix ? "prefix" : "suffix");
    if (!arg) fail(std::string(prefix ? "startswith" : "endswith") + " takes at least 1 argument");
    std::vector<std::string> options;
    if (arg->kind == Kind::String) {
      options.push_back(arg->str());
    } else if (arg->kind == Kind::List && arg->tuple) {
      for (const Value& x : *arg->list) {
        if (x.kind != Kind::String) fail("tuple for startswith/endswith must only contain str");
        options.push_back(x.str());
      }
    } else {
      fail(std::string(prefix ? "startswith" : "endswith") + " first arg must be str or a tuple of str, not " + typeName(*arg));
    }
    const std::string& s = o.str();
    for (const std::string& p : options) {
      if (p.size() <= s.size() && (prefix ? s.compare(0, p.size(), p) == 0 : s.compare(s.size() - p.size(), p.size(), p) == 0)) {
        return Value::boolean(true);
      }
    }
    return Value::boolean(false);
  }

  static Value findMethod(const Value& o, Args& a, bool fromRight, bool raise) {
    const std::optional<std::string> needle = optString(a.get(0, "sub"));
    if (!needle) fail("find expects a string");
    const size_t at = fromRight ? o.str().rfind(*needle) : o.str().find(*needle);
    if (at == std::string::npos) {
      if (raise) fail("substring not found");
      return Value::integer(-1);
    }
    return Value::integer(cpIndex(o.str(), at));
  }

  // str.format with {} / {0} / {name} fields, {{ and }} escapes, no format specs.
  static Value formatMethod(Interp& in, const Value& o, Args& a) {
    const Str& f = *o.s;
    const std::string& t = f.text;
    StrBuilder b = in.builder();
    size_t autoIndex = 0, k = 0, literalStart = 0;
    while (k < t.size()) {
      if ((t[k] == '{' || t[k] == '}') && k + 1 < t.size() && t[k + 1] == t[k]) {
        b.append(f, literalStart, k + 1);
        k += 2;
        literalStart = k;
        continue;
      }
      if (t[k] == '}') fail("Single '}' encountered in format string");
      if (t[k] != '{') {
        ++k;
        continue;
      }
      b.append(f, literalStart, k);
      const size_t close = t.find('}', k);
      if (close == std::string::npos) fail("Single '{' encountered in format string");
      const std::string field = t.substr(k + 1, close - k - 1);
      if (field.find_first_of(":!.[") != std::string::npos) fail("format specifications are not supported: {" + field + "}");
      const Value* v = nullptr;
      if (field.empty() || std::all_of(field.begin(), field.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        const size_t index = field.empty() ? autoIndex++ : std::stoul(field);
        if (index >= a.pos.size()) fail("Replacement index " + std::to_string(index) + " out of range for positional args tuple");
        v = &a.pos[index];
      } else {
        for (const auto& [kname, kv] : a.kw) {
          if (kname == field) v = &kv;
        }
        if (v == nullptr) fail("'" + field + "'");
      }
      b.append(toStr(*v));
      k = close + 1;
      literalStart = k;
    }
    b.append(f, literalStart, t.size());
    return Value::string(b.take());
  }

  // ---- filters ----

  Value applyFilter(const Expr& e, Value input) {
    Args args = evalArgs(e);
    return filter(e.name, std::move(input), args);
  }

  Value attribute(const Value& item, const std::string& path) {
    // "a.b" and "a.0" walk into nested values, as jinja2's make_attrgetter.
    Value v = item;
    size_t start = 0;
    while (true) {
      const size_t dot = path.find('.', start);
      const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      if (!part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        v = getItem(v, Value::integer(std::stoll(part)));
      } else {
        v = getItem(v, Value::plain(part));
      }
      if (dot == std::string::npos) return v;
      if (v.isUndefined()) return v;
      start = dot + 1;
    }
  }

  std::function<Value(const Value&)> keyFunction(const std::optional<Value>& attr, bool caseSensitive) {
    std::optional<std::string> path;
    if (attr && attr->kind != Kind::None) path = toStr(*attr).text;
    return [this, path, caseSensitive](const Value& x) {
      Value v = path ? attribute(x, *path) : x;
      if (!caseSensitive && v.kind == Kind::String) return Value::string(lowerStr(*v.s));
      return v;
    };
  }

  bool runTest(const std::string& name, const Value& v, std::vector<Value> args) {
    Args a;
    a.pos = std::move(args);
    return test(name, v, a);
  }

  Value filter(const std::string& name, Value v, Args& a) {
    auto str = [&v]() { return toStr(v); };
    if (name == "safe") {
      Value r = Value::string(str());
      r.markup = true;
      return r;
    }
    if (name == "string") {
      Value r = Value::string(str());
      r.markup = v.kind == Kind::String && v.markup;
      return r;
    }
    if (name == "trim") return Value::string(stripStr(str(), optString(a.get(0, "chars")), true, true));
    if (name == "upper") return Value::string(upperStr(str()));
    if (name == "lower") return Value::string(lowerStr(str()));
    if (name == "title") return Value::string(jinjaTitle(str()));
    if (name == "capitalize") return Value::string(capitalizeStr(str()));
    if (name == "length" || name == "count") {
      switch (v.kind) {
        case Kind::String: return Value::integer(pyLen(v.str()));
        case Kind::List:
          if (v.generator) fail("object of type 'generator' has no len()");
          return Value::integer(static_cast<int64_t>(v.list->size()));
        case Kind::Dict: return Value::integer(static_cast<int64_t>(v.dict->items.size()));
        case Kind::Undefined: return Value::integer(0);
        default: fail("object of type '" + typeName(v) + "' has no len()");
      }
    }
    if (name == "default" || name == "d") {
      const std::optional<Value> def = a.get(0, "default_value");
      const std::optional<Value> boolean = a.get(1, "boolean");
      const bool useDefault = v.isUndefined() || (boolean && truthy(*boolean) && !truthy(v));
      return useDefault ? def.value_or(Value::plain("")) : v;
    }
    if (name == "replace") {
      const std::optional<Value> from = a.get(0, "old"), to = a.get(1, "new"), count = a.get(2, "count");
      if (!from || !to) fail("replace expects two arguments");
      return Value::string(replaceStr(str(), toStr(*from), toStr(*to),
                                      count && count->kind != Kind::None ? toInt(*count, "count") : -1,
                                      limits_.maxOutputBytes));
    }
    if (name == "join") {
      const std::optional<Value> sep = a.get(0, "d"), attr = a.get(1, "attribute");
      const Str sepStr = sep ? toStr(*sep) : Str{};
      StrBuilder b = builder();
      bool first = true;
      for (const Value& x : iterate(v)) {
        if (!first) b.append(sepStr);
        first = false;
        b.append(toStr(attr && attr->kind != Kind::None ? attribute(x, toStr(*attr).text) : x));
      }
      return Value::string(b.take());
    }
    if (name == "tojson") {
      JsonOptions o;
      const std::optional<Value> ensureAscii = a.get(0, "ensure_ascii"), indent = a.get(1, "indent"),
                                 separators = a.get(2, "separators"), sortKeys = a.get(3, "sort_keys");
      o.ensureAscii = ensureAscii && truthy(*ensureAscii);
      if (indent && indent->kind != Kind::None) {
        if (indent->kind == Kind::String) o.indent = indent->str();
        else o.indent = std::string(static_cast<size_t>(std::max<int64_t>(0, toInt(*indent, "indent"))), ' ');
        o.itemSeparator = ",";
      }
      if (separators && separators->kind != Kind::None) {
        if (separators->kind != Kind::List || separators->list->size() != 2 ||
            (*separators->list)[0].kind != Kind::String || (*separators->list)[1].kind != Kind::String) {
          fail("tojson: separators must be a pair of strings");
        }
        o.itemSeparator = (*separators->list)[0].str();
        o.keySeparator = (*separators->list)[1].str();
      }
      o.sortKeys = sortKeys && truthy(*sortKeys);
      return Value::plain(toJson(v, o));
    }
    if (name == "last" && v.generator) fail("'generator' object is not reversible");
    if (name == "first" || name == "last") {
      if (v.kind == Kind::List && !v.list->empty()) return name == "first" ? v.list->front() : v.list->back();
      if (v.kind == Kind::List || v.isUndefined()) return Value::undefined("No " + name + " item, sequence was empty.");
      const Items items = iterate(v);
      if (items.empty()) return Value::undefined("No " + name + " item, sequence was empty.");
      return name == "first" ? items.front() : items.back();
    }
    if (name == "list") return Value::makeList(iterate(v));
    if (name == "items") {
      if (v.isUndefined()) return Value::makeList({});
      if (v.kind != Kind::Dict) fail("items filter expects a mapping, got '" + typeName(v) + "'");
      Value items = callValue(dictMethod(v, "items"), a);
      items.generator = true;
      return items;
    }
    if (name == "int") {
      const std::optional<Value> def = a.get(0, "default");
      const Value fallback = def.value_or(Value::integer(0));
      switch (v.kind) {
        case Kind::Int: return v;
        case Kind::Bool: return Value::integer(v.b);
        case Kind::Float:
          if (!std::isfinite(v.f) || std::fabs(v.f) >= 9.2e18) return fallback;
          return Value::integer(static_cast<int64_t>(v.f));
        case Kind::String: {
          std::string t = v.str();
          t.erase(std::remove(t.begin(), t.end(), '_'), t.end());
          const Str trimmed = stripStr(Str{t, {}}, std::nullopt, true, true);
          char* end = nullptr;
          errno = 0;
          const long long x = std::strtoll(trimmed.text.c_str(), &end, 10);
          if (!trimmed.text.empty() && end != nullptr && *end == '\0' && errno == 0) return Value::integer(x);
          const double d = std::strtod(trimmed.text.c_str(), &end);
          if (!trimmed.text.empty() && end != nullptr && *end == '\0' && std::isfinite(d) && std::fabs(d) < 9.2e18) {
            return Value::integer(static_cast<int64_t>(d));
          }
          return fallback;
        }
        default: return fallback;
      }
    }
    if (name == "float") {
      const std::optional<Value> def = a.get(0, "default");
      if (v.isNumber()) return Value::number(toDouble(v));
      if (v.kind == Kind::String) {
        const Str trimmed = stripStr(*v.s, std::nullopt, true, true);
        char* end = nullptr;
        const double d = std::strtod(trimmed.text.c_str(), &end);
        if (!trimmed.text.empty() && end != nullptr && *end == '\0') return Value::number(d);
      }
      return def.value_or(Value::number(0));
    }
    if (name == "abs") {
      if (v.kind == Kind::Float) return Value::number(std::fabs(v.f));
      const int64_t x = toInt(v, "abs argument");
      if (x == INT64_MIN) fail("integer overflow");
      return Value::integer(x < 0 ? -x : x);
    }
    if (name == "round") {
      const std::optional<Value> precision = a.get(0, "precision"), how = a.get(1, "method");
      const int64_t p = precision ? toInt(*precision, "precision") : 0;
      const std::string m = how ? toStr(*how).text : "common";
      if (v.kind == Kind::Int && m == "common") return v;
      const double scale = std::pow(10.0, static_cast<double>(p));
      const double x = toDouble(v) * scale;
      double r;
      if (m == "common") r = std::nearbyint(x);
      else if (m == "ceil") r = std::ceil(x);
      else if (m == "floor") r = std::floor(x);
      else fail("method must be common, ceil or floor");
      return Value::number(r / scale);
    }
    if (name == "indent") return indentFilter(str(), a);
    if (name == "escape" || name == "e") {
      Value r = v.kind == Kind::String && v.markup ? v : Value::string(escapeStr(str()));
      r.markup = true;
      return r;
    }
    if (name == "reverse") {
      if (v.kind == Kind::String) {
        const std::vector<size_t> cps = codePointOffsets(v.str());
        StrBuilder b = builder();
        for (size_t k = cps.size() - 1; k > 0; --k) b.append(*v.s, cps[k - 1], cps[k]);
        return Value::string(b.take());
      }
      Items l = iterate(v);
      std::reverse(l.begin(), l.end());
      return v.kind == Kind::List && !v.generator ? Value::makeGenerator(std::move(l)) : Value::makeList(std::move(l));
    }
    if (name == "wordcount") return Value::integer(static_cast<int64_t>(splitStr(str(), std::nullopt, -1, false).size()));
    if (name == "attr") {
      const std::optional<Value> attr = a.get(0, "name");
      if (!attr) fail("attr expects a name");
      return getAttr(v, toStr(*attr).text);
    }
    if (name == "map") {
      Items out;
      const Items items = truthy(v) ? iterate(v) : Items{};  // jinja2: `if value:` first
      if (std::optional<Value> attr = a.get(SIZE_MAX, "attribute")) {
        const std::optional<Value> def = a.get(SIZE_MAX, "default");
        for (const Value& x : items) {
          Value r = attribute(x, toStr(*attr).text);
          out.push_back(r.isUndefined() && def ? *def : r);
        }
      } else {
        if (a.pos.empty()) fail("map requires a filter argument");
        const std::string fname = toStr(a.pos[0]).text;
        if (knownFilters().count(fname) == 0) fail("No filter named '" + fname + "'");
        Args rest;
        rest.pos.assign(a.pos.begin() + 1, a.pos.end());
        rest.kw = a.kw;
        for (const Value& x : items) out.push_back(filter(fname, x, rest));
      }
      return Value::makeGenerator(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool byAttr = name == "selectattr" || name == "rejectattr";
      const bool keepWhenTrue = name == "select" || name == "selectattr";
      size_t k = 0;
      std::string attr;
      if (byAttr) {
        if (a.pos.empty()) fail(name + " requires an attribute name");
        attr = toStr(a.pos[k++]).text;
      }
      std::optional<std::string> testName;
      if (k < a.pos.size()) testName = toStr(a.pos[k++]).text;
      if (testName && knownTests().count(*testName) == 0) fail("No test named '" + *testName + "'");
      const std::vector<Value> testArgs(a.pos.begin() + static_cast<std::ptrdiff_t>(k), a.pos.end());
      Items out;
      for (const Value& x : truthy(v) ? iterate(v) : Items{}) {
        step();
        const Value subject = byAttr ? attribute(x, attr) : x;
        const bool r = testName ? runTest(*testName, subject, testArgs) : truthy(subject);
        if (r == keepWhenTrue) out.push_back(x);
      }
      return Value::makeGenerator(std::move(out));
    }
    if (name == "dictsort") {
      const std::optional<Value> cs = a.get(0, "case_sensitive"), by = a.get(1, "by"), rev = a.get(2, "reverse");
      if (v.kind != Kind::Dict) fail("dictsort expects a mapping");
      const bool byValue = by && toStr(*by).text == "value";
      Items l;
      for (const auto& [k, x] : v.dict->items) l.push_back(Value::makeList({keyValue(k), x}, true));
      const bool caseSensitive = cs && truthy(*cs);
      auto key = [byValue, caseSensitive](const Value& item) {
        Value x = (*item.list)[byValue ? 1 : 0];
        if (!caseSensitive && x.kind == Kind::String) return Value::string(lowerStr(*x.s));
        return x;
      };
      std::stable_sort(l.begin(), l.end(), [&key](const Value& x, const Value& y) { return compare(key(x), key(y)) < 0; });
      if (rev && truthy(*rev)) std::reverse(l.begin(), l.end());
      return Value::makeList(std::move(l));
    }
    if (name == "sort") {
      const std::optional<Value> rev = a.get(0, "reverse"), cs = a.get(1, "case_sensitive"), attr = a.get(2, "attribute");
      Items l = iterate(v);
      auto key = keyFunction(attr, cs && truthy(*cs));
      const bool reverse = rev && truthy(*rev);
      std::stable_sort(l.begin(), l.end(), [&key, reverse](const Value& x, const Value& y) {
        return reverse ? compare(key(y), key(x)) < 0 : compare(key(x), key(y)) < 0;
      });
      return Value::makeList(std::move(l));
    }
    if (name == "unique") {
      const std::optional<Value> cs = a.get(0, "case_sensitive"), attr = a.get(1, "attribute");
      auto key = keyFunction(attr, cs && truthy(*cs));
      Items out, seen;
      for (const Value& x : iterate(v)) {
        step();
        const Value kx = key(x);
        if (std::none_of(seen.begin(), seen.end(), [&kx](const Value& s) { return equals(s, kx); })) {
          seen.push_back(kx);
          out.push_back(x);
        }
      }
      return Value::makeGenerator(std::move(out));
    }
    if (name == "min" || name == "max") {
      const std::optional<Value> cs = a.get(0, "case_sensitive"), attr = a.get(1, "attribute");
      auto key = keyFunction(attr, cs && truthy(*cs));
      const Items l = iterate(v);
      if (l.empty()) return Value::undefined("No aggregated item, sequence was empty.");
      size_t best = 0;
      for (size_t k = 1; k < l.size(); ++k) {
        const int c = compare(key(l[k]), key(l[best]));
        if (name == "min" ? c < 0 : c > 0) best = k;
      }
      return l[best];
    }
    if (name == "sum") {
      const std::optional<Value> attr = a.get(0, "attribute"), start = a.get(1, "start");
      Value total = start.value_or(Value::integer(0));
      for (const Value& x : iterate(v)) {
        total = binary("+", total, attr && attr->kind != Kind::None ? attribute(x, toStr(*attr).text) : x);
      }
      return total;
    }
    fail("No filter named '" + name + "'");
  }

  Value indentFilter(const Str& input, Args& a) {
    const std::optional<Value> width = a.get(0, "width"), first = a.get(1, "first"), blank = a.get(2, "blank");
    Str ind;
    if (width && width->kind == Kind::String) {
      ind = *width->s;
    } else {
      ind.text = std::string(static_cast<size_t>(std::clamp<int64_t>(width ? toInt(*width, "width") : 4, 0, 4096)), ' ');
      if (!ind.text.empty()) ind.trusted.push_back({0, ind.text.size()});
    }
    StrBuilder padded = builder();
    padded.append(input);
    padded.appendTrusted("\n");
    const Str s = padded.take();
    const std::vector<Str> lines = splitLines(s, false);
    StrBuilder b = builder();
    if (first && truthy(*first)) b.append(ind);
    for (size_t k = 0; k < lines.size(); ++k) {
      if (k > 0) b.appendTrusted("\n");
      if (k > 0 && ((blank && truthy(*blank)) || !lines[k].text.empty())) b.append(ind);
      b.append(lines[k]);
    }
    return Value::string(b.take());
  }

  // ---- tests ----

  bool applyTest(const Expr& e, const Value& v) {
    Args a = evalArgs(e);
    return test(e.name, v, a);
  }

  bool test(const std::string& name, const Value& v, Args& a) {
    auto arg = [&a, &name]() -> const Value& {
      if (a.pos.empty()) fail("test '" + name + "' requires an argument");
      return a.pos[0];
    };
    if (name == "defined") return !v.isUndefined();
    if (name == "undefined") return v.isUndefined();
    if (name == "none") return v.kind == Kind::None;
    if (name == "string") return v.kind == Kind::String;
    if (name == "mapping") return v.kind == Kind::Dict;
    if (name == "iterable") return v.kind == Kind::String || v.kind == Kind::List || v.kind == Kind::Dict || v.isUndefined();
    if (name == "sequence") return v.kind == Kind::String || (v.kind == Kind::List && !v.generator) || v.kind == Kind::Dict || v.isUndefined();
    if (name == "number") return v.isNumber();
    if (name == "integer") return v.kind == Kind::Int;
    if (name == "float") return v.kind == Kind::Float;
    if (name == "boolean") return v.kind == Kind::Bool;
    if (name == "true") return v.kind == Kind::Bool && v.b;
    if (name == "false") return v.kind == Kind::Bool && !v.b;
    if (name == "callable") return v.kind == Kind::Func;
    if (name == "escaped") return v.kind == Kind::String && v.markup;
    if (name == "equalto" || name == "eq" || name == "==") return equals(v, arg());
    if (name == "ne" || name == "!=") return !equals(v, arg());
    if (name == "lt" || name == "lessthan" || name == "<") return compare(v, arg()) < 0;
    if (name == "gt" || name == "greaterthan" || name == ">") return compare(v, arg()) > 0;
    if (name == "le" || name == "<=") return compare(v, arg()) <= 0;
    if (name == "ge" || name == ">=") return compare(v, arg()) >= 0;
    if (name == "in") return contains(arg(), v);
    if (name == "sameas") {
      const Value& o = arg();
      if (v.kind != o.kind) return false;
      switch (v.kind) {
        case Kind::None:
        case Kind::Undefined: return true;
        case Kind::Bool: return v.b == o.b;
        case Kind::Int: return v.i == o.i && v.i >= -5 && v.i <= 256;  // CPython's small ints
        case Kind::String: return v.s == o.s;
        case Kind::List: return v.list == o.list;
        case Kind::Dict:
        case Kind::Namespace: return v.dict == o.dict;
        case Kind::Func: return v.fn == o.fn;
        default: return false;
      }
    }
    if (name == "odd" || name == "even") {
      const int64_t x = toInt(v, "value");
      return (x % 2 != 0) == (name == "odd");
    }
    if (name == "divisibleby") {
      const int64_t x = toInt(v, "value"), d = toInt(arg(), "divisor");
      if (d == 0) fail("integer division or modulo by zero");
      return x % d == 0;
    }
    if (name == "lower" || name == "upper") {
      if (v.kind != Kind::String) fail("test '" + name + "' expects a string");
      return truthy(casedTest(v, name == "lower"));
    }
    if (name == "filter") return knownFilters().count(toStr(arg()).text) != 0;
    if (name == "test") return knownTests().count(toStr(arg()).text) != 0;
    fail("No test named '" + name + "'");
  }

  std::shared_ptr<Scope> scope_;

 private:
  const Limits& limits_;
  uint64_t steps_ = 0;
  int depth_ = 0;
  int recursion_ = 0;
  StrBuilder* out_ = nullptr;
};

namespace {

void addGlobals(Interp& in) {
  in.globals["range"] = Value::function("range", [](Interp& i, Args& a) {
    int64_t start = 0, stop = 0, stepv = 1;
    if (a.pos.size() == 1) {
      stop = toInt(a.pos[0], "range argument");
    } else if (a.pos.size() == 2 || a.pos.size() == 3) {
      start = toInt(a.pos[0], "range argument");
      stop = toInt(a.pos[1], "range argument");
      if (a.pos.size() == 3) stepv = toInt(a.pos[2], "range argument");
    } else {
      fail("range expected 1 to 3 arguments");
    }
    if (stepv == 0) fail("range() arg 3 must not be zero");
    const double n = std::ceil((static_cast<double>(stop) - static_cast<double>(start)) / static_cast<double>(stepv));
    if (n > 100000) fail("range too big, maximum size for range is 100000");
    Items l;
    for (int64_t k = start; stepv > 0 ? k < stop : k > stop; k += stepv) {
      if (l.size() >= 100000) fail("range too big, maximum size for range is 100000");
      i.step();
      l.push_back(Value::integer(k));
    }
    return Value::makeList(std::move(l));
  });
  in.globals["namespace"] = Value::function("namespace", [](Interp& i, Args& a) {
    Value ns;
    ns.kind = Kind::Namespace;
    ns.dict = std::make_shared<DictData>();
    i.namespaces.push_back(ns.dict);
    for (const Value& p : a.pos) {
      if (p.kind != Kind::Dict) fail("namespace() positional argument must be a mapping");
      for (const auto& [k, v] : p.dict->items) ns.dict->set(k, v);
    }
    for (const auto& [k, v] : a.kw) ns.dict->set(k, v);
    return ns;
  });
  in.globals["dict"] = Value::function("dict", [](Interp&, Args& a) {
    auto d = std::make_shared<DictData>();
    for (const Value& p : a.pos) {
      if (p.kind != Kind::Dict) fail("dict() positional argument must be a mapping");
      for (const auto& [k, v] : p.dict->items) d->set(k, v);
    }
    for (const auto& [k, v] : a.kw) d->set(k, v);
    return Value::makeDict(std::move(d));
  });
  in.globals["raise_exception"] = Value::function("raise_exception", [](Interp&, Args& a) -> Value {
    fail("the template raised an error: " + (a.pos.empty() ? std::string() : toStr(a.pos[0]).text));
  });
  in.globals["strftime_now"] = Value::function("strftime_now", [](Interp&, Args& a) {
    const std::optional<std::string> format = optString(a.get(0, "format"));
    if (!format) fail("strftime_now expects a format string");
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    localtime_r(&now, &tm);
    char buf[512];
    const size_t n = std::strftime(buf, sizeof buf, format->c_str(), &tm);
    return Value::plain(std::string(buf, n));
  });
}

}  // namespace

bool isKnownFilter(std::string_view name) { return knownFilters().count(name) != 0; }
bool isKnownTest(std::string_view name) { return knownTests().count(name) != 0; }

}  // namespace cortex::model::jinja::detail

namespace cortex::model::jinja {

Template::Template(std::string_view source) {
  auto p = std::make_shared<Program>();
  p->body = detail::parseTemplate(source);
  program_ = std::move(p);
}

Rendered Template::render(const nlohmann::ordered_json& context, std::span<const std::string> trustedNames,
                          const Limits& limits) const {
  using namespace detail;
  if (!context.is_object()) throw TemplateError("line 0: the template context must be a JSON object");
  Interp in(limits);
  addGlobals(in);
  auto root = std::make_shared<Scope>();
  for (const auto& [k, v] : context.items()) {
    const bool trusted = std::find(trustedNames.begin(), trustedNames.end(), k) != trustedNames.end();
    root->set(k, fromJson(v, trusted));
  }
  try {
    Str out = in.run(program_->body, root);
    root->vars.clear();  // macros refer to the scope weakly; drop values before it goes
    return Rendered{std::move(out.text), std::move(out.trusted)};
  } catch (const Failure& f) {
    throw TemplateError("line " + std::to_string(f.line) + ": " + f.message);
  }
}

}  // namespace cortex::model::jinja
