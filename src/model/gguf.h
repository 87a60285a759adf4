// GGUF reader: the metadata and tensor table of a GGUF file (versions 2 and 3), with tensor data
// read in place from a read-only memory mapping. Every count, length and offset in the file is
// checked against the file size before use, so a truncated or corrupt file gives a ModelError that
// says what was wrong and at which byte, never an out-of-bounds read.
//
// Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the
// metadata key/value pairs, the tensor infos, padding to `general.alignment` (default 32), then the
// tensor data; each tensor's offset is relative to the start of that data section.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "model/errors.h"
#include "model/ggml_types.h"

namespace cortex::model {

// Metadata value types as GGUF numbers them.
enum class GGUFValueType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};

// Lower-case name ("uint32", "float32", "string", "array"), or "unknown(<id>)".
std::string valueTypeName(GGUFValueType type);

// One metadata value: a scalar, a string, or an array of values of one type (arrays may nest).
// Strings and array elements are views into the GGUFFile's bytes: a GGUFValue (and every
// string_view it returns) is valid only while the GGUFFile it came from is alive.
class GGUFValue {
 public:
  GGUFValue() = default;

  GGUFValueType type() const noexcept { return type_; }
  bool isArray() const noexcept { return type_ == GGUFValueType::ARRAY; }
  bool isString() const noexcept { return type_ == GGUFValueType::STRING; }
  // True for the eight integer types (not bool).
  bool isInteger() const noexcept;
  // True for FLOAT32 and FLOAT64.
  bool isFloat() const noexcept;

  // The integer value if this is an integer that fits in the result type, else nullopt.
  std::optional<int64_t> toI64() const noexcept;
  std::optional<uint64_t> toU64() const noexcept;
  // The value as a double for any integer or float type (large 64-bit integers round), else
  // nullopt.
  std::optional<double> toF64() const noexcept;
  // The bool value, or nullopt unless the type is BOOL. Any non-zero byte reads as true.
  std::optional<bool> toBool() const noexcept;
  // The string bytes (not necessarily UTF-8), or nullopt unless the type is STRING.
  std::optional<std::string_view> toString() const noexcept;

  // For arrays: the element type and the number of elements (0 and UINT8 for non-arrays).
  GGUFValueType arrayType() const noexcept { return elemType_; }
  uint64_t arraySize() const noexcept { return count_; }
  // Element i of an array (0 <= i < arraySize()); throws ModelError when this is not an array or
  // i is out of range. Cheap: elements are decoded on access, nested arrays are shared.
  GGUFValue at(uint64_t i) const;

 private:
  friend class GGUFParser;

  GGUFValueType type_ = GGUFValueType::UINT8;
  // Scalars: the raw little-endian bytes (up to 8), decoded on access.
  uint64_t scalarBits_ = 0;
  std::string_view string_;
  // Arrays.
  GGUFValueType elemType_ = GGUFValueType::UINT8;
  uint64_t count_ = 0;
  const uint8_t* fixedElems_ = nullptr;  // fixed-size elements, count_ * size, in the file bytes
  std::shared_ptr<const std::vector<std::string_view>> stringElems_;
  std::shared_ptr<const std::vector<GGUFValue>> arrayElems_;
};

// One metadata entry, in file order.
struct GGUFKeyValue {
  std::string key;
  GGUFValue value;
};

// One tensor of the file. dims are in ggml order: dims[0] is the row length (the contiguous
// dimension), so a [rows x cols] matrix has dims {cols, rows}.
struct GGUFTensorInfo {
  std::string name;
  GGMLType type = GGMLType::F32;
  std::vector<uint64_t> dims;  // 0 to 4 entries (0: a scalar)
  uint64_t nElements = 0;      // product of dims (1 for a scalar)
  uint64_t offset = 0;         // bytes from the start of the data section (a multiple of alignment)
  uint64_t fileOffset = 0;     // bytes from the start of the file
  uint64_t nBytes = 0;         // bytes the data occupies (rowBytes(type, dims[0]) * rows)
  // Into the GGUFFile's bytes, valid while the file lives; aligned to alignment() bytes when the
  // file was opened from disk (the mapping is page-aligned); fromMemory() copies guarantee only
  // min(alignment(), 16).
  const uint8_t* data = nullptr;

  // Elements per row (dims[0]) and number of rows (product of the other dims).
  uint64_t rowLength() const noexcept { return dims.empty() ? 1 : dims[0]; }
  uint64_t nRows() const noexcept { return rowLength() == 0 ? 0 : nElements / rowLength(); }
  std::span<const uint8_t> bytes() const noexcept { return {data, static_cast<size_t>(nBytes)}; }
};

// A parsed GGUF file. Owns its bytes (a read-only mapping of the file, or a copy of a buffer) and
// unmaps them on destruction; movable, not copyable. Moving keeps every view and data pointer
// valid. Read-only after construction, so concurrent readers need no locking.
class GGUFFile {
 public:
  // Maps and parses the file at `path`. Throws ModelError naming the path when the file cannot be
  // opened or mapped, or is not a valid GGUF v2/v3 file (see the checks in the file comment).
  // Tensor types that are known but unsupported are accepted here (so they can be inspected);
  // call requireSupported() before computing with a tensor.
  static GGUFFile open(const std::string& path);

  // Parses a copy of `bytes`; `sourceName` stands in for the path in error messages. Same checks
  // and failures as open(). Used by tests and the fuzzer.
  static GGUFFile fromMemory(std::span<const uint8_t> bytes,
                             std::string sourceName = "<memory>");

  GGUFFile(GGUFFile&&) noexcept;
  GGUFFile& operator=(GGUFFile&&) noexcept;
  GGUFFile(const GGUFFile&) = delete;
  GGUFFile& operator=(const GGUFFile&) = delete;
  ~GGUFFile();

  // The path given to open() (or the sourceName given to fromMemory()).
  const std::string& path() const noexcept { return path_; }
  uint32_t version() const noexcept { return version_; }
  uint64_t fileSizeBytes() const noexcept { return size_; }
  // general.alignment, or 32 when absent; a power of two.
  uint64_t alignment() const noexcept { return alignment_; }
  // Byte offset of the data section (end of the tensor infos, rounded up to alignment()).
  uint64_t dataOffset() const noexcept { return dataOffset_; }

  // All metadata entries in file order.
  const std::vector<GGUFKeyValue>& metadata() const noexcept { return metadata_; }
  // The value under `key`, or nullptr when absent. The pointer lives as long as this file.
  const GGUFValue* find(std::string_view key) const;
  bool has(std::string_view key) const { return find(key) != nullptr; }

  // Typed getters. Each throws ModelError naming the file and key when the key is missing or the
  // value cannot be represented in the requested type without loss of range:
  // getString: STRING values only; returns a copy of the bytes.
  std::string getString(std::string_view key) const;
  // getU32 / getU64 / getI64: any integer type whose value fits the result (negative values fail
  // for the unsigned getters).
  uint32_t getU32(std::string_view key) const;
  uint64_t getU64(std::string_view key) const;
  int64_t getI64(std::string_view key) const;
  // getF32: FLOAT32, FLOAT64 (rounded to float; finite values beyond float range fail) or any
  // integer type.
  float getF32(std::string_view key) const;
  // getBool: BOOL values only.
  bool getBool(std::string_view key) const;
  // Arrays: getStringArray needs an array of STRING; getF32Array an array of any float or integer
  // type (each converted as getF32 does); getI32Array an array of any integer type whose every
  // element fits in int32.
  std::vector<std::string> getStringArray(std::string_view key) const;
  std::vector<float> getF32Array(std::string_view key) const;
  std::vector<int32_t> getI32Array(std::string_view key) const;

  // All tensors in file order.
  const std::vector<GGUFTensorInfo>& tensors() const noexcept { return tensors_; }
  // The tensor named `name`, or nullptr when absent. The pointer lives as long as this file.
  const GGUFTensorInfo* findTensor(std::string_view name) const;
  // The tensor named `name`; throws ModelError naming the tensor and the file when absent.
  const GGUFTensorInfo& tensor(std::string_view name) const;

 private:
  friend class GGUFParser;
  struct Storage;

  GGUFFile();
  const GGUFValue& require(std::string_view key) const;
  [[noreturn]] void throwWrongType(std::string_view key, const GGUFValue& v,
                                   std::string_view wanted) const;

  std::unique_ptr<Storage> storage_;  // the bytes; heap-held so moves keep pointers valid
  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t dataOffset_ = 0;
  std::vector<GGUFKeyValue> metadata_;
  // note: the index keys view the key/name bytes inside the file, which never move.
  std::unordered_map<std::string_view, size_t> metadataIndex_;
  std::vector<GGUFTensorInfo> tensors_;
  std::unordered_map<std::string_view, size_t> tensorIndex_;
};

}  // namespace cortex::model
