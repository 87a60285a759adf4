#include "kv/paged_view.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/half.h"

namespace cortex::kv {

namespace {

// Element d of the row starting at `row` (headDim elements).
float loadElement(const std::byte* row, int32_t d, int32_t headDim, KVDType dtype);

}  // namespace

void storeRow(const float* src, std::byte* dst, int32_t n, KVDType dtype) {
  switch (dtype) {
    case KVDType::Q8: {
      float amax = 0;
      for (int32_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(src[i]));
      const float scale = amax / 127.0f;
      for (int32_t i = 0; i < n; ++i) {
        const float q = scale == 0.0f ? 0.0f : std::nearbyint(src[i] / scale);
        dst[i] = static_cast<std::byte>(static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f)));
      }
      std::memcpy(dst + n, &scale, sizeof scale);
      break;
    }
    case KVDType::F32: std::memcpy(dst, src, static_cast<size_t>(n) * 4); break;
    case KVDType::F16:
      for (int32_t i = 0; i < n; ++i) {
        const uint16_t h = floatToHalf(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      break;
    case KVDType::BF16:
      for (int32_t i = 0; i < n; ++i) {
        const uint16_t h = floatToBf16(src[i]);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      break;
  }
}

void loadRow(const std::byte* row, float* out, int32_t n, KVDType dtype) {
  for (int32_t d = 0; d < n; ++d) out[d] = loadElement(row, d, n, dtype);
}

namespace {

float loadElement(const std::byte* row, int32_t d, int32_t headDim, KVDType dtype) {
  const std::byte* p = row + static_cast<size_t>(d) * dtypeBytes(dtype);
  if (dtype == KVDType::Q8) {
    float scale;
    std::memcpy(&scale, row + headDim, sizeof scale);
    return static_cast<float>(static_cast<int8_t>(*p)) * scale;
  }
  if (dtype == KVDType::F32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return dtype == KVDType::F16 ? halfToFloat(bits) : bf16ToFloat(bits);
}

}  // namespace

KVDType parseKVDType(std::string_view name) {
  std::string choices;
  for (const KVFormat& f : kKVFormats) {
    if (name == f.name) return f.dtype;
    choices += (choices.empty() ? "" : ", ") + std::string(f.name);
  }
  throw std::invalid_argument("unknown KV storage type '" + std::string(name) + "' (choose " +
                              choices + ")");
}

void writeKV(const KVArena& arena, TokenSlot slot, int32_t layer, const float* k, const float* v) {
  const int32_t D = arena.headDim;
  for (int32_t head = 0; head < arena.numKVHeads; ++head) {
    const int64_t off = arena.rowByteOffset(slot, layer, head);
    storeRow(k + static_cast<int64_t>(head) * D, arena.kBase + off, D, arena.dtype);
    storeRow(v + static_cast<int64_t>(head) * D, arena.vBase + off, D, arena.dtype);
  }
}

void gather(const PagedKVView& view, float* out) {
  for (int32_t h = 0; h < view.numKVHeads; ++h) {
    for (int32_t t = 0; t < view.numTokens; ++t) {
      const std::byte* row = view.row(t, h);
      float* dst = out + (static_cast<int64_t>(h) * view.numTokens + t) * view.headDim;
      for (int32_t d = 0; d < view.headDim; ++d) {
        dst[d] = loadElement(row, d, view.headDim, view.dtype);
      }
    }
  }
}

}  // namespace cortex::kv
