#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <unordered_set>
#include <utility>

namespace cortex::model {

static_assert(std::endian::native == std::endian::little,
              "the GGUF reader decodes little-endian values in place");

namespace {

constexpr uint32_t kMaxDims = 4;         // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 8;        // nesting beyond this is treated as corrupt
// Smallest encodings, used to reject counts that cannot fit in the bytes that remain.
constexpr uint64_t kMinKeyValueBytes = 8 + 4 + 1;     // empty key, type, one-byte value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 4 + 8;  // empty name, n_dims 0, type, offset

bool isValidValueType(uint32_t t) { return t <= static_cast<uint32_t>(GGUFValueType::FLOAT64); }

// Bytes of one element of a fixed-size type; 0 for STRING and ARRAY.
uint64_t fixedSize(GGUFValueType t) {
  switch (t) {
    case GGUFValueType::UINT8:
    case GGUFValueType::INT8:
    case GGUFValueType::BOOL: return 1;
    case GGUFValueType::UINT16:
    case GGUFValueType::INT16: return 2;
    case GGUFValueType::UINT32:
    case GGUFValueType::INT32:
    case GGUFValueType::FLOAT32: return 4;
    case GGUFValueType::UINT64:
    case GGUFValueType::INT64:
    case GGUFValueType::FLOAT64: return 8;
    case GGUFValueType::STRING:
    case GGUFValueType::ARRAY: return 0;
  }
  return 0;
}

// A key or name for an error message: non-printable bytes escaped, long ones cut.
std::string printable(std::string_view s) {
  constexpr size_t kMax = 80;
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  if (s.size() > kMax) out += "...";
  return out;
}

std::string str(uint64_t v) { return std::to_string(v); }

// Reads little-endian values from [base, base + size), checking each read against the end.
class Cursor {
 public:
  Cursor(const uint8_t* base, uint64_t size) : base_(base), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  // Returns a pointer to the next n bytes and moves past them; throws if fewer remain.
  const uint8_t* take(uint64_t n, std::string_view what) {
    if (n > remaining()) {
      throw ModelError("truncated at byte " + str(pos_) + ": " + std::string(what) + " needs " +
                       str(n) + " bytes but only " + str(remaining()) + " remain");
    }
    const uint8_t* p = base_ + pos_;
    pos_ += n;
    return p;
  }

  uint32_t u32(std::string_view what) {
    uint32_t v;
    std::memcpy(&v, take(4, what), 4);
    return v;
  }

  uint64_t u64(std::string_view what) {
    uint64_t v;
    std::memcpy(&v, take(8, what), 8);
    return v;
  }

  // A GGUF string: u64 byte length, then the bytes (no terminator).
  std::string_view string(std::string_view what) {
    const uint64_t at = pos_;
    const uint64_t len = u64(what);
    if (len > remaining()) {
      throw ModelError("at byte " + str(at) + ": " + std::string(what) + " claims " + str(len) +
                       " bytes but only " + str(remaining()) + " remain in the file");
    }
    const uint8_t* p = take(len, what);
    return {reinterpret_cast<const char*>(p), static_cast<size_t>(len)};
  }

 private:
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

bool mulOverflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

// d as a float, or nullopt when it is finite but beyond float's range (converting it would be
// undefined behaviour). NaN and infinities carry over.
std::optional<float> toFloat(double d) {
  if (std::isfinite(d) && std::fabs(d) > static_cast<double>(std::numeric_limits<float>::max())) {
    return std::nullopt;
  }
  return static_cast<float>(d);
}

}  // namespace

// ---- the bytes ---------------------------------------------------------------------------------

struct GGUFFile::Storage {
  void* mapped = nullptr;  // from mmap, or null
  size_t mappedBytes = 0;
  std::vector<uint8_t> owned;  // used by fromMemory

  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (mapped != nullptr) ::munmap(mapped, mappedBytes);
  }
};

GGUFFile::GGUFFile() = default;
GGUFFile::GGUFFile(GGUFFile&&) noexcept = default;
GGUFFile& GGUFFile::operator=(GGUFFile&&) noexcept = default;
GGUFFile::~GGUFFile() = default;

// ---- values --------------------------------------------------------------------------------------

std::string valueTypeName(GGUFValueType type) {
  switch (type) {
    case GGUFValueType::UINT8: return "uint8";
    case GGUFValueType::INT8: return "int8";
    case GGUFValueType::UINT16: return "uint16";
    case GGUFValueType::INT16: return "int16";
    case GGUFValueType::UINT32: return "uint32";
    case GGUFValueType::INT32: return "int32";
    case GGUFValueType::FLOAT32: return "float32";
    case GGUFValueType::BOOL: return "bool";
    case GGUFValueType::STRING: return "string";
    case GGUFValueType::ARRAY: return "array";
    case GGUFValueType::UINT64: return "uint64";
    case GGUFValueType::INT64: return "int64";
    case GGUFValueType::FLOAT64: return "float64";
  }
  return "unknown(" + std::to_string(static_cast<uint32_t>(type)) + ")";
}

namespace {
template <typename T>
T scalarAs(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));  // the raw bytes sit at the start of `bits`
  return v;
}
}  // namespace

bool GGUFValue::isInteger() const noexcept {
  switch (type_) {
    case GGUFValueType::UINT8:
    case GGUFValueType::INT8:
    case GGUFValueType::UINT16:
    case GGUFValueType::INT16:
    case GGUFValueType::UINT32:
    case GGUFValueType::INT32:
    case GGUFValueType::UINT64:
    case GGUFValueType::INT64: return true;
    default: return false;
  }
}

bool GGUFValue::isFloat() const noexcept {
  return type_ == GGUFValueType::FLOAT32 || type_ == GGUFValueType::FLOAT64;
}

std::optional<int64_t> GGUFValue::toI64() const noexcept {
  switch (type_) {
    case GGUFValueType::UINT8: return scalarAs<uint8_t>(scalarBits_);
    case GGUFValueType::INT8: return scalarAs<int8_t>(scalarBits_);
    case GGUFValueType::UINT16: return scalarAs<uint16_t>(scalarBits_);
    case GGUFValueType::INT16: return scalarAs<int16_t>(scalarBits_);
    case GGUFValueType::UINT32: return scalarAs<uint32_t>(scalarBits_);
    case GGUFValueType::INT32: return scalarAs<int32_t>(scalarBits_);
    case GGUFValueType::INT64: return scalarAs<int64_t>(scalarBits_);
    case GGUFValueType::UINT64: {
      const auto v = scalarAs<uint64_t>(scalarBits_);
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
      return static_cast<int64_t>(v);
    }
    default: return std::nullopt;
  }
}

std::optional<uint64_t> GGUFValue::toU64() const noexcept {
  if (type_ == GGUFValueType::UINT64) return scalarAs<uint64_t>(scalarBits_);
  const std::optional<int64_t> v = toI64();
  if (!v || *v < 0) return std::nullopt;
  return static_cast<uint64_t>(*v);
}

std::optional<double> GGUFValue::toF64() const noexcept {
  if (type_ == GGUFValueType::FLOAT32) return scalarAs<float>(scalarBits_);
  if (type_ == GGUFValueType::FLOAT64) return scalarAs<double>(scalarBits_);
  if (type_ == GGUFValueType::UINT64) return static_cast<double>(scalarAs<uint64_t>(scalarBits_));
  if (const std::optional<int64_t> v = toI64()) return static_cast<double>(*v);
  return std::nullopt;
}

std::optional<bool> GGUFValue::toBool() const noexcept {
  if (type_ != GGUFValueType::BOOL) return std::nullopt;
  return scalarAs<uint8_t>(scalarBits_) != 0;
}

std::optional<std::string_view> GGUFValue::toString() const noexcept {
  if (type_ != GGUFValueType::STRING) return std::nullopt;
  return string_;
}

GGUFValue GGUFValue::at(uint64_t i) const {
  if (type_ != GGUFValueType::ARRAY) {
    throw ModelError("GGUF value of type " + valueTypeName(type_) + " is not an array");
  }
  if (i >= count_) {
    throw ModelError("index " + str(i) + " is out of range for an array of " + str(count_) +
                     " elements");
  }
  if (elemType_ == GGUFValueType::STRING) {
    GGUFValue v;
    v.type_ = GGUFValueType::STRING;
    v.string_ = (*stringElems_)[static_cast<size_t>(i)];
    return v;
  }
  if (elemType_ == GGUFValueType::ARRAY) return (*arrayElems_)[static_cast<size_t>(i)];
  GGUFValue v;
  v.type_ = elemType_;
  const uint64_t size = fixedSize(elemType_);
  std::memcpy(&v.scalarBits_, fixedElems_ + i * size, static_cast<size_t>(size));
  return v;
}

// ---- parsing -------------------------------------------------------------------------------------

class GGUFParser {
 public:
  explicit GGUFParser(GGUFFile& f) : f_(f), c_(f.base_, f.size_) {}

  void parse() {
    try {
      parseHeaderAndMetadata();
      parseTensorInfos();
    } catch (const ModelError& e) {
      throw ModelError(f_.path_ + ": " + e.what());
    }
  }

 private:
  void parseHeaderAndMetadata() {
    if (f_.size_ < 4 || std::memcmp(f_.base_, "GGUF", 4) != 0) {
      if (f_.size_ == 0) throw ModelError("the file is empty (0 bytes), not a GGUF model");
      throw ModelError("not a GGUF file: it does not start with the magic bytes \"GGUF\"");
    }
    c_.take(4, "magic");
    f_.version_ = c_.u32("the version");
    if (f_.version_ != 2 && f_.version_ != 3) {
      if (f_.version_ == 1) {
        throw ModelError("GGUF version 1 is not supported (only 2 and 3); re-convert the model "
                         "with a current llama.cpp");
      }
      if (__builtin_bswap32(f_.version_) == 2 || __builtin_bswap32(f_.version_) == 3) {
        throw ModelError("this is a big-endian GGUF file; only little-endian files are supported");
      }
      throw ModelError("unsupported GGUF version " + str(f_.version_) + " (supported: 2 and 3)");
    }
    const uint64_t tensorCount = c_.u64("the tensor count");
    const uint64_t kvCount = c_.u64("the metadata count");
    // note: checked before anything is reserved, so absurd counts cannot allocate.
    if (tensorCount > c_.remaining() / kMinTensorInfoBytes ||
        kvCount > (c_.remaining() - tensorCount * kMinTensorInfoBytes) / kMinKeyValueBytes) {
      const bool fits = tensorCount <= c_.remaining() && kvCount <= c_.remaining();
      throw ModelError("tensor count " + str(tensorCount) + " and metadata count " + str(kvCount) +
                       " need at least " +
                       (fits ? str(tensorCount * kMinTensorInfoBytes + kvCount * kMinKeyValueBytes)
                             : std::string("2^64")) +
                       " bytes but only " + str(c_.remaining()) +
                       " remain after the header (file truncated or counts corrupt)");
    }
    tensorCount_ = tensorCount;

    f_.metadata_.reserve(static_cast<size_t>(kvCount));
    f_.metadataIndex_.reserve(static_cast<size_t>(kvCount));
    for (uint64_t i = 0; i < kvCount; ++i) {
      const uint64_t at = c_.pos();
      try {
        const std::string_view key = c_.string("the key");
        const uint32_t type = c_.u32("the value type");
        GGUFValue value = parseValue(type, 0);
        if (!f_.metadataIndex_.emplace(key, f_.metadata_.size()).second) {
          throw ModelError("the key appears twice");
        }
        f_.metadata_.push_back({std::string(key), std::move(value)});
      } catch (const ModelError& e) {
        std::string where = "metadata entry " + str(i) + " of " + str(kvCount) + " (at byte " +
                            str(at);
        if (const auto key = peekString(at)) where += ", key '" + printable(*key) + "'";
        throw ModelError(where + "): " + e.what());
      }
    }

    if (const GGUFValue* a = f_.find("general.alignment")) {
      const std::optional<uint64_t> v = a->toU64();
      if (!v || *v == 0 || *v > std::numeric_limits<uint32_t>::max() || !std::has_single_bit(*v)) {
        throw ModelError("general.alignment must be a power of two that fits in 32 bits, got " +
                         (v ? str(*v) : "a value of type " + valueTypeName(a->type())));
      }
      f_.alignment_ = *v;
    }
  }

  // The string stored at byte `at`, or nullopt when it does not fit in the file. Used to name the
  // key or tensor in error messages.
  // note: re-reading here, instead of keeping the view in a variable that the catch block reads,
  // sidesteps what valgrind showed as an uninitialized view there under GCC 12 -O2.
  std::optional<std::string_view> peekString(uint64_t at) const {
    if (at > f_.size_ || f_.size_ - at < 8) return std::nullopt;
    uint64_t len;
    std::memcpy(&len, f_.base_ + at, 8);
    if (len > f_.size_ - at - 8) return std::nullopt;
    return std::string_view(reinterpret_cast<const char*>(f_.base_ + at + 8),
                            static_cast<size_t>(len));
  }

  GGUFValue parseValue(uint32_t typeId, int depth) {
    if (!isValidValueType(typeId)) {
      throw ModelError("unknown value type " + str(typeId) + " (valid: 0 to 12)");
    }
    GGUFValue v;
    v.type_ = static_cast<GGUFValueType>(typeId);
    if (v.type_ == GGUFValueType::STRING) {
      v.string_ = c_.string("a string value");
    } else if (v.type_ == GGUFValueType::ARRAY) {
      parseArray(v, depth);
    } else {
      const uint64_t size = fixedSize(v.type_);
      std::memcpy(&v.scalarBits_, c_.take(size, "a " + valueTypeName(v.type_) + " value"),
                  static_cast<size_t>(size));
    }
    return v;
  }

  void parseArray(GGUFValue& v, int depth) {
    const uint64_t at = c_.pos();
    const uint32_t elemId = c_.u32("the array element type");
    if (!isValidValueType(elemId)) {
      throw ModelError("at byte " + str(at) + ": unknown array element type " + str(elemId) +
                       " (valid: 0 to 12)");
    }
    const auto elemType = static_cast<GGUFValueType>(elemId);
    if (elemType == GGUFValueType::ARRAY && depth + 1 >= kMaxArrayDepth) {
      throw ModelError("at byte " + str(at) + ": arrays nested more than " +
                       str(kMaxArrayDepth) + " deep");
    }
    const uint64_t count = c_.u64("the array length");
    const uint64_t fixed = fixedSize(elemType);
    const uint64_t minElemBytes =
        fixed != 0 ? fixed : (elemType == GGUFValueType::STRING ? 8 : 4 + 8);
    if (count > c_.remaining() / minElemBytes) {
      throw ModelError("at byte " + str(at) + ": array of " + str(count) + " " +
                       valueTypeName(elemType) + " elements needs at least " +
                       (count > std::numeric_limits<uint64_t>::max() / minElemBytes
                            ? std::string("2^64")
                            : str(count * minElemBytes)) +
                       " bytes but only " + str(c_.remaining()) + " remain");
    }
    v.elemType_ = elemType;
    v.count_ = count;
    if (fixed != 0) {
      v.fixedElems_ = c_.take(count * fixed, "the array elements");
    } else if (elemType == GGUFValueType::STRING) {
      auto strings = std::make_shared<std::vector<std::string_view>>();
      strings->reserve(static_cast<size_t>(count));
      for (uint64_t i = 0; i < count; ++i) strings->push_back(c_.string("an array string"));
      v.stringElems_ = std::move(strings);
    } else {
      auto arrays = std::make_shared<std::vector<GGUFValue>>();
      arrays->reserve(static_cast<size_t>(count));
      for (uint64_t i = 0; i < count; ++i) {
        GGUFValue inner;
        inner.type_ = GGUFValueType::ARRAY;
        parseArray(inner, depth + 1);
        arrays->push_back(std::move(inner));
      }
      v.arrayElems_ = std::move(arrays);
    }
  }

  void parseTensorInfos() {
    f_.tensors_.reserve(static_cast<size_t>(tensorCount_));
    f_.tensorIndex_.reserve(static_cast<size_t>(tensorCount_));
    for (uint64_t i = 0; i < tensorCount_; ++i) {
      const uint64_t at = c_.pos();
      try {
        const std::string_view name = c_.string("the tensor name");
        f_.tensors_.push_back(parseTensorInfo(name));
        if (!f_.tensorIndex_.emplace(name, f_.tensors_.size() - 1).second) {
          throw ModelError("a tensor with this name appears twice");
        }
      } catch (const ModelError& e) {
        std::string where = "tensor info " + str(i) + " of " + str(tensorCount_) + " (at byte " +
                            str(at);
        if (const auto name = peekString(at)) where += ", tensor '" + printable(*name) + "'";
        throw ModelError(where + "): " + e.what());
      }
    }

    // The data section starts at the next multiple of the alignment.
    const uint64_t end = c_.pos();
    const uint64_t mask = f_.alignment_ - 1;
    f_.dataOffset_ = end > std::numeric_limits<uint64_t>::max() - mask ? end : (end + mask) & ~mask;
    if (tensorCount_ > 0 && f_.dataOffset_ > f_.size_) {
      throw ModelError("truncated: the tensor data section would start at byte " +
                       str(f_.dataOffset_) + ", past the end of the file (" + str(f_.size_) +
                       " bytes)");
    }
    const uint64_t dataBytes = f_.size_ - std::min(f_.dataOffset_, f_.size_);
    for (GGUFTensorInfo& t : f_.tensors_) {
      const std::string where = "tensor '" + printable(t.name) + "'";
      if (t.offset % f_.alignment_ != 0) {
        throw ModelError(where + ": data offset " + str(t.offset) +
                         " is not a multiple of the alignment " + str(f_.alignment_));
      }
      if (t.offset > dataBytes || t.nBytes > dataBytes - t.offset) {
        throw ModelError(where + ": data [" + str(t.offset) + ", +" + str(t.nBytes) +
                         " bytes) lies outside the " + str(dataBytes) +
                         "-byte data section (file truncated or offset corrupt)");
      }
      t.fileOffset = f_.dataOffset_ + t.offset;
      t.data = f_.base_ + t.fileOffset;
    }
  }

  GGUFTensorInfo parseTensorInfo(std::string_view name) {
    GGUFTensorInfo t;
    t.name = std::string(name);
    const uint32_t nDims = c_.u32("the number of dimensions");
    if (nDims > kMaxDims) {
      throw ModelError(str(nDims) + " dimensions (at most " + str(kMaxDims) + " supported)");
    }
    t.dims.resize(nDims);
    uint64_t nElements = 1;
    for (uint32_t d = 0; d < nDims; ++d) {
      t.dims[d] = c_.u64("a dimension");
      if (t.dims[d] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          mulOverflows(nElements, t.dims[d], &nElements)) {
        throw ModelError("dimensions overflow: dimension " + str(d) + " is " + str(t.dims[d]) +
                         " and the element count no longer fits in 64 bits");
      }
    }
    t.nElements = nElements;
    const uint32_t typeId = c_.u32("the tensor type");
    t.type = static_cast<GGMLType>(typeId);
    if (!hasKnownLayout(t.type)) {
      throw ModelError("tensor type id " + str(typeId) + " (" + ggmlTypeName(t.type) +
                       ") is not a ggml type with a known layout");
    }
    t.offset = c_.u64("the data offset");
    const uint64_t rowLength = t.rowLength();
    const uint64_t blockSize = blockElements(t.type);
    if (rowLength % blockSize != 0) {
      throw ModelError("row length " + str(rowLength) + " is not a multiple of the " +
                       ggmlTypeName(t.type) + " block size " + str(blockSize));
    }
    if (rowLength == 0) {
      t.nBytes = 0;
    } else if (mulOverflows(rowBytes(t.type, rowLength), nElements / rowLength, &t.nBytes)) {
      throw ModelError("byte size overflows 64 bits");
    }
    return t;
  }

  GGUFFile& f_;
  Cursor c_;
  uint64_t tensorCount_ = 0;
};

// ---- GGUFFile ------------------------------------------------------------------------------------

GGUFFile GGUFFile::open(const std::string& path) {
  GGUFFile f;
  f.path_ = path;
  f.storage_ = std::make_unique<Storage>();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw ModelError(path + ": cannot open: " + std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw ModelError(path + ": cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw ModelError(path + ": not a regular file");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size > 0) {
    void* p = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      throw ModelError(path + ": cannot map " + str(size) + " bytes: " + std::strerror(err));
    }
    f.storage_->mapped = p;
    f.storage_->mappedBytes = static_cast<size_t>(size);
    f.base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // note: the mapping stays valid after the descriptor is closed.
  f.size_ = size;
  GGUFParser(f).parse();
  return f;
}

GGUFFile GGUFFile::fromMemory(std::span<const uint8_t> bytes, std::string sourceName) {
  GGUFFile f;
  f.path_ = std::move(sourceName);
  f.storage_ = std::make_unique<Storage>();
  f.storage_->owned.assign(bytes.begin(), bytes.end());
  f.base_ = f.storage_->owned.data();
  f.size_ = f.storage_->owned.size();
  GGUFParser(f).parse();
  return f;
}

const GGUFValue* GGUFFile::find(std::string_view key) const {
  const auto it = metadataIndex_.find(key);
  return it == metadataIndex_.end() ? nullptr : &metadata_[it->second].value;
}

const GGUFValue& GGUFFile::require(std::string_view key) const {
  const GGUFValue* v = find(key);
  if (v == nullptr) {
    throw ModelError(path_ + ": metadata key '" + printable(key) + "' not found");
  }
  return *v;
}

void GGUFFile::throwWrongType(std::string_view key, const GGUFValue& v,
                              std::string_view wanted) const {
  std::string got = valueTypeName(v.type());
  if (v.isArray()) {
    got = "array of " + str(v.arraySize()) + " " + valueTypeName(v.arrayType());
  } else if (const auto i = v.toI64()) {
    got += " " + std::to_string(*i);
  } else if (const auto u = v.toU64()) {
    got += " " + str(*u);
  }
  throw ModelError(path_ + ": metadata key '" + printable(key) + "' is " + got + ", expected " +
                   std::string(wanted));
}

std::string GGUFFile::getString(std::string_view key) const {
  const GGUFValue& v = require(key);
  const auto s = v.toString();
  if (!s) throwWrongType(key, v, "a string");
  return std::string(*s);
}

uint32_t GGUFFile::getU32(std::string_view key) const {
  const GGUFValue& v = require(key);
  const auto u = v.toU64();
  if (!u || *u > std::numeric_limits<uint32_t>::max()) {
    throwWrongType(key, v, "an unsigned integer that fits in 32 bits");
  }
  return static_cast<uint32_t>(*u);
}

uint64_t GGUFFile::getU64(std::string_view key) const {
  const GGUFValue& v = require(key);
  const auto u = v.toU64();
  if (!u) throwWrongType(key, v, "a non-negative integer");
  return *u;
}

int64_t GGUFFile::getI64(std::string_view key) const {
  const GGUFValue& v = require(key);
  const auto i = v.toI64();
  if (!i) throwWrongType(key, v, "an integer that fits in int64");
  return *i;
}

float GGUFFile::getF32(std::string_view key) const {
  const GGUFValue& v = require(key);
  const auto d = v.toF64();
  if (!d) throwWrongType(key, v, "a number");
  const auto f = toFloat(*d);
  if (!f) throwWrongType(key, v, "a number in float32 range");
  return *f;
}

bool GGUFFile::getBool(std::string_view key) const {
  const GGUFValue& v = require(key);
  const auto b = v.toBool();
  if (!b) throwWrongType(key, v, "a bool");
  return *b;
}

std::vector<std::string> GGUFFile::getStringArray(std::string_view key) const {
  const GGUFValue& v = require(key);
  if (!v.isArray() || v.arrayType() != GGUFValueType::STRING) {
    throwWrongType(key, v, "an array of strings");
  }
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(v.arraySize()));
  for (uint64_t i = 0; i < v.arraySize(); ++i) out.emplace_back(*v.at(i).toString());
  return out;
}

std::vector<float> GGUFFile::getF32Array(std::string_view key) const {
  const GGUFValue& v = require(key);
  const GGUFValueType e = v.arrayType();
  if (!v.isArray() || e == GGUFValueType::STRING || e == GGUFValueType::ARRAY ||
      e == GGUFValueType::BOOL) {
    throwWrongType(key, v, "an array of numbers");
  }
  std::vector<float> out;
  out.reserve(static_cast<size_t>(v.arraySize()));
  for (uint64_t i = 0; i < v.arraySize(); ++i) {
    const auto f = toFloat(*v.at(i).toF64());
    if (!f) {
      throw ModelError(path_ + ": metadata key '" + printable(key) + "': element " + str(i) +
                       " is beyond float32 range");
    }
    out.push_back(*f);
  }
  return out;
}

std::vector<int32_t> GGUFFile::getI32Array(std::string_view key) const {
  const GGUFValue& v = require(key);
  const GGUFValueType e = v.arrayType();
  if (!v.isArray() || e == GGUFValueType::STRING || e == GGUFValueType::ARRAY ||
      e == GGUFValueType::BOOL || e == GGUFValueType::FLOAT32 || e == GGUFValueType::FLOAT64) {
    throwWrongType(key, v, "an array of integers");
  }
  std::vector<int32_t> out;
  out.reserve(static_cast<size_t>(v.arraySize()));
  for (uint64_t i = 0; i < v.arraySize(); ++i) {
    const std::optional<int64_t> x = v.at(i).toI64();
    if (!x || *x < std::numeric_limits<int32_t>::min() ||
        *x > std::numeric_limits<int32_t>::max()) {
      throw ModelError(path_ + ": metadata key '" + printable(key) + "': element " + str(i) +
                       " does not fit in int32");
    }
    out.push_back(static_cast<int32_t>(*x));
  }
  return out;
}

const GGUFTensorInfo* GGUFFile::findTensor(std::string_view name) const {
  const auto it = tensorIndex_.find(name);
  return it == tensorIndex_.end() ? nullptr : &tensors_[it->second];
}

const GGUFTensorInfo& GGUFFile::tensor(std::string_view name) const {
  const GGUFTensorInfo* t = findTensor(name);
  if (t == nullptr) {
    throw ModelError(path_ + ": tensor '" + printable(name) + "' not found (the file has " +
                     str(tensors_.size()) + " tensors)");
  }
  return *t;
}

}  // namespace cortex::model
