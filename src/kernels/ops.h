// Element-wise and per-row operations of the transformer forward pass (float32 activations).
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

// How RoPE pairs a head's dimensions (ggml's names): Normal rotates adjacent pairs (x[2i],
// x[2i+1]) (Llama as GGUF stores it); Neox rotates (x[i], x[i + rotDim/2]) (Qwen, Gemma).
enum class RopeStyle { Normal, Neox };

// The RoPE of one kind of attention layer: style, rotated dimensions and the frequency of each
// pair i in [0, rotDim/2):
//   freq_i = freqScale * theta^(-2i/rotDim) / factor_i
// where factor_i comes from freqFactors (Llama 3's per-frequency scaling; empty means all 1) and
// freqScale is linear position scaling (1 / the scaling factor). Frequencies are kept in double.
class Rope {
 public:
  // rotDim even, >= 2; theta > 0; freqScale > 0; freqFactors empty or rotDim/2 positive values;
  // attnFactor > 0 multiplies every cos and sin (a magnitude scale some files ask for, 1 for
  // most). Throws std::invalid_argument otherwise.
  Rope(RopeStyle style, int32_t rotDim, double theta, double freqScale = 1.0,
       std::vector<float> freqFactors = {}, double attnFactor = 1.0);
  RopeStyle style() const { return style_; }
  // A pure rotation by `delta` positions (any sign) in the angles' layout, without the attention
  // factor: applied to keys already rotated at p, it gives keys rotated at p + delta.
  void rotation(int32_t delta, float* cs) const;
  int32_t rotDim() const { return rotDim_; }
  // For each of nTokens positions, rotDim/2 cos values then rotDim/2 sin values of the angles
  // pos * freq_i (computed in double, rounded to float once) into cs (nTokens * rotDim floats).
  // Called once per forward pass for the batch's positions; every layer of this kind reuses it.
  // Throws std::out_of_range for a negative position.
  void angles(const int32_t* positions, int64_t nTokens, float* cs) const;

 private:
  RopeStyle style_;
  int32_t rotDim_;
  std::vector<double> freq_;
  double attnFactor_;
};

// RoPE in place. x holds nTokens rows of nHeads * headDim floats (head-major within a row);
// cs holds each token's angles from Rope::angles (rotDim/2 cos, then rotDim/2 sin). In each head,
// pair i (see RopeStyle) (a, b) is rotated by its angle:
//   a' = a cos - b sin,  b' = a sin + b cos.
// Dims >= rotDim are left alone. Throws std::invalid_argument when rotDim > headDim.
void ropeInPlace(float* x, int64_t nTokens, int32_t nHeads, int32_t headDim, const float* cs,
                 int32_t rotDim, RopeStyle style);

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + exp(-gate[i])) * up[i], i in [0, n).
// out may alias gate or up.
void swiglu(const float* gate, const float* up, int64_t n, float* out);

// out[i] = gelu(gate[i]) * up[i] (GeGLU), gelu the tanh approximation:
//   gelu(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) = g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3)).
// out may alias gate or up.
void geglu(const float* gate, const float* up, int64_t n, float* out);

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
