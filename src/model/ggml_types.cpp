#include "model/ggml_types.h"

#include <array>
#include <limits>

#include "model/errors.h"

namespace cortex::model {
namespace {

struct TypeTraits {
  std::string_view name;  // empty: id never assigned
  uint32_t blockElements;  // 0: layout unknown (retired id)
  uint32_t blockBytes;
  bool supported;
};

// Indexed by GGUF type id; layouts follow ggml's type_traits.
constexpr std::array<TypeTraits, 42> kTraits = {{
    {"F32", 1, 4, true},          // 0
    {"F16", 1, 2, true},          // 1
    {"Q4_0", 32, 18, true},       // 2
    {"Q4_1", 32, 20, true},       // 3
    {"Q4_2", 0, 0, false},        // 4 retired
    {"Q4_3", 0, 0, false},        // 5 retired
    {"Q5_0", 32, 22, true},       // 6
    {"Q5_1", 32, 24, true},       // 7
    {"Q8_0", 32, 34, true},       // 8
    {"Q8_1", 32, 40, false},      // 9
    {"Q2_K", 256, 84, true},      // 10
    {"Q3_K", 256, 110, true},     // 11
    {"Q4_K", 256, 144, true},     // 12
    {"Q5_K", 256, 176, true},     // 13
    {"Q6_K", 256, 210, true},     // 14
    {"Q8_K", 256, 292, false},    // 15
    {"IQ2_XXS", 256, 66, false},  // 16
    {"IQ2_XS", 256, 74, false},   // 17
    {"IQ3_XXS", 256, 98, false},  // 18
    {"IQ1_S", 256, 50, false},    // 19
    {"IQ4_NL", 32, 18, false},    // 20
    {"IQ3_S", 256, 110, false},   // 21
    {"IQ2_S", 256, 82, false},    // 22
    {"IQ4_XS", 256, 136, false},  // 23
    {"I8", 1, 1, false},          // 24
    {"I16", 1, 2, false},         // 25
    {"I32", 1, 4, false},         // 26
    {"I64", 1, 8, false},         // 27
    {"F64", 1, 8, false},         // 28
    {"IQ1_M", 256, 56, false},    // 29
    {"BF16", 1, 2, true},         // 30
    {"Q4_0_4_4", 0, 0, false},    // 31 retired
    {"Q4_0_4_8", 0, 0, false},    // 32 retired
    {"Q4_0_8_8", 0, 0, false},    // 33 retired
    {"TQ1_0", 256, 54, false},    // 34
    {"TQ2_0", 256, 66, false},    // 35
    {"IQ4_NL_4_4", 0, 0, false},  // 36 retired
    {"IQ4_NL_4_8", 0, 0, false},  // 37 retired
    {"IQ4_NL_8_8", 0, 0, false},  // 38 retired
    {"MXFP4", 32, 17, false},     // 39
    {"NVFP4", 64, 36, false},     // 40
    {"Q1_0", 128, 18, false},     // 41
}};

const TypeTraits* traits(GGMLType type) {
  const auto id = static_cast<uint32_t>(type);
  return id < kTraits.size() ? &kTraits[id] : nullptr;
}

const TypeTraits& layoutOrThrow(GGMLType type) {
  const TypeTraits* t = traits(type);
  if (t == nullptr || t->blockElements == 0) {
    throw ModelError("tensor type " + ggmlTypeName(type) + " (id " +
                     std::to_string(static_cast<uint32_t>(type)) +
                     ") has no known block layout (retired or unknown ggml type)");
  }
  return *t;
}

}  // namespace

std::string ggmlTypeName(GGMLType type) {
  const TypeTraits* t = traits(type);
  if (t == nullptr) return "unknown type " + std::to_string(static_cast<uint32_t>(type));
  return std::string(t->name);
}

bool isKnownType(GGMLType type) { return traits(type) != nullptr; }

bool hasKnownLayout(GGMLType type) {
  const TypeTraits* t = traits(type);
  return t != nullptr && t->blockElements != 0;
}

bool isSupported(GGMLType type) {
  const TypeTraits* t = traits(type);
  return t != nullptr && t->supported;
}

std::string supportedTypeNames() {
  // note: listed in the order people meet them, not by id.
  return "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";
}

uint64_t blockElements(GGMLType type) { return layoutOrThrow(type).blockElements; }

uint64_t blockBytes(GGMLType type) { return layoutOrThrow(type).blockBytes; }

uint64_t rowBytes(GGMLType type, uint64_t nElements) {
  const TypeTraits& t = layoutOrThrow(type);
  if (nElements % t.blockElements != 0) {
    throw ModelError(std::to_string(nElements) + " elements of type " + std::string(t.name) +
                     " are not a whole number of blocks of " + std::to_string(t.blockElements));
  }
  const uint64_t nBlocks = nElements / t.blockElements;
  if (nBlocks > std::numeric_limits<uint64_t>::max() / t.blockBytes) {
    throw ModelError(std::to_string(nElements) + " elements of type " + std::string(t.name) +
                     " need more than 2^64 bytes");
  }
  return nBlocks * t.blockBytes;
}

void requireSupported(GGMLType type, std::string_view tensorName) {
  if (isSupported(type)) return;
  throw ModelError("tensor '" + std::string(tensorName) + "' has type " + ggmlTypeName(type) +
                   ", which CortexStream does not support yet (supported: " +
                   supportedTypeNames() + ")");
}

}  // namespace cortex::model
