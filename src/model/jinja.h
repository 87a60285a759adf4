// A small Jinja interpreter for chat templates (tokenizer.chat_template of GGUF files).
//
// It renders the subset of Jinja that chat templates use byte for byte as Python's jinja2 does
// in the environment Hugging Face transformers renders chat templates with:
// ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True) with the loopcontrols
// extension, the globals raise_exception(msg) and strftime_now(format), and a tojson filter that
// is json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
// docs/chat-templates.md lists the supported statements, expressions, filters, tests and methods.
//
// Besides the text, rendering reports which byte ranges of it the template itself wrote (literal
// text, string literals, and variables the caller marks as trusted such as bos_token): control
// tokens are recognised only there, never inside message content.
//
// Rendering is bounded: output size, loop iterations and other steps, and call depth have limits,
// and every failure (syntax, raise_exception, unknown filter, a limit) is a TemplateError whose
// message names the template line. No template makes the process crash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "model/errors.h"

namespace cortex::model::jinja {

// A template that cannot be parsed or rendered. what() reads "line N: ..." (N is 1-based in the
// template source).
class TemplateError : public ModelError {
 public:
  using ModelError::ModelError;
};

struct Limits {
  size_t maxOutputBytes = size_t{16} << 20;  // the rendered text and any one string or list
  uint64_t maxSteps = 20'000'000;            // statements, loop iterations and expressions
  int maxCallDepth = 64;                     // nested macro calls and caller() calls
};

// Byte range [begin, end) of rendered text.
struct ByteRange {
  size_t begin = 0;
  size_t end = 0;
  bool operator==(const ByteRange&) const = default;
};

struct Rendered {
  std::string text;
  // The ranges of text the template wrote itself (ascending, disjoint, not adjacent).
  std::vector<ByteRange> templateRanges;
};

class Template {
 public:
  // Parses `source`. Throws TemplateError on a syntax error (also for nesting deeper than 256).
  explicit Template(std::string_view source);

  // Renders with the members of the JSON object `context` as variables (a non-object is an
  // error). Strings held by the variables named in trustedNames count as template text.
  // Thread-safe: a Template may render on several threads at once.
  Rendered render(const nlohmann::ordered_json& context,
                  std::span<const std::string> trustedNames = {},
                  const Limits& limits = Limits{}) const;

  struct Program;

 private:
  std::shared_ptr<const Program> program_;
};

}  // namespace cortex::model::jinja
