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

// out[i][h][:] = sum_{j in R_i} softmax_j(scale * Q[i][h] . K[j][kvh]) * V[j][kvh], where
// p_i = firstQueryPos + i is the absolute position of query token i, kvh = h / (nHeads /
// K.numKVHeads) (grouped-query attention), and R_i = [lo_i, p_i] with lo_i = 0, or with a sliding
// window of windowTokens > 0 positions, lo_i = max(0, p_i - windowTokens + 1): a query sees itself
// and the windowTokens - 1 keys before it. With a window, sinkTokens > 0 attention sinks
// (StreamingLLM) are seen as well: R_i = [0, sinkTokens) u [lo_i, p_i], which is [0, p_i] when
// lo_i <= sinkTokens (no gap). Keys outside R_i are never read, so their blocks may be gone
// (kv::kNoBlock), except those another query of the same call reads. sinkTokens without a window
// changes nothing.
//   Q:   nQueryTokens x (nHeads * headDim) floats, head-major within a token.
//   K,V: views of one layer of one sequence with numTokens >= firstQueryPos + nQueryTokens, same
//        numKVHeads and headDim (a multiple of 8); dtype F32, F16 or BF16 (mixed freely), or Q8
//        for both (int8 values read as they are, each row's scale applied once: see below); any
//        strides.
//   out: nQueryTokens x (nHeads * headDim) floats (must not alias Q).
//   scratch: at least pagedAttentionScratchFloats(pool, firstQueryPos + nQueryTokens) floats.
// Throws std::invalid_argument on inconsistent shapes or a negative windowTokens or sinkTokens
// (nothing written). Runs on all of `pool`'s threads when there is enough work (see below),
// otherwise on the calling thread alone; the pool is only borrowed for the call.
//
// Numerics (batch-invariant): for each (token, head), with keys taken in chunks of 256 positions
// aligned from position 0 (the last one partial, and with a window the first one starts at lo_i;
// chunks wholly before lo_i are skipped). A query with sinks and no gap takes the chunks of full
// attention, so its output has the bits it has without a window; with a gap (lo_i > sinkTokens)
// the sink chunks [256c, min(sinkTokens, 256(c + 1))) come first, then the window's chunks:
//   score_j = (fma chain over d = 0, 1, ... of q[d] * k_j[d], from 0) * (c_j * scale), with c_j
//   the key row's scale (Q8; k_j its int8 values) or 1 (exact: the float formats' bits are those
//   of a plain * scale);
//   per chunk c: m_c = its largest score, e_j = exp(score_j - m_c) (the canonical polynomial of
//   simd.h, within 2 ulp), l_c = sum of its e_j in double (8 lanes by j mod 8, then a fixed
//   order), o_c[d] = sum of (e_j * c'_j) * v_j[d] (fma in key order, from 0; c'_j the value
//   row's scale or 1);
//   merged in chunk order: with M = max m_c and w_c = exp(m_c - M),
//   out[d] = (sum_c w_c o_c[d], fma from 0) * float(1 / sum_c w_c l_c)
//   (one chunk: w = 1 exactly, out = o * 1/l).
// So a token's output depends only on its query, its position and the cached K/V, not on
// nQueryTokens, the other tokens, pool.size() or the instruction-set level (isa.h: every level
// runs these operations, with keys or dims in the SIMD lanes, and agrees with the scalar code to
// the bit).
//
// Work layout: one work item is (up to 4 consecutive query tokens, KV head, up to 4 of its query
// heads): each chunk of 8 (16 with AVX-512) K rows is converted and transposed once for the item's
// query vectors, and each V row once for its heads. A single decode token past one chunk of keys
// is instead split into (head group, chunk) items, merged afterwards, so both threads of a small
// machine work on one long sequence. Items are spread over the pool's threads (dynamic schedule)
// when there are at least ~16k multiply-adds.
void pagedAttention(ThreadPool& pool, const float* Q, int32_t nQueryTokens, int32_t firstQueryPos,
                    int32_t nHeads, const kv::PagedKVView& K, const kv::PagedKVView& V,
                    float scale, float* out, float* scratch, int32_t windowTokens = 0,
                    int32_t sinkTokens = 0);

}  // namespace cortex::kernels
