// The ggml tensor types as GGUF numbers them, with their block layouts. A quantized type stores a
// row as a whole number of blocks; each block packs blockElements() values into blockBytes() bytes.
// This table only describes storage; dequantization and matmul live in kernels/.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace cortex::model {

// GGUF tensor type ids (ggml_type). Every id ggml has assigned is listed so files can be described
// by name; ids 4, 5, 31-33 and 36-38 were retired by ggml and have no block layout here.
enum class GGMLType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q4_2 = 4,  // retired
  Q4_3 = 5,  // retired
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  Q4_0_4_4 = 31,  // retired
  Q4_0_4_8 = 32,  // retired
  Q4_0_8_8 = 33,  // retired
  TQ1_0 = 34,
  TQ2_0 = 35,
  IQ4_NL_4_4 = 36,  // retired
  IQ4_NL_4_8 = 37,  // retired
  IQ4_NL_8_8 = 38,  // retired
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
};

// The name ggml uses ("Q4_1", "BF16"), or "unknown type <id>" for an id ggml never assigned.
std::string ggmlTypeName(GGMLType type);

// True when `type` is an id ggml has assigned (including retired ones).
bool isKnownType(GGMLType type);

// True when the block layout of `type` is known, so byte sizes can be computed (every known type
// except the retired ones). Says nothing about whether CortexStream can compute with it.
bool hasKnownLayout(GGMLType type);

// True for the types CortexStream's kernels handle: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
// Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
bool isSupported(GGMLType type);

// The supported types as a comma-separated list, for messages ("F32, F16, BF16, Q8_0, Q4_0, Q4_1,
// Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K").
std::string supportedTypeNames();

// Elements per block (1 for plain types, 32 for Q8_0/Q4_0/Q4_1, 256 for K-quants).
// Throws ModelError when hasKnownLayout(type) is false.
uint64_t blockElements(GGMLType type);

// Bytes per block (4 for F32, 34 for Q8_0, 18 for Q4_0, 20 for Q4_1 ...).
// Throws ModelError when hasKnownLayout(type) is false.
uint64_t blockBytes(GGMLType type);

// Bytes that nElements consecutive values of `type` occupy (a row of a weight matrix). Throws
// ModelError when the layout is unknown, when nElements is not a multiple of blockElements(type),
// or when the result does not fit in 64 bits.
uint64_t rowBytes(GGMLType type, uint64_t nElements);

// Throws ModelError unless isSupported(type), naming the tensor and the type, e.g. "tensor
// 'blk.0.ffn_up.weight' has type IQ2_XS, which CortexStream does not support yet (supported: ...)".
void requireSupported(GGMLType type, std::string_view tensorName);

}  // namespace cortex::model
