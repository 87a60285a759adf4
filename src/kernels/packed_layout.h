// Internal to the kernels: the sizes and offsets of the packed cells of quant.h, shared by the
// repacking (quant.cpp) and the integer kernels (quant_kernels.cpp). Constants only.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/weights.h"

namespace cortex::kernels::detail {

// How a 32-column data block is built (quant.h names them).
enum class PackedData : uint8_t {
  Nibbles,      // nibble quads (256 B)
  Bytes,        // Q8_0 quads (512 B)
  Nibbles5,     // nibble quads, bit-4 plane (320 B)
  Nibbles6,     // nibble quads, Q6 high planes (384 B)
  TwoBit,       // 2-bit planes (128 B)
  TwoBit3,      // 2-bit planes, Q3 high plane (192 B)
};

// Per packable type: cell columns, header bytes, data bytes per 32-column block, and the header
// offsets of its fields (-1: absent). Offsets are of the 16-row arrays; row i's entry is at
// offset + 2 i (fp16) or offset + i (bytes; the 12 x 16 or 16 x 16 byte arrays at offset + 16 p
// + i).
template <WeightType WT>
struct PackedLayout;

template <>
struct PackedLayout<WeightType::Q4_0> {
  static constexpr int kCellElems = 32, kHeader = 32, kD = 0, kM = -1;
  static constexpr PackedData kData = PackedData::Nibbles;
};
template <>
struct PackedLayout<WeightType::Q4_1> {
  static constexpr int kCellElems = 32, kHeader = 64, kD = 0, kM = 32;
  static constexpr PackedData kData = PackedData::Nibbles;
};
template <>
struct PackedLayout<WeightType::Q8_0> {
  static constexpr int kCellElems = 32, kHeader = 32, kD = 0, kM = -1;
  static constexpr PackedData kData = PackedData::Bytes;
};
template <>
struct PackedLayout<WeightType::Q5_0> {
  static constexpr int kCellElems = 32, kHeader = 32, kD = 0, kM = -1;
  static constexpr PackedData kData = PackedData::Nibbles5;
};
template <>
struct PackedLayout<WeightType::Q5_1> {
  static constexpr int kCellElems = 32, kHeader = 64, kD = 0, kM = 32;
  static constexpr PackedData kData = PackedData::Nibbles5;
};
// K-quants. Q4_K/Q5_K: kNegDmin the fp16 -dmin, kScales the 12 x 16 ggml scale bytes.
template <>
struct PackedLayout<WeightType::Q4_K> {
  static constexpr int kCellElems = 256, kHeader = 256, kD = 0, kNegDmin = 32, kScales = 64;
  static constexpr PackedData kData = PackedData::Nibbles;
};
template <>
struct PackedLayout<WeightType::Q5_K> {
  static constexpr int kCellElems = 256, kHeader = 256, kD = 0, kNegDmin = 32, kScales = 64;
  static constexpr PackedData kData = PackedData::Nibbles5;
};
// Q6_K: kScales the 16 x 16 int8 sub-block scales.
template <>
struct PackedLayout<WeightType::Q6_K> {
  static constexpr int kCellElems = 256, kHeader = 288, kD = 0, kScales = 32;
  static constexpr PackedData kData = PackedData::Nibbles6;
};
// Q3_K: kScales the 12 x 16 ggml scale bytes.
template <>
struct PackedLayout<WeightType::Q3_K> {
  static constexpr int kCellElems = 256, kHeader = 224, kD = 0, kScales = 32;
  static constexpr PackedData kData = PackedData::TwoBit3;
};
// Q2_K: kScales the 16 x 16 ggml bytes sc | m << 4.
template <>
struct PackedLayout<WeightType::Q2_K> {
  static constexpr int kCellElems = 256, kHeader = 320, kD = 0, kNegDmin = 32, kScales = 64;
  static constexpr PackedData kData = PackedData::TwoBit;
};

inline constexpr int packedDataBytes(PackedData data) {
  switch (data) {
    case PackedData::Nibbles: return 256;
    case PackedData::Bytes: return 512;
    case PackedData::Nibbles5: return 320;
    case PackedData::Nibbles6: return 384;
    case PackedData::TwoBit: return 128;
    case PackedData::TwoBit3: return 192;
  }
  return 0;
}

template <WeightType WT>
inline constexpr int kPackedBlockBytes = packedDataBytes(PackedLayout<WT>::kData);
template <WeightType WT>
inline constexpr int kPackedCellBytes =
    PackedLayout<WT>::kHeader + PackedLayout<WT>::kCellElems / 32 * kPackedBlockBytes<WT>;

}  // namespace cortex::kernels::detail
