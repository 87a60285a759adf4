// Weight matrices as stored in a GGUF file, read in place (no float copy of the model).
//
// A WeightMatrix is `rows` output features by `cols` input features; row r is contiguous and
// takes rowBytes(type, cols) bytes, so row r starts at data + r * rowBytes(type, cols). The
// quantized types use ggml's block layouts (little-endian; fp16 is IEEE binary16). 32-element
// blocks:
//   Q8_0 (34 B): fp16 d, 32 x int8 q                          -> x = d * q
//   Q4_0 (18 B): fp16 d, 16 bytes of nibbles                  -> x = d * (q - 8)
//   Q4_1 (20 B): fp16 d, fp16 m, 16 bytes of nibbles          -> x = d * q + m
//   Q5_0 (22 B): fp16 d, uint32 qh, 16 bytes of nibbles       -> x = d * (q - 16)
//   Q5_1 (24 B): fp16 d, fp16 m, uint32 qh, 16 nibble bytes   -> x = d * q + m
// where element j (0..15) is the low nibble of byte j and element j + 16 its high nibble, and for
// Q5_0/Q5_1 bit 4 of element j's q is bit j of qh.
// K-quants: 256-element super-blocks with a fp16 d (and dmin) and per-sub-block integer scales:
//   Q2_K (84 B):  16 bytes scales, 64 bytes qs, fp16 d, fp16 dmin. Sub-block i (16 elements,
//                 i = e / 16) has sc = scales[i] & 15, m = scales[i] >> 4; element
//                 e = 128h + 32s + l (h 0..1, s 0..3, l 0..31) has q = (qs[32h + l] >> 2s) & 3
//                 -> x = (d * sc) * q - dmin * m
//   Q3_K (110 B): 32 bytes hmask, 64 bytes qs, 12 bytes scales, fp16 d. Sub-block i (16
//                 elements) has a 6-bit scale: low 4 bits = nibble (i / 8) of byte i % 8, high 2
//                 bits = bits 2(i / 4)..+1 of byte 8 + i % 4, sc = that - 32; element
//                 e = 128h + 32s + l has q = ((qs[32h + l] >> 2s) & 3) - 4 * (1 - hbit) with
//                 hbit = (hmask[l] >> (4h + s)) & 1     -> x = (d * sc) * q
//   Q4_K (144 B): fp16 d, fp16 dmin, 12 bytes scales, 128 bytes qs. Sub-block j (32 elements)
//                 has 6-bit sc and m: for j < 4 sc = B[j] & 63, m = B[j + 4] & 63; for j >= 4
//                 sc = (B[j + 4] & 15) | (B[j - 4] >> 6) << 4, m = (B[j + 4] >> 4) | (B[j] >> 6)
//                 << 4 (B the 12 bytes); element e = 64c + 32k + l has q = nibble k of
//                 qs[32c + l]                            -> x = (d * sc) * q - dmin * m
//   Q5_K (176 B): fp16 d, fp16 dmin, 12 bytes scales (as Q4_K), 32 bytes qh, 128 bytes qs; q as
//                 Q4_K plus bit 4 = (qh[e % 32] >> (e / 32)) & 1
//                                                        -> x = (d * sc) * q - dmin * m
//   Q6_K (210 B): 128 bytes ql, 64 bytes qh, 16 x int8 scales, fp16 d. Element
//                 e = 128h + 32s + l has q = (nibble s / 2 of ql[64h + 32(s % 2) + l])
//                 | ((qh[32h + l] >> 2s) & 3) << 4, sub-block i = e / 16 the scale sc[i]
//                                                        -> x = (d * sc) * (q - 32)
// F32, F16 and BF16 rows are plain arrays.
//
// Canonical dequantized values (every kernel uses exactly these floats, so all paths agree to the
// bit): Q8_0 d*q, Q4_0 d*(q-8), Q5_0 d*(q-16), Q4_1/Q5_1 fma(d, q, m) (one rounding),
// F16/BF16 exact conversion. For the K-quants the sub-block scale d*sc and min dmin*m are exact
// floats (an 11-bit fp16 significand times a 6- or 8-bit integer), and the value is
// Q2_K/Q4_K/Q5_K fma(d*sc, q, -(dmin*m)) (one rounding), Q3_K (d*sc)*q (exact) and
// Q6_K (d*sc)*(q-32) (one rounding). These are the floats ggml and the gguf Python package
// compute in float32 for the same blocks.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cortex::kernels {

enum class WeightType : uint8_t {
  F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
};

// Whether `type` is a K-quant (256-element super-blocks).
bool isKQuant(WeightType type);

const char* toString(WeightType type);

// Elements per block: 256 for the K-quants, 32 for the other quantized types, 1 for F32/F16/BF16.
int64_t blockElems(WeightType type);
// Bytes per block: Q8_0 34, Q4_0 18, Q4_1 20, Q5_0 22, Q5_1 24, Q2_K 84, Q3_K 110, Q4_K 144,
// Q5_K 176, Q6_K 210, F32 4, F16/BF16 2.
size_t blockBytes(WeightType type);
// Bytes of one row of `cols` elements. cols must be a multiple of blockElems(type).
size_t rowBytes(WeightType type, int64_t cols);

struct WeightMatrix {
  const void* data = nullptr;  // not owned; rows * rowBytes(type, cols) bytes
  WeightType type = WeightType::F32;
  int64_t rows = 0;  // output features
  int64_t cols = 0;  // input features (= ggml ne[0], the row length)

  const std::byte* rowPtr(int64_t row) const {
    return static_cast<const std::byte*>(data) + static_cast<size_t>(row) * rowBytes(type, cols);
  }
};

// Writes the cols canonical floats of row `row` (0 <= row < rows) to out. Used for the embedding
// lookup and by tests.
void dequantizeRow(const WeightMatrix& w, int64_t row, float* out);

// Throws std::invalid_argument with a message naming the problem when `w` cannot be used by
// matmul (null data, non-positive shape, cols not a multiple of 256 for K-quants, of 32 for the
// other quantized types or of 8 for float types).
void validate(const WeightMatrix& w);

}  // namespace cortex::kernels
