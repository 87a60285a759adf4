// `cortexstream inspect MODEL [--json] [--max-items N]`: what a GGUF file holds — header, metadata
// (long arrays summarised) and the tensor table with totals — without loading any weights.
#include <algorithm>
#include <cstdint>
#include <iomanip>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "model/ggml_types.h"
#include "model/gguf.h"
#include "model/transformer.h"

namespace cortex::cli {
namespace {

using model::GGUFFile;
using model::GGUFTensorInfo;
using model::GGUFValue;
using model::GGUFValueType;
using Json = nlohmann::ordered_json;

struct InspectOptions {
  std::string path;
  bool json = false;
  uint64_t maxItems = 8;  // array elements shown; 0 = all
};

uint64_t shownItems(const GGUFValue& v, uint64_t maxItems) {
  return maxItems == 0 ? v.arraySize() : std::min(v.arraySize(), maxItems);
}

Json valueToJson(const GGUFValue& v, uint64_t maxItems) {
  Json j;
  j["type"] = model::valueTypeName(v.type());
  if (v.isArray()) {
    j["element_type"] = model::valueTypeName(v.arrayType());
    j["count"] = v.arraySize();
    Json items = Json::array();
    const uint64_t n = shownItems(v, maxItems);
    for (uint64_t i = 0; i < n; ++i) {
      const GGUFValue e = v.at(i);
      items.push_back(e.isArray() ? valueToJson(e, maxItems) : valueToJson(e, maxItems)["value"]);
    }
    j["items"] = std::move(items);
    j["truncated"] = n < v.arraySize();
  } else if (const auto s = v.toString()) {
    j["value"] = std::string(*s);
  } else if (const auto b = v.toBool()) {
    j["value"] = *b;
  } else if (v.isFloat()) {
    j["value"] = *v.toF64();
  } else if (v.type() == GGUFValueType::UINT64) {
    j["value"] = *v.toU64();
  } else {
    j["value"] = *v.toI64();
  }
  return j;
}

// A string for a terminal: control bytes escaped, long ones cut with their length noted.
std::string quoted(std::string_view s, size_t maxChars) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < maxChars; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      std::ostringstream hex;
      hex << "\\x" << std::hex << std::setw(2) << std::setfill('0') << static_cast<int>(c);
      out += hex.str();
    } else {
      out += static_cast<char>(c);
    }
  }
  out += '"';
  if (s.size() > maxChars) out += "... (" + std::to_string(s.size()) + " bytes)";
  return out;
}

std::string valueToText(const GGUFValue& v, uint64_t maxItems) {
  if (v.isArray()) {
    std::string out = "[";
    const uint64_t n = shownItems(v, maxItems);
    for (uint64_t i = 0; i < n; ++i) {
      if (i > 0) out += ", ";
      out += valueToText(v.at(i), maxItems);
    }
    if (n < v.arraySize()) out += ", ... " + std::to_string(v.arraySize() - n) + " more";
    return out + "]";
  }
  if (const auto s = v.toString()) return quoted(*s, 60);
  if (const auto b = v.toBool()) return *b ? "true" : "false";
  if (v.isFloat()) {
    std::ostringstream os;
    os << std::setprecision(v.type() == GGUFValueType::FLOAT32 ? 9 : 17) << *v.toF64();
    return os.str();
  }
  if (v.type() == GGUFValueType::UINT64) return std::to_string(*v.toU64());
  return std::to_string(*v.toI64());
}

std::string typeText(const GGUFValue& v) {
  if (!v.isArray()) return model::valueTypeName(v.type());
  return "array[" + model::valueTypeName(v.arrayType()) + "] x" + std::to_string(v.arraySize());
}

std::string shapeText(const GGUFTensorInfo& t) {
  std::string out = "[";
  for (size_t i = 0; i < t.dims.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(t.dims[i]);
  }
  return out + "]";
}

struct Totals {
  uint64_t elements = 0;
  uint64_t bytes = 0;
  struct PerType {
    uint64_t tensors = 0;
    uint64_t bytes = 0;
  };
  std::map<std::string, PerType> byType;
  std::vector<std::string> unsupported;  // tensor names
};

Totals totalsOf(const GGUFFile& f) {
  Totals t;
  for (const GGUFTensorInfo& info : f.tensors()) {
    t.elements += info.nElements;
    t.bytes += info.nBytes;
    Totals::PerType& p = t.byType[model::ggmlTypeName(info.type)];
    ++p.tensors;
    p.bytes += info.nBytes;
    if (!model::isSupported(info.type)) t.unsupported.push_back(info.name);
  }
  return t;
}

// general.architecture, or "" when the file does not say.
std::string architectureOf(const GGUFFile& f) {
  const model::GGUFValue* v = f.find("general.architecture");
  const std::optional<std::string_view> name = v != nullptr ? v->toString() : std::nullopt;
  return name ? std::string(*name) : std::string();
}

void printJson(const GGUFFile& f, const InspectOptions& o) {
  Json j;
  j["file"] = f.path();
  j["version"] = f.version();
  j["file_size"] = f.fileSizeBytes();
  j["alignment"] = f.alignment();
  j["data_offset"] = f.dataOffset();
  Json meta = Json::object();
  for (const model::GGUFKeyValue& kv : f.metadata()) meta[kv.key] = valueToJson(kv.value, o.maxItems);
  j["metadata"] = std::move(meta);
  const std::string arch = architectureOf(f);
  j["architecture"] = {{"name", arch}, {"supported", model::parseArchitecture(arch).has_value()}};
  Json tensors = Json::array();
  for (const GGUFTensorInfo& t : f.tensors()) {
    tensors.push_back({{"name", t.name},
                       {"type", model::ggmlTypeName(t.type)},
                       {"type_id", static_cast<uint32_t>(t.type)},
                       {"shape", t.dims},
                       {"elements", t.nElements},
                       {"offset", t.offset},
                       {"bytes", t.nBytes},
                       {"supported", model::isSupported(t.type)}});
  }
  j["tensors"] = std::move(tensors);
  const Totals totals = totalsOf(f);
  Json byType = Json::object();
  for (const auto& [name, p] : totals.byType) {
    byType[name] = {{"tensors", p.tensors}, {"bytes", p.bytes}};
  }
  j["totals"] = {{"tensors", f.tensors().size()},
                 {"elements", totals.elements},
                 {"bytes", totals.bytes},
                 {"by_type", std::move(byType)}};
  j["unsupported_tensors"] = totals.unsupported;
  // note: GGUF strings need not be valid UTF-8; replace bad bytes rather than fail the dump.
  std::cout << j.dump(2, ' ', false, Json::error_handler_t::replace) << "\n";
}

void printText(const GGUFFile& f, const InspectOptions& o) {
  std::ostream& out = std::cout;
  out << "file:      " << f.path() << "\n"
      << "format:    GGUF v" << f.version() << ", " << f.fileSizeBytes() << " bytes, alignment "
      << f.alignment() << ", tensor data from byte " << f.dataOffset() << "\n\n";

  size_t keyWidth = 3;
  for (const model::GGUFKeyValue& kv : f.metadata()) keyWidth = std::max(keyWidth, kv.key.size());
  out << "metadata (" << f.metadata().size() << " entries):\n";
  for (const model::GGUFKeyValue& kv : f.metadata()) {
    out << "  " << std::left << std::setw(static_cast<int>(keyWidth)) << kv.key << "  "
        << std::setw(22) << typeText(kv.value) << "  " << valueToText(kv.value, o.maxItems)
        << "\n";
  }

  size_t nameWidth = 4;
  for (const GGUFTensorInfo& t : f.tensors()) nameWidth = std::max(nameWidth, t.name.size());
  out << "\ntensors (" << f.tensors().size() << "):\n";
  out << "  " << std::left << std::setw(static_cast<int>(nameWidth)) << "name" << "  "
      << std::setw(8) << "type" << "  " << std::setw(20) << "shape" << std::right
      << std::setw(14) << "bytes" << "\n";
  for (const GGUFTensorInfo& t : f.tensors()) {
    out << "  " << std::left << std::setw(static_cast<int>(nameWidth)) << t.name << "  "
        << std::setw(8) << model::ggmlTypeName(t.type) << "  " << std::setw(20) << shapeText(t)
        << std::right << std::setw(14) << t.nBytes
        << (model::isSupported(t.type) ? "" : "  (unsupported)") << "\n";
  }

  const Totals totals = totalsOf(f);
  out << "\ntotals: " << f.tensors().size() << " tensors, " << totals.elements << " elements, "
      << totals.bytes << " bytes (" << std::fixed << std::setprecision(1)
      << static_cast<double>(totals.bytes) / (1024.0 * 1024.0) << " MiB)\n";
  for (const auto& [name, p] : totals.byType) {
    out << "  " << std::left << std::setw(8) << name << std::right << std::setw(6) << p.tensors
        << " tensors " << std::setw(14) << p.bytes << " bytes\n";
  }
  const std::string arch = architectureOf(f);
  if (model::parseArchitecture(arch)) {
    out << "architecture '" << arch << "' is supported\n";
  } else {
    out << "architecture '" << arch << "' is not supported yet (supported: "
        << model::supportedArchitectureNames() << ")\n";
  }
  if (totals.unsupported.empty()) {
    out << "all tensor types are supported by CortexStream\n";
  } else {
    out << totals.unsupported.size() << " tensors have types CortexStream does not support yet "
        << "(supported: " << model::supportedTypeNames() << "), e.g. '"
        << totals.unsupported.front() << "'\n";
  }
}

}  // namespace

void registerInspectCommand(CLI::App& app) {
  auto opts = std::make_shared<InspectOptions>();
  CLI::App* cmd = app.add_subcommand("inspect", "Show a GGUF file's metadata and tensor table");
  cmd->add_option("model", opts->path, "Path to a .gguf file")->required();
  cmd->add_flag("--json", opts->json, "Print JSON instead of text");
  cmd->add_option("--max-items", opts->maxItems,
                  "Array elements shown per metadata array (0 = all)")
      ->capture_default_str();
  cmd->callback([opts] {
    const GGUFFile f = GGUFFile::open(opts->path);
    if (opts->json) {
      printJson(f, *opts);
    } else {
      printText(f, *opts);
    }
  });
}

}  // namespace cortex::cli
