// A tiny GGUF writer for tests: builds v2/v3 files byte by byte so tests control every field
// (including deliberately wrong ones). Not part of the library.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace cortex::model::testing {

// Appends little-endian encodings to a byte vector.
class ByteWriter {
 public:
  std::vector<uint8_t> bytes;

  template <typename T>
  void put(T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    bytes.insert(bytes.end(), b, b + sizeof(T));
  }
  void u8(uint8_t v) { put(v); }
  void u32(uint32_t v) { put(v); }
  void u64(uint64_t v) { put(v); }
  void str(std::string_view s) {
    u64(s.size());
    bytes.insert(bytes.end(), s.begin(), s.end());
  }
  size_t size() const { return bytes.size(); }
};

// Builds a GGUF file: metadata entries are written as raw (type, payload) pairs by the callers'
// lambdas via ByteWriter; tensors get offsets assigned in order with the given alignment.
class GGUFBuilder {
 public:
  explicit GGUFBuilder(uint32_t version = 3, uint64_t alignment = 32)
      : version_(version), alignment_(alignment) {}

  // One metadata entry: key, GGUF value type id, payload bytes (already encoded).
  void kvRaw(std::string_view key, uint32_t type, const std::vector<uint8_t>& payload) {
    kv_.str(key);
    kv_.u32(type);
    kv_.bytes.insert(kv_.bytes.end(), payload.begin(), payload.end());
    ++kvCount_;
  }
  template <typename T>
  void kvScalar(std::string_view key, uint32_t type, T v) {
    ByteWriter w;
    w.put(v);
    kvRaw(key, type, w.bytes);
  }
  void kvString(std::string_view key, std::string_view s) {
    ByteWriter w;
    w.str(s);
    kvRaw(key, 8, w.bytes);
  }

  // A tensor with the given ggml type id, dims (ggml order) and data bytes.
  void tensor(std::string_view name, uint32_t type, std::vector<uint64_t> dims,
              std::vector<uint8_t> data) {
    tensors_.push_back({std::string(name), type, std::move(dims), std::move(data), UINT64_MAX});
  }
  // Overrides the offset written for the last tensor (for corrupt-offset tests).
  void overrideLastOffset(uint64_t offset) { tensors_.back().offsetOverride = offset; }

  // The file bytes. Tensor data is laid out in order, each at a multiple of the alignment; the
  // file ends right after the last tensor's data (no trailing padding).
  std::vector<uint8_t> build() const {
    ByteWriter w;
    w.bytes = {'G', 'G', 'U', 'F'};
    w.u32(version_);
    w.u64(tensors_.size());
    w.u64(kvCount_);
    w.bytes.insert(w.bytes.end(), kv_.bytes.begin(), kv_.bytes.end());
    std::vector<uint64_t> offsets;
    uint64_t off = 0;
    for (const Tensor& t : tensors_) {
      off = (off + alignment_ - 1) / alignment_ * alignment_;
      offsets.push_back(off);
      off += t.data.size();
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      w.str(t.name);
      w.u32(static_cast<uint32_t>(t.dims.size()));
      for (uint64_t d : t.dims) w.u64(d);
      w.u32(t.type);
      w.u64(t.offsetOverride != UINT64_MAX ? t.offsetOverride : offsets[i]);
    }
    if (!tensors_.empty()) {
      while (w.size() % alignment_ != 0) w.u8(0);
      const size_t dataStart = w.size();
      for (size_t i = 0; i < tensors_.size(); ++i) {
        w.bytes.resize(dataStart + offsets[i], 0);
        w.bytes.insert(w.bytes.end(), tensors_[i].data.begin(), tensors_[i].data.end());
      }
    }
    return w.bytes;
  }

 private:
  struct Tensor {
    std::string name;
    uint32_t type;
    std::vector<uint64_t> dims;
    std::vector<uint8_t> data;
    uint64_t offsetOverride;
  };
  uint32_t version_;
  uint64_t alignment_;
  ByteWriter kv_;
  uint64_t kvCount_ = 0;
  std::vector<Tensor> tensors_;
};

}  // namespace cortex::model::testing
