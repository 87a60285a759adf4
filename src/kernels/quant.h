// The integer path of matmul: activations quantized to int8 blocks, weights repacked at load.
//
// Activations: each token's row of `cols` floats is cut into blocks of 32 and each block is
// quantized on its own: d = max|x| / 127, q = round-to-nearest-even(x * (127 / max|x|)) in
// [-127, 127] (an all-zero block has d = 0, q = 0); the block also keeps s = sum(q), d * s and
// the sum of its first 16 q (for the types with 16-column sub-blocks). A token's numbers
// therefore never depend on the other tokens of its batch.
//
// Weights: every quantized type of weights.h is repacked once (PackedWeights) into groups of 16
// rows whose blocks are interleaved so that one 64-byte load feeds 16 rows' integer dot products.
// A group is a run of cells, one per cellElems(type) columns (32, or 256 for the K-quants):
//   group g, cell c, at (g * cellsPerRow + c) * groupCellBytes: a header of per-row scales, then
//   one data block per 32 columns (the K-quants have 8, block s covering the super-block's
//   columns 32s..32s+31). Header fields are per row, in row order: "16 x fp16 d" is d of rows
//   16g..16g+15; "12 x 16 bytes B" is byte p of row i at 16 p + i. Data blocks are made of
//   64-byte vectors (quads, planes) holding 4 bytes of each of the 16 rows, row i at 4i..4i+3;
//   "byte k" (k 0..3) below is byte 4i + k of a vector, for row i. Built from the row's 32
//   unsigned values u_0..u_31 of the block:
//     nibble quads (256 B): quad j = 0..3 holds u_{4j+k} in the low nibble and u_{16+4j+k} in the
//       high nibble of byte k (the low 4 bits of u only);
//     Q8_0 quads (512 B): quad j = 0..7 holds u_{4j+k} = q + 128;
//     bit-4 plane (64 B): byte k has bit j + 4n = bit 4 of u_{16n+4j+k} (j 0..3, n 0..1);
//     Q6 high planes (128 B): plane n (n 0..1, 64 B each), byte k, bits 2j..2j+1 = bits 4..5 of
//       u_{16n+4j+k};
//     2-bit planes (128 B): plane p (0..1, 64 B each), byte k, bits 2s..2s+1 = bits 0..1 of
//       u_{16p+4s+k};
//     Q3 high plane (64 B): byte k, bit j (0..7) = bit 2 of u_{4j+k}.
//   Per type (bytes of a cell: header | data blocks):
//     Q4_0 (288):  16 x fp16 d | nibble quads.                          u = q (0..15), off 8
//     Q4_1 (320):  16 x fp16 d, 16 x fp16 m | nibble quads.             u = q, off 0
//     Q8_0 (544):  16 x fp16 d | Q8_0 quads.                            u = q + 128, off 128
//     Q5_0 (352):  16 x fp16 d | nibble quads, bit-4 plane.             u = q (0..31), off 16
//     Q5_1 (384):  16 x fp16 d, 16 x fp16 m | nibble quads, bit-4 plane. u = q, off 0
//     Q4_K (2304): 16 x fp16 d, 16 x fp16 (-dmin), 12 x 16 bytes B (the row's 12 ggml scale
//                  bytes) | 8 x nibble quads.                          u = q (0..15)
//     Q5_K (2816): header as Q4_K | 8 x (nibble quads, bit-4 plane).   u = q (0..31)
//     Q6_K (3360): 16 x fp16 d, 16 x 16 int8 sc (sub-block q of row i at 16 q + i)
//                  | 8 x (nibble quads, Q6 high planes).               u = q (0..63), off 32
//     Q3_K (1760): 16 x fp16 d, 12 x 16 bytes B (the row's 12 ggml scale bytes)
//                  | 8 x (2-bit planes, Q3 high plane).                u = q + 4 (0..7), off 4
//     Q2_K (1344): 16 x fp16 d, 16 x fp16 (-dmin), 16 x 16 bytes sc | m << 4 (sub-block q of row i
//                  at 16 q + i) | 8 x 2-bit planes.                    u = q (0..3)
//   so the packed bytes per weight equal ggml's for every type (4.5 bits for Q4_0 and Q4_K, 5.5
//   for Q5_0 and Q5_K, 6.5625 for Q6_K, 3.4375 for Q3_K, 2.625 for Q2_K, ...). Rows past the
//   matrix's end (the last group is padded to 16) are zero.
//
// Numerics: a token's 32-column block has int8 values x_0..x_31 (the q above), scale dx, sum
// s = sum(x) and half sums sa = sum(x_0..x_15), sb = s - sa; a row's block has the exact integer
// sums Ia = sum(u_e * x_e, e < 16), Ib = sum(u_e * x_e, e >= 16), I = Ia + Ib. The output accumulates
// the blocks in increasing order, starting from 0:
//   Q4_0, Q5_0, Q8_0:  acc = fma(d * dx, float(I - off * s), acc)
//   Q4_1, Q5_1:        acc = fma(d * dx, float(I), acc);  acc = fma(m, dx * s, acc)
//   Q4_K, Q5_K:        with S = d * float(sc), N = (-dmin) * float(m) of the block's 32-column
//                      sub-block (both exact): acc = fma(S * dx, float(I), acc);  acc = fma(N, dx * s, acc)
//   Q6_K, Q3_K:        J = sc_a * (Ia - off * sa) + sc_b * (Ib - off * sb), sc_a and sc_b the
//                      scales of the block's two 16-column sub-blocks:
//                      acc = fma(d * dx, float(J), acc)
//   Q2_K:              J = sc_a * Ia + sc_b * Ib, M = m_a * sa + m_b * sb:
//                      acc = fma(d * dx, float(J), acc);  acc = fma((-dmin) * dx, float(M), acc)
// (dx * s is the stored dsum). Every integer here is exact in int32 and in float (|J| < 2^24 for
// Q6_K: 2 * 128 * 16 * 32 * 127 < 2^24). Every instruction-set path (isa.h) computes them exactly
// and applies the same float operations in the same order, so all paths give the same bits, for
// any batch size, chunking or thread count. Against the float path (matmul on the stored
// weights) the difference is the activation rounding, |q * dx - x| <= dx / 2 per element, plus
// float rounding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/thread_pool.h"
#include "kernels/weights.h"

namespace cortex::kernels {

inline constexpr int64_t kQuantBlock = 32;
inline constexpr int64_t kPackRows = 16;

// Int8 activations of `rows` tokens x `cols` features (cols a multiple of 32). Buffers grow and
// are reused; resize() never shrinks them.
struct QuantizedActivations {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<int8_t> q;     // rows x cols
  std::vector<float> d;      // rows x cols/32: block scales
  std::vector<int32_t> sum;  // rows x cols/32: sum of the block's q
  std::vector<float> dsum;   // rows x cols/32: d * float(sum)
  std::vector<int32_t> sumLo;  // rows x cols/32: sum of the block's first 16 q

  void resize(int64_t nRows, int64_t nCols);
  int64_t blocksPerRow() const { return cols / kQuantBlock; }
};

// Quantizes X (rows x cols floats, row-major) into out, as described above. Runs rows in
// parallel on `pool` when there are enough of them. Throws std::invalid_argument when cols is not
// a positive multiple of 32.
void quantizeActivations(ThreadPool& pool, const float* X, int64_t rows, int64_t cols,
                         QuantizedActivations& out);

// A quantized matrix in the interleaved layout above, in memory it shares with the other matrices
// packed with it (64-byte aligned; kept alive by every matrix that uses it).
class PackedWeights {
 public:
  // Whether matrices of this type can be packed: every quantized type (not F32, F16, BF16).
  static bool packable(WeightType type);
  // Columns of one cell: 256 for the K-quants, 32 for the other packable types.
  static int64_t cellElems(WeightType type);
  // Bytes of one (group, cell): Q4_0 288, Q4_1 320, Q8_0 544, Q5_0 352, Q5_1 384, Q2_K 1344,
  // Q3_K 1760, Q4_K 2304, Q5_K 2816, Q6_K 3360 (0 for a type that is not packable).
  static size_t groupCellBytes(WeightType type);
  // Repacks every matrix of `ws` into one allocation, in order. A model packs all its matrices at
  // once: the decode kernel streams them once per token, and one large region sits on 2 MiB
  // pages (transparent huge pages, asked for before the first touch), so the hardware prefetcher
  // is not stopped at every 4 KiB page and the TLB covers the whole model. Throws
  // std::invalid_argument naming the matrix when one fails validate() or is not packable.
  static std::vector<PackedWeights> packAll(const std::vector<WeightMatrix>& ws);
  // One matrix on its own.
  explicit PackedWeights(const WeightMatrix& w) : PackedWeights(std::move(packAll({w})[0])) {}

  WeightType type() const { return type_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t groups() const { return (rows_ + kPackRows - 1) / kPackRows; }
  int64_t blocksPerRow() const { return cols_ / kQuantBlock; }
  int64_t cellsPerRow() const { return cols_ / cellElems(type_); }
  const std::byte* group(int64_t g) const {
    return data_ + static_cast<size_t>(g * cellsPerRow()) * groupCellBytes(type_);
  }
  // Bytes of this matrix's cells.
  size_t bytes() const {
    return static_cast<size_t>(groups() * cellsPerRow()) * groupCellBytes(type_);
  }

 private:
  PackedWeights(const WeightMatrix& w, std::shared_ptr<std::byte> storage, std::byte* data);
  WeightType type_;
  int64_t rows_;
  int64_t cols_;
  std::shared_ptr<std::byte> storage_;
  std::byte* data_;
};

// Y[t][r] = sum_c W[r][c] * X[t][c] on the integer path: X given as its quantization (X.rows
// tokens, X.cols == W.cols()), Y as in the float matmul (X.rows x W.rows(), row-major). Runs on
// the active instruction-set level (isa.h), on all of `pool`'s threads when the product is large
// enough. Throws std::invalid_argument when the shapes disagree (nothing written).
void matmul(ThreadPool& pool, const PackedWeights& W, const QuantizedActivations& X, float* Y);

}  // namespace cortex::kernels
