// Internals of the Jinja interpreter (jinja.h): values, the syntax tree, and the helpers the
// parser (jinja_parse.cpp) and the evaluator (jinja_eval.cpp, jinja_value.cpp) share.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "model/jinja.h"

namespace cortex::model::jinja::detail {

// An error without its line yet; the evaluator adds the line of the innermost expression.
struct Failure {
  std::string message;
  int line = 0;
};
[[noreturn]] void fail(std::string message);

// A string and which of its byte ranges the template wrote (sorted, disjoint).
struct Str {
  std::string text;
  std::vector<ByteRange> trusted;
};

// Builds a Str piece by piece, keeping provenance and a size limit.
class StrBuilder {
 public:
  explicit StrBuilder(size_t limit) : limit_(limit) {}
  void append(const Str& s);
  void append(const Str& s, size_t begin, size_t end);  // bytes [begin, end) of s
  void appendPlain(std::string_view text);               // text from data
  void appendTrusted(std::string_view text);             // text the template wrote
  size_t size() const { return out_.text.size(); }
  Str take() { return std::move(out_); }

 private:
  void grow(size_t n);
  void mark(size_t begin, size_t end);
  Str out_;
  size_t limit_;
};

struct Value;
struct DictData;
struct Callable;
class Interp;
using Items = std::vector<Value>;

enum class Kind : uint8_t { Undefined, None, Bool, Int, Float, String, List, Dict, Namespace, Func };

struct Value {
  Kind kind = Kind::Undefined;
  bool b = false;
  bool tuple = false;  // a List written as a tuple (repr uses parentheses)
  bool markup = false;     // a String marked safe (markupsafe.Markup): `+` escapes the other side
  bool generator = false;  // a List standing for a Python generator (map, select, ...): no len
  uint16_t depth = 0;  // List, Dict: how deeply values nest inside (bounded, see kMaxValueDepth)
  int64_t i = 0;
  double f = 0;
  std::shared_ptr<const Str> s;  // String; for Undefined, the message using it raises
  std::shared_ptr<const Items> list;
  std::shared_ptr<DictData> dict;  // Dict (never changed once built) or Namespace
  std::shared_ptr<const Callable> fn;

  static Value undefined(std::string hint);
  static Value none();
  static Value boolean(bool v);
  static Value integer(int64_t v);
  static Value number(double v);
  static Value string(Str v);
  static Value plain(std::string v);    // an untrusted string
  static Value trusted(std::string v);  // a string the template wrote
  static Value makeList(Items v, bool tuple = false);
  static Value makeGenerator(Items v);  // what jinja2 returns as a generator
  static Value makeDict(std::shared_ptr<DictData> d);
  static Value function(std::string name, std::function<Value(Interp&, struct Args&)> call);

  bool isUndefined() const { return kind == Kind::Undefined; }
  bool isString() const { return kind == Kind::String; }
  bool isNumber() const { return kind == Kind::Int || kind == Kind::Float || kind == Kind::Bool; }
  bool isMapping() const { return kind == Kind::Dict; }
  const std::string& str() const { return s->text; }
};

// Values nest at most this deep (lists, dicts, namespaces), so that walking them cannot exhaust
// the stack.
constexpr uint16_t kMaxValueDepth = 500;
uint16_t depthOf(const Value& v);

struct DictData {
  std::vector<std::pair<std::string, Value>> items;
  uint16_t depth = 1;  // a Namespace's nesting depth (it grows as attributes are assigned)
  const Value* find(std::string_view key) const;
  void set(std::string key, Value v);
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  // Argument `index` / keyword `name`, or nullopt; marks the keyword used.
  std::optional<Value> get(size_t index, std::string_view name) const;
};

struct Callable {
  std::string name;
  std::function<Value(Interp&, Args&)> call;
};

// ---- value helpers (jinja_value.cpp) ----
bool truthy(const Value& v);
std::string typeName(const Value& v);  // Python's: 'str', 'dict', 'NoneType', ...
[[noreturn]] void failUndefined(const Value& v);
// str(v) as Python prints it; strings keep their provenance, other values are untrusted.
Str toStr(const Value& v);
std::string repr(const Value& v);
std::string pyFloat(double d);
bool equals(const Value& a, const Value& b);
int compare(const Value& a, const Value& b);  // fails for unorderable values
struct JsonOptions {
  std::optional<std::string> indent;  // nullopt: one line
  std::string itemSeparator = ", ";
  std::string keySeparator = ": ";
  bool sortKeys = false;
  bool ensureAscii = false;
};
std::string toJson(const Value& v, const JsonOptions& o);
Value fromJson(const nlohmann::ordered_json& j, bool trusted);
// Dict keys are strings; other hashable keys (int, float, bool, None) are stored encoded.
std::string dictKey(const Value& key);  // fails for unhashable values
Value keyValue(const std::string& key);
// UTF-8 code points: byte offsets of each code point start, plus the end.
std::vector<size_t> codePointOffsets(std::string_view s);
bool isAscii(std::string_view s);

// ---- syntax tree ----
struct Expr;
using ExprP = std::unique_ptr<Expr>;
enum class EK : uint8_t {
  Literal, Name, List, Tuple, Dict, Attr, Item, Slice, Call, Filter, Test, Not, Neg, Pos,
  Binary, Compare, And, Or, Cond, Concat
};

struct Expr {
  EK kind = EK::Literal;
  int line = 0;
  int depth = 1;     // height of this subtree (bounded by the parser)
  std::string name;  // Name; Attr; Filter, Test; Binary operator
  Value literal;
  ExprP a, b, c;               // operands; Slice: a[b:c:items[0]]; Cond: b if a else c
  std::vector<ExprP> items;    // List/Tuple/Dict (key, value, ...)/call and filter arguments
  std::vector<std::pair<std::string, ExprP>> kwargs;
  std::vector<std::string> ops;  // Compare: operator per operand in items
  bool negated = false;          // Test: `is not`
};

struct Stmt;
using Body = std::vector<std::unique_ptr<Stmt>>;
enum class SK : uint8_t {
  Text, Output, If, For, Set, SetBlock, Macro, CallBlock, FilterBlock, Break, Continue, Block
};

struct Stmt {
  SK kind = SK::Text;
  int line = 0;
  std::string text;  // Text
  ExprP expr;        // Output, For iterable, Set value, CallBlock call
  ExprP cond;        // For `if` filter
  std::vector<std::pair<ExprP, Body>> branches;  // If (and elif)
  Body body, elseBody;
  std::vector<std::string> targets;  // For / Set names (several: unpacking)
  std::string attr;                  // Set `ns.attr`: targets[0] is ns
  std::string name;                  // Macro
  std::vector<std::pair<std::string, ExprP>> params;  // Macro, CallBlock caller(...)
  std::vector<ExprP> filters;  // SetBlock, FilterBlock: Filter nodes applied in order (a unset)
};

Body parseTemplate(std::string_view source);
bool isKnownFilter(std::string_view name);
bool isKnownTest(std::string_view name);

}  // namespace cortex::model::jinja::detail

namespace cortex::model::jinja {
struct Template::Program {
  detail::Body body;
};
}  // namespace cortex::model::jinja
