// Values of the Jinja interpreter: Python's str(), repr(), ==, ordering and json.dumps for them,
// and strings that remember which of their bytes the template wrote.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "model/jinja_internal.h"

namespace cortex::model::jinja::detail {

void fail(std::string message) { throw Failure{std::move(message), 0}; }

// ---- StrBuilder ----

void StrBuilder::grow(size_t n) {
  if (out_.text.size() + n > limit_) {
    fail("output larger than " + std::to_string(limit_) + " bytes");
  }
}

void StrBuilder::mark(size_t begin, size_t end) {
  if (begin == end) return;
  if (!out_.trusted.empty() && out_.trusted.back().end == begin) {
    out_.trusted.back().end = end;
  } else {
    out_.trusted.push_back({begin, end});
  }
}

void StrBuilder::append(const Str& s) { append(s, 0, s.text.size()); }

void StrBuilder::append(const Str& s, size_t begin, size_t end) {
  if (begin >= end) return;
  grow(end - begin);
  const size_t base = out_.text.size();
  out_.text.append(s.text, begin, end - begin);
  for (const ByteRange& r : s.trusted) {
    const size_t b = std::max(r.begin, begin), e = std::min(r.end, end);
    if (b < e) mark(base + b - begin, base + e - begin);
  }
}

void StrBuilder::appendPlain(std::string_view text) {
  grow(text.size());
  out_.text += text;
}

void StrBuilder::appendTrusted(std::string_view text) {
  grow(text.size());
  const size_t base = out_.text.size();
  out_.text += text;
  mark(base, out_.text.size());
}

// ---- constructors ----

Value Value::undefined(std::string hint) {
  Value v;
  v.kind = Kind::Undefined;
  v.s = std::make_shared<const Str>(Str{std::move(hint), {}});
  return v;
}
Value Value::none() {
  Value v;
  v.kind = Kind::None;
  return v;
}
Value Value::boolean(bool x) {
  Value v;
  v.kind = Kind::Bool;
  v.b = x;
  return v;
}
Value Value::integer(int64_t x) {
  Value v;
  v.kind = Kind::Int;
  v.i = x;
  return v;
}
Value Value::number(double x) {
  Value v;
  v.kind = Kind::Float;
  v.f = x;
  return v;
}
Value Value::string(Str x) {
  Value v;
  v.kind = Kind::String;
  v.s = std::make_shared<const Str>(std::move(x));
  return v;
}
Value Value::plain(std::string x) { return string(Str{std::move(x), {}}); }
Value Value::trusted(std::string x) {
  Str s{std::move(x), {}};
  if (!s.text.empty()) s.trusted.push_back({0, s.text.size()});
  return string(std::move(s));
}
uint16_t depthOf(const Value& v) {
  if (v.kind == Kind::List || v.kind == Kind::Dict) return v.depth;
  if (v.kind == Kind::Namespace) return v.dict->depth;
  return 0;
}

namespace {
uint16_t nestedDepth(uint16_t inner) {
  if (inner >= kMaxValueDepth) fail("values nested deeper than " + std::to_string(kMaxValueDepth));
  return static_cast<uint16_t>(inner + 1);
}
}  // namespace

Value Value::makeList(Items x, bool tuple) {
  Value v;
  uint16_t inner = 0;
  for (const Value& e : x) inner = std::max(inner, depthOf(e));
  v.depth = nestedDepth(inner);
  v.kind = Kind::List;
  v.tuple = tuple;
  v.list = std::make_shared<const Items>(std::move(x));
  return v;
}
Value Value::makeGenerator(Items x) {
  Value v = makeList(std::move(x));
  v.generator = true;
  return v;
}

Value Value::makeDict(std::shared_ptr<DictData> d) {
  Value v;
  uint16_t inner = 0;
  for (const auto& kv : d->items) inner = std::max(inner, depthOf(kv.second));
  v.depth = nestedDepth(inner);
  v.kind = Kind::Dict;
  v.dict = std::move(d);
  return v;
}
Value Value::function(std::string name, std::function<Value(Interp&, Args&)> call) {
  Value v;
  v.kind = Kind::Func;
  v.fn = std::make_shared<const Callable>(Callable{std::move(name), std::move(call)});
  return v;
}

const Value* DictData::find(std::string_view key) const {
  for (const auto& [k, v] : items) {
    if (k == key) return &v;
  }
  return nullptr;
}

void DictData::set(std::string key, Value v) {
  depth = std::max(depth, nestedDepth(depthOf(v)));
  for (auto& [k, old] : items) {
    if (k == key) {
      old = std::move(v);
      return;
    }
  }
  items.emplace_back(std::move(key), std::move(v));
}

std::optional<Value> Args::get(size_t index, std::string_view name) const {
  if (index < pos.size()) return pos[index];
  for (const auto& [k, v] : kw) {
    if (k == name) return v;
  }
  return std::nullopt;
}

// ---- Python semantics ----

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined:
    case Kind::None: return false;
    case Kind::Bool: return v.b;
    case Kind::Int: return v.i != 0;
    case Kind::Float: return v.f != 0;
    case Kind::String: return !v.s->text.empty();
    case Kind::List: return v.generator || !v.list->empty();
    case Kind::Dict: return !v.dict->items.empty();
    case Kind::Namespace:
    case Kind::Func: return true;
  }
  return false;
}

std::string typeName(const Value& v) {
  switch (v.kind) {
    case Kind::Undefined: return "Undefined";
    case Kind::None: return "NoneType";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "str";
    case Kind::List: return v.generator ? "generator" : v.tuple ? "tuple" : "list";
    case Kind::Dict: return "dict";
    case Kind::Namespace: return "Namespace";
    case Kind::Func: return "function";
  }
  return "object";
}

void failUndefined(const Value& v) {
  fail(v.s && !v.s->text.empty() ? v.s->text : std::string("value is undefined"));
}

std::string pyFloat(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  // sci: [-]D[.DDD]e[+-]XX
  const size_t e = sci.find('e');
  const int exp = std::stoi(sci.substr(e + 1));
  std::string mant = sci.substr(0, e);
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant) {
    if (c != '.') digits += c;
  }
  std::string out = neg ? "-" : "";
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out += "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    } else if (static_cast<size_t>(exp) + 1 >= digits.size()) {
      out += digits + std::string(static_cast<size_t>(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out += digits.substr(0, static_cast<size_t>(exp) + 1) + "." + digits.substr(static_cast<size_t>(exp) + 1);
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  char ebuf[16];
  std::snprintf(ebuf, sizeof ebuf, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
  return out + ebuf;
}

namespace {

// Python's repr() of a str.
std::string reprString(const std::string& s) {
  const bool hasSingle = s.find('\'') != std::string::npos;
  const bool hasDouble = s.find('"') != std::string::npos;
  const char q = hasSingle && !hasDouble ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == static_cast<unsigned char>(q)) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += q;
  return out;
}

}  // namespace

namespace {
std::string reprAt(const Value& v, int depth) {
  if (depth > kMaxValueDepth) fail("values nested too deeply to print");
  switch (v.kind) {
    case Kind::String: return reprString(v.s->text);
    case Kind::List: {
      if (v.generator) return "<generator object>";
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k > 0) out += ", ";
        out += reprAt((*v.list)[k], depth + 1);
      }
      if (v.tuple && v.list->size() == 1) out += ",";
      return out + (v.tuple ? ")" : "]");
    }
    case Kind::Dict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        out += reprAt(keyValue(k), depth + 1) + ": " + reprAt(x, depth + 1);
      }
      return out + "}";
    }
    case Kind::Namespace: {
      std::string out = "<Namespace {";
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        out += reprString(k) + ": " + reprAt(x, depth + 1);
      }
      return out + "}>";
    }
    case Kind::Undefined: return "Undefined";
    default: return toStr(v).text;
  }
}
}  // namespace

std::string repr(const Value& v) { return reprAt(v, 0); }

Str toStr(const Value& v) {
  switch (v.kind) {
    case Kind::String: return *v.s;
    case Kind::Undefined: return {};
    case Kind::None: return {"None", {}};
    case Kind::Bool: return {v.b ? "True" : "False", {}};
    case Kind::Int: return {std::to_string(v.i), {}};
    case Kind::Float: return {pyFloat(v.f), {}};
    case Kind::Func: return {"<function " + v.fn->name + ">", {}};
    default: return {repr(v), {}};
  }
}

bool equals(const Value& a, const Value& b) {
  if (a.isNumber() && b.isNumber()) {
    if (a.kind == Kind::Float || b.kind == Kind::Float) {
      const double x = a.kind == Kind::Float ? a.f : static_cast<double>(a.kind == Kind::Int ? a.i : a.b);
      const double y = b.kind == Kind::Float ? b.f : static_cast<double>(b.kind == Kind::Int ? b.i : b.b);
      return x == y;
    }
    const int64_t x = a.kind == Kind::Int ? a.i : a.b, y = b.kind == Kind::Int ? b.i : b.b;
    return x == y;
  }
  if (a.kind != b.kind || a.generator != b.generator) return false;
  if (a.generator) return a.list == b.list;
  switch (a.kind) {
    case Kind::Undefined:
    case Kind::None: return true;
    case Kind::String: return a.s->text == b.s->text;
    case Kind::List: {
      if (a.tuple != b.tuple || a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!equals((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    }
    case Kind::Dict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, x] : a.dict->items) {
        const Value* y = b.dict->find(k);
        if (y == nullptr || !equals(x, *y)) return false;
      }
      return true;
    }
    case Kind::Namespace: return a.dict == b.dict;
    case Kind::Func: return a.fn == b.fn;
    default: return false;
  }
}

int compare(const Value& a, const Value& b) {
  if (a.isUndefined()) failUndefined(a);
  if (b.isUndefined()) failUndefined(b);
  if (a.isNumber() && b.isNumber()) {
    if (a.kind == Kind::Float || b.kind == Kind::Float) {
      const double x = a.kind == Kind::Float ? a.f : static_cast<double>(a.kind == Kind::Int ? a.i : a.b);
      const double y = b.kind == Kind::Float ? b.f : static_cast<double>(b.kind == Kind::Int ? b.i : b.b);
      return x < y ? -1 : x > y ? 1 : 0;
    }
    const int64_t x = a.kind == Kind::Int ? a.i : a.b, y = b.kind == Kind::Int ? b.i : b.b;
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.kind == Kind::String && b.kind == Kind::String) {
    const int c = a.s->text.compare(b.s->text);  // UTF-8 byte order is code point order
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.kind == Kind::List && b.kind == Kind::List && a.tuple == b.tuple && !a.generator && !b.generator) {
    const size_t n = std::min(a.list->size(), b.list->size());
    for (size_t k = 0; k < n; ++k) {
      if (!equals((*a.list)[k], (*b.list)[k])) return compare((*a.list)[k], (*b.list)[k]);
    }
    return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
  }
  fail("'<' not supported between instances of '" + typeName(a) + "' and '" + typeName(b) + "'");
}

// ---- JSON ----

namespace {

void jsonString(std::string& out, const std::string& s, bool ensureAscii) {
  out += '"';
  const std::vector<size_t> cps = ensureAscii && !isAscii(s) ? codePointOffsets(s) : std::vector<size_t>{};
  size_t cpIndex = 0;
  for (size_t k = 0; k < s.size(); ++k) {
    const auto c = static_cast<unsigned char>(s[k]);
    switch (c) {
      case '"': out += "\\\""; continue;
      case '\\': out += "\\\\"; continue;
      case '\n': out += "\\n"; continue;
      case '\r': out += "\\r"; continue;
      case '\t': out += "\\t"; continue;
      case '\b': out += "\\b"; continue;
      case '\f': out += "\\f"; continue;
      default: break;
    }
    char buf[16];
    if (c < 0x20) {
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else if (c >= 0x80 && ensureAscii) {
      while (cpIndex + 1 < cps.size() && cps[cpIndex] < k) ++cpIndex;
      const size_t end = cps[cpIndex + 1];
      uint32_t cp = 0;
      const size_t len = end - k;
      cp = len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
      for (size_t m = k + 1; m < end; ++m) cp = (cp << 6) | (static_cast<unsigned char>(s[m]) & 0x3Fu);
      if (len == 1) cp = 0xFFFD;
      if (cp >= 0x10000) {
        cp -= 0x10000;
        std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
      } else {
        std::snprintf(buf, sizeof buf, "\\u%04x", cp);
      }
      out += buf;
      k = end - 1;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += '"';
}

void jsonValue(std::string& out, const Value& v, const JsonOptions& o, int level, int depth) {
  if (depth > 256) fail("tojson: nesting too deep");
  auto newline = [&out, &o](int lvl) {
    if (!o.indent) return;
    out += '\n';
    for (int k = 0; k < lvl; ++k) out += *o.indent;
  };
  switch (v.kind) {
    case Kind::None: out += "null"; return;
    case Kind::Bool: out += v.b ? "true" : "false"; return;
    case Kind::Int: out += std::to_string(v.i); return;
    case Kind::Float:
      if (std::isnan(v.f)) out += "NaN";
      else if (std::isinf(v.f)) out += v.f < 0 ? "-Infinity" : "Infinity";
      else out += pyFloat(v.f);
      return;
    case Kind::String: jsonString(out, v.s->text, o.ensureAscii); return;
    case Kind::List: {
      if (v.generator) fail("Object of type generator is not JSON serializable");
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k > 0) out += o.itemSeparator;
        newline(level + 1);
        jsonValue(out, (*v.list)[k], o, level + 1, depth + 1);
      }
      newline(level);
      out += ']';
      return;
    }
    case Kind::Dict: {
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& kv : v.dict->items) items.push_back(&kv);
      if (o.sortKeys) {
        std::stable_sort(items.begin(), items.end(), [](auto* x, auto* y) {
          return compare(keyValue(x->first), keyValue(y->first)) < 0;
        });
      }
      out += '{';
      for (size_t k = 0; k < items.size(); ++k) {
        if (k > 0) out += o.itemSeparator;
        newline(level + 1);
        const Value key = keyValue(items[k]->first);
        if (key.kind == Kind::String) jsonString(out, key.str(), o.ensureAscii);
        else if (key.kind == Kind::None) out += "\"null\"";
        else if (key.kind == Kind::Bool) out += key.b ? "\"true\"" : "\"false\"";
        else out += "\"" + toStr(key).text + "\"";
        out += o.keySeparator;
        jsonValue(out, items[k]->second, o, level + 1, depth + 1);
      }
      newline(level);
      out += '}';
      return;
    }
    default:
      fail("Object of type " + typeName(v) + " is not JSON serializable");
  }
}

}  // namespace

std::string toJson(const Value& v, const JsonOptions& o) {
  std::string out;
  jsonValue(out, v, o, 0, 0);
  return out;
}

Value fromJson(const nlohmann::ordered_json& j, bool trusted) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null: return Value::none();
    case nlohmann::ordered_json::value_t::boolean: return Value::boolean(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      const auto u = j.get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return Value::number(static_cast<double>(u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case nlohmann::ordered_json::value_t::number_float: return Value::number(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return trusted ? Value::trusted(j.get<std::string>()) : Value::plain(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      Items l;
      l.reserve(j.size());
      for (const auto& x : j) l.push_back(fromJson(x, trusted));
      return Value::makeList(std::move(l));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto d = std::make_shared<DictData>();
      d->items.reserve(j.size());
      for (const auto& [k, x] : j.items()) d->items.emplace_back(k, fromJson(x, trusted));
      return Value::makeDict(std::move(d));
    }
    default: return Value::none();
  }
}

// Encoded keys start with a byte JSON text cannot hold unescaped in a key of ours: 0x01.
std::string dictKey(const Value& key) {
  switch (key.kind) {
    case Kind::String: return key.str();
    case Kind::None: return "\x01n";
    case Kind::Bool:
    case Kind::Int: return "\x01i" + std::to_string(key.kind == Kind::Int ? key.i : key.b);
    case Kind::Float:
      if (std::isfinite(key.f) && key.f == std::floor(key.f) && std::fabs(key.f) < 9.2e18) {
        return "\x01i" + std::to_string(static_cast<int64_t>(key.f));
      }
      return "\x01f" + pyFloat(key.f);
    case Kind::List:
      if (key.tuple && !key.generator) {
        std::string out = "\x01t";
        for (const Value& x : *key.list) {
          const std::string k = dictKey(x);
          out += std::to_string(k.size()) + ":" + k;
        }
        return out;
      }
      break;
    case Kind::Undefined: failUndefined(key);
    default: break;
  }
  fail("unhashable type: '" + typeName(key) + "'");
}

Value keyValue(const std::string& key) {
  if (key.empty() || key[0] != '\x01' || key.size() < 2) return Value::plain(key);
  switch (key[1]) {
    case 'n': return Value::none();
    case 'i': return Value::integer(std::stoll(key.substr(2)));
    case 'f': return Value::number(std::strtod(key.c_str() + 2, nullptr));
    case 't': {
      Items items;
      size_t at = 2;
      while (at < key.size()) {
        const size_t colon = key.find(':', at);
        const size_t n = std::stoul(key.substr(at, colon - at));
        items.push_back(keyValue(key.substr(colon + 1, n)));
        at = colon + 1 + n;
      }
      return Value::makeList(std::move(items), true);
    }
    default: return Value::plain(key);
  }
}

bool isAscii(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

std::vector<size_t> codePointOffsets(std::string_view s) {
  std::vector<size_t> out;
  out.reserve(s.size() + 1);
  size_t k = 0;
  while (k < s.size()) {
    out.push_back(k);
    const auto c = static_cast<unsigned char>(s[k]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
    if (k + len > s.size()) len = 1;
    for (size_t m = 1; m < len; ++m) {
      if ((static_cast<unsigned char>(s[k + m]) & 0xC0) != 0x80) {
        len = 1;
        break;
      }
    }
    k += len;
  }
  out.push_back(s.size());
  return out;
}

}  // namespace cortex::model::jinja::detail
