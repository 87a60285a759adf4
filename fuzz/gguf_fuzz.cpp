// libFuzzer target for the GGUF reader: any byte string must either parse or throw ModelError —
// never crash, read out of bounds, hit undefined behaviour, or allocate without bound. When it
// parses, every accessor is exercised and every tensor's bytes are touched, so a view that points
// outside the buffer is caught by ASan.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <span>

#include "model/errors.h"
#include "model/ggml_types.h"
#include "model/gguf.h"

namespace {

using cortex::model::GGUFValue;

// Walks a value the way a consumer would; returns something derived from it so nothing is
// optimised away.
uint64_t walk(const GGUFValue& v) {
  uint64_t h = static_cast<uint64_t>(v.type());
  if (v.isArray()) {
    for (uint64_t i = 0; i < v.arraySize(); ++i) h += walk(v.at(i));
    return h;
  }
  if (const auto s = v.toString()) {
    for (const char c : *s) h += static_cast<unsigned char>(c);
  }
  if (const auto x = v.toI64()) h += static_cast<uint64_t>(*x);
  if (const auto x = v.toU64()) h += *x;
  if (const auto x = v.toF64()) h += *x == *x ? 1u : 2u;
  if (const auto x = v.toBool()) h += *x ? 1u : 0u;
  return h;
}

template <typename Fn>
uint64_t tryGet(Fn&& fn) {
  try {
    return static_cast<uint64_t>(fn());
  } catch (const cortex::model::ModelError&) {
    return 0;  // wrong types are reported, not crashes
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace cortex::model;
  try {
    const GGUFFile f = GGUFFile::fromMemory(std::span<const uint8_t>(data, size), "fuzz");
    volatile uint64_t sink = f.alignment() + f.dataOffset();
    for (const GGUFKeyValue& kv : f.metadata()) {
      sink = sink + walk(kv.value);
      const std::string& k = kv.key;
      sink = sink + tryGet([&] { return f.getU32(k); }) + tryGet([&] { return f.getI64(k); }) +
             tryGet([&] { return f.getU64(k); }) + tryGet([&] { return f.getBool(k); }) +
             tryGet([&] { return std::bit_cast<uint32_t>(f.getF32(k)); }) +
             tryGet([&] { return f.getString(k).size(); }) +
             tryGet([&] { return f.getStringArray(k).size(); }) +
             tryGet([&] { return f.getF32Array(k).size(); }) +
             tryGet([&] { return f.getI32Array(k).size(); });
      if (f.find(k) != &kv.value) __builtin_trap();
    }
    for (const GGUFTensorInfo& t : f.tensors()) {
      if (&f.tensor(t.name) != &t) __builtin_trap();
      if (t.nBytes > 0) sink = sink + t.data[0] + t.data[t.nBytes - 1];
      if (t.fileOffset + t.nBytes > f.fileSizeBytes()) __builtin_trap();
      sink = sink + tryGet([&] { return rowBytes(t.type, t.rowLength()); });
      sink = sink + tryGet([&] {
        requireSupported(t.type, t.name);
        return 1;
      });
    }
    (void)sink;
  } catch (const ModelError&) {
    // rejected with a message: the expected outcome for most inputs
  }
  return 0;
}
