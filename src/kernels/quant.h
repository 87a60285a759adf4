// The integer path of matmul: activations quantized to int8 blocks, weights repacked at load.
//
// Activations: each token's row of `cols` floats is cut into blocks of 32 and each block is
// quantized on its own: d = max|x| / 127, q = round-to-nearest-even(x * (127 / max|x|)) in
// [-127, 127] (an all-zero block has d = 0, q = 0); the block also keeps s = sum(q) and
// d * s. A token's numbers therefore never depend on the other tokens of its batch.
//
// Weights: Q4_0, Q4_1 and Q8_0 matrices are repacked once (PackedWeights) into groups of 16 rows
// whose blocks are interleaved so that one 64-byte load feeds 16 rows' integer dot products:
//   group g, block b, at (g * blocksPerRow + b) * groupBlockBytes:
//     16 x fp16 d of rows 16g..16g+15, then (Q4_1 only) 16 x fp16 m,
//     then quads: quad j holds 4 bytes of each of the 16 rows (row i at j * 64 + 4 i):
//       Q4_0/Q4_1: j = 0..3, bytes 4j..4j+3 of the row's 16 nibble bytes (low nibbles are
//                  elements 4j..4j+3, high nibbles elements 16+4j..16+4j+3), values 0..15;
//       Q8_0:      j = 0..7, elements 4j..4j+3 stored as q + 128 (0..255).
//   Rows past the matrix's end (the last group is padded to 16) are zero.
//
// Numerics: for a row with per-block weight scale dw (and Q4_1 min m) and a token with block
// scale dx and sum s, the block's integer dot product is exact:
//   I = sum(u * q) - off * s,   u the stored unsigned weight, off = 8 (Q4_0), 128 (Q8_0), 0 (Q4_1)
// and the output accumulates blocks in increasing order, starting from 0:
//   acc = fma(dw * dx, float(I), acc);   Q4_1 then: acc = fma(m, dx * s, acc).
// Every instruction-set path (isa.h) computes I exactly and applies the same float operations in
// the same order, so all paths give the same bits, for any batch size, chunking or thread count.
// Against the float path (matmul on the stored weights) the difference is the activation
// rounding: |q * dx - x| <= dx / 2 per element.
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

  void resize(int64_t nRows, int64_t nCols);
  int64_t blocksPerRow() const { return cols / kQuantBlock; }
};

// Quantizes X (rows x cols floats, row-major) into out, as described above. Runs rows in
// parallel on `pool` when there are enough of them. Throws std::invalid_argument when cols is not
// a positive multiple of 32.
void quantizeActivations(ThreadPool& pool, const float* X, int64_t rows, int64_t cols,
                         QuantizedActivations& out);

// A Q4_0, Q4_1 or Q8_0 matrix in the interleaved layout above, in memory it shares with the other
// matrices packed with it (64-byte aligned; kept alive by every matrix that uses it).
class PackedWeights {
 public:
  // Whether matrices of this type can be packed.
  static bool packable(WeightType type);
  // Bytes of one (group, block) cell: Q4_0 288, Q4_1 320, Q8_0 544.
  static size_t groupBlockBytes(WeightType type);
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
  const std::byte* group(int64_t g) const {
    return data_ + static_cast<size_t>(g * blocksPerRow()) * groupBlockBytes(type_);
  }
  // Bytes of this matrix's cells.
  size_t bytes() const {
    return static_cast<size_t>(groups() * blocksPerRow()) * groupBlockBytes(type_);
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
