// Element-wise and per-row operations of the Llama forward pass (float32 activations).
//
// All are deterministic and batch-invariant: each output row depends only on its own input row
// (and position), computed in an order fixed by the row length. None allocates, none threads
// (they are cheap next to matmul and attention; the caller may run rows in parallel).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace cortex::kernels {

// out[t][i] = x[t][i] / sqrt(mean_i(x[t][i]^2) + eps) * weight[i], for nTokens rows of n floats.
// The mean of squares is accumulated in double in index order. out may alias x.
void rmsNorm(const float* x, const float* weight, int64_t nTokens, int64_t n, float eps,
             float* out);

// Cos/sin of RoPE angles pos * theta^(-2i/rotDim) for pos in [0, maxPositions), i in
// [0, rotDim/2), computed in double and rounded to float once. Built once by the caller (the
// model) and shared read-only by every layer and thread; ropeInPlace does no trigonometry.
// rotDim even, >= 2. Memory: maxPositions * rotDim floats.
class RopeTable {
 public:
  RopeTable(int32_t maxPositions, int32_t rotDim, double theta);
  int32_t maxPositions() const { return maxPositions_; }
  int32_t rotDim() const { return rotDim_; }
  // rotDim/2 cos values then rotDim/2 sin values of position pos.
  const float* at(int32_t pos) const { return table_.data() + static_cast<size_t>(pos) * rotDim_; }

 private:
  int32_t maxPositions_;
  int32_t rotDim_;
  std::vector<float> table_;
};

// Llama RoPE in GGUF ("normal", adjacent-pair) convention, in place. x holds nTokens rows of
// nHeads * headDim floats (head-major within a row); token t is at position positions[t]. In each
// head the pairs (x[2i], x[2i+1]), 2i < rotDim, are rotated by angle a = pos * theta^(-2i/rotDim):
//   x'[2i] = x[2i] cos a - x[2i+1] sin a,  x'[2i+1] = x[2i] sin a + x[2i+1] cos a.
// Dims >= table.rotDim() are left alone. Throws std::out_of_range when a position is outside
// [0, table.maxPositions()) and std::invalid_argument when table.rotDim() > headDim.
void ropeInPlace(float* x, int64_t nTokens, int32_t nHeads, int32_t headDim,
                 const int32_t* positions, const RopeTable& table);

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], i in [0, n).
// out may alias gate or up.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// y[i] += x[i], i in [0, n).
void addInPlace(float* y, const float* x, int64_t n);

// out[i] = x[i] - log(sum_j exp(x[j])): the log-probabilities of a row of logits. The maximum is
// subtracted first and the sum taken in index order in double, so any finite row gives finite
// results. n >= 1; out may alias x.
void logSoftmax(const float* x, int64_t n, float* out);

// Index of the largest element, the first one on ties; NaNs are skipped. Returns -1 when n <= 0
// or every element is NaN.
int64_t argmax(const float* x, int64_t n);

}  // namespace cortex::kernels
