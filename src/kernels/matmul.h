// Matrix-vector and matrix-matrix products against weights in their stored (quantized) type.
#pragma once

#include <cstdint>

#include "kernels/thread_pool.h"
#include "kernels/weights.h"

namespace cortex::kernels {

// Y[t][r] = sum_c W[r][c] * X[t][c] for t in [0, nTokens), r in [0, W.rows).
// X: nTokens x W.cols floats, row-major; Y: nTokens x W.rows floats, row-major (must not alias X).
// nTokens >= 1 (a smaller count writes nothing). Throws std::invalid_argument when W fails
// validate() (nothing written), std::bad_alloc when a thread's scratch cannot grow (Y then partly
// written). Runs on all of `pool`'s threads when the product is large enough to pay for them,
// otherwise on the calling thread alone; the pool is only borrowed for the call.
//
// Weights are dequantized in registers block by block (to the canonical floats of weights.h) and
// read once per call for the whole batch. Numerics (batch-invariant): each Y[t][r] is the 8-lane
// dot product of simd.h (lane l accumulates columns c = l mod 8 in increasing c with fma, then a
// fixed lane sum), so it does not depend on nTokens, on the other rows of X, on pool.size() or on
// the instruction-set level (isa.h: every level runs the AVX2 or the scalar code, which agree to
// the bit). This is the float path; quant.h has the integer one.
//
// Work layout: output rows are split across threads in contiguous ranges. Below 4 tokens (decode)
// each thread streams its rows 4 at a time, dequantizing a block into registers and FMA-ing it
// with each token's activations (the 4 rows stay in L1 between tokens, so weights come from memory
// once). From 4 tokens on (prefill), each thread dequantizes 3 rows into an L1 buffer and runs a
// 3-row x 4-token register tile over 32-token chunks of X (which stay in L1/L2); the rows are
// dequantized once per 32-token chunk, i.e. weights are re-read ceil(nTokens/32) times, a few
// percent of the FMA time. Small scratch: one thread_local buffer of 3 * cols floats per thread,
// grown once. Thread-safe: concurrent calls with different Y buffers are fine; on the same pool
// their parallel parts take turns (ThreadPool::parallelFor), on different pools they overlap.
void matmul(ThreadPool& pool, const WeightMatrix& W, const float* X, int64_t nTokens, float* Y);

}  // namespace cortex::kernels
