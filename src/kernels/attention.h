// Causal, grouped-query attention over a paged KV cache, read in place through block tables.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/thread_pool.h"
#include "kv/paged_view.h"

namespace cortex::kernels {

// Floats of scratch pagedAttention on `pool` needs when the views hold up to maxKeyTokens
// positions: 4 score rows per thread of the pool, so a buffer sized for one pool and key count
// also serves pools with no more threads and calls with no more keys. The caller owns the buffer
// and reuses it across calls and layers; two calls running at the same time need two buffers,
// even on the same pool.
size_t pagedAttentionScratchFloats(const ThreadPool& pool, int32_t maxKeyTokens);

// out[i][h][:] = sum_{j <= p_i} softmax_j(scale * Q[i][h] . K[j][kvh]) * V[j][kvh], where
// p_i = firstQueryPos + i is the absolute position of query token i and kvh = h / (nHeads /
// K.numKVHeads) (grouped-query attention).
//   Q:   nQueryTokens x (nHeads * headDim) floats, head-major within a token.
//   K,V: views of one layer of one sequence with numTokens >= firstQueryPos + nQueryTokens, same
//        numKVHeads and headDim (a multiple of 8); dtype F32, F16 or BF16; any strides.
//   out: nQueryTokens x (nHeads * headDim) floats (must not alias Q).
//   scratch: at least pagedAttentionScratchFloats(pool, firstQueryPos + nQueryTokens) floats.
// Throws std::invalid_argument on inconsistent shapes (nothing written). Runs on all of `pool`'s
// threads when there is enough work (see below), otherwise on the calling thread alone; the pool
// is only borrowed for the call.
//
// Numerics (batch-invariant): each (token, head) is computed by one thread, independently of the
// others: scores are 8-lane fma dot products (simd.h) times scale, the softmax subtracts the max
// and sums exp() in key order in double, and each output dim accumulates p_j * V[j] with fma in
// key order, then multiplies by 1/sum. So a token's output depends only on its query, its
// position and the cached K/V, not on nQueryTokens, pool.size() or the instruction-set
// level (isa.h; the AVX2 and scalar code agree to the bit).
//
// Work layout: one work item is (query token, KV head, up to 4 of its query heads), so each K/V
// row is read and converted once for the heads that share it; items are spread over the pool's
// threads (dynamic schedule) when there are at least ~16k multiply-adds. exp() is the canonical
// polynomial of simd.h (within 2 ulp), vectorized.
void pagedAttention(ThreadPool& pool, const float* Q, int32_t nQueryTokens, int32_t firstQueryPos,
                    int32_t nHeads, const kv::PagedKVView& K, const kv::PagedKVView& V,
                    float scale, float* out, float* scratch);

}  // namespace cortex::kernels
