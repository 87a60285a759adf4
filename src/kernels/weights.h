// Weight matrices as stored in a GGUF file, read in place (no float copy of the model).
//
// A WeightMatrix is `rows` output features by `cols` input features; row r is contiguous and
// takes rowBytes(type, cols) bytes, so row r starts at data + r * rowBytes(type, cols). The
// quantized types use ggml's 32-element block layouts (little-endian):
//   Q8_0: fp16 d, 32 x int8 q                    -> x = d * q
//   Q4_0: fp16 d, 16 bytes of nibbles            -> x = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles    -> x = d * q + m
// where element j (0..15) is the low nibble of byte j and element j + 16 its high nibble.
// F32, F16 and BF16 rows are plain arrays.
//
// Canonical dequantized values (every kernel uses exactly these floats, so all paths agree to the
// bit): Q8_0 d*q, Q4_0 d*(q-8), Q4_1 fma(d, q, m) (one rounding), F16/BF16 exact conversion.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cortex::kernels {

enum class WeightType : uint8_t { F32, F16, BF16, Q8_0, Q4_0, Q4_1 };

const char* toString(WeightType type);

// Elements per block: 32 for the quantized types, 1 for F32/F16/BF16.
int64_t blockElems(WeightType type);
// Bytes per block: Q8_0 34, Q4_0 18, Q4_1 20, F32 4, F16/BF16 2.
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
// matmul (null data, non-positive shape, cols not a multiple of 32 for quantized types or of 8
// for float types).
void validate(const WeightMatrix& w);

}  // namespace cortex::kernels
