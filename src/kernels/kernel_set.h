// Internal to the kernels: the table of kernel entry points of one instruction-set level.
//
// matmul.cpp, attention.cpp and quant_kernels.cpp are compiled once per level they serve (see
// CMakeLists.txt), each time into its own namespace detail::isa_<level>; kernel_set.cpp gathers
// them into one KernelSet per level, and the public functions call the active level's set.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/isa.h"
#include "kernels/quant.h"
#include "kernels/thread_pool.h"
#include "kernels/weights.h"
#include "kv/paged_view.h"

namespace cortex::kernels::detail {

using MatmulFloatFn = void (*)(ThreadPool& pool, const WeightMatrix& W, const float* X,
                               int64_t nTokens, float* Y);
using AttentionFn = void (*)(ThreadPool& pool, const float* Q, int32_t nQueryTokens,
                             int32_t firstQueryPos, int32_t nHeads, const kv::PagedKVView& K,
                             const kv::PagedKVView& V, float scale, float* out, float* scratch,
                             int32_t windowTokens, int32_t sinkTokens);
// Quantizes rows [r0, r1) of X into out (already resized to X's shape).
using QuantizeRowsFn = void (*)(const float* X, int64_t r0, int64_t r1, QuantizedActivations& out);
// Row groups [g0, g1) of the integer matmul, for every token of X (shapes already checked).
using PackedGroupsFn = void (*)(const PackedWeights& W, const QuantizedActivations& X, float* Y,
                                int64_t g0, int64_t g1);

// Largest number of query heads and of query tokens one attention work item handles together, and
// the padded length of a row of attention scores; pagedAttentionScratchFloats is built from them.
inline constexpr int kAttentionMaxGroup = 4;
inline constexpr int kAttentionTileTokens = 4;
// Keys are attended in chunks of this many positions (aligned on multiples of it from position 0;
// a sliding window clips the first one, and the attention sinks before a window's gap form chunks
// of their own): each chunk's softmax and weighted values are computed on their own and merged in
// chunk order (attention.h), so one decode token's chunks can run on different threads.
inline constexpr int32_t kAttentionChunkKeys = 256;
inline size_t scoreStride(int32_t maxKeyTokens) {
  return (static_cast<size_t>(maxKeyTokens < 1 ? 1 : maxKeyTokens) + 15) / 16 * 16;
}

struct KernelSet {
  Isa isa;
  MatmulFloatFn matmulFloat;
  AttentionFn pagedAttention;
  QuantizeRowsFn quantizeRows;
  PackedGroupsFn packedGroups;
};

// The set of `isa`. Throws std::invalid_argument when the CPU does not support it.
const KernelSet& kernelSet(Isa isa);
// kernelSet(activeIsa()).
const KernelSet& activeKernelSet();

// Each level's entry points (defined in the per-level compilations).
#define CS_DECLARE_LEVEL(ns)                                                                   \
  namespace ns {                                                                               \
  void matmulFloat(ThreadPool& pool, const WeightMatrix& W, const float* X, int64_t nTokens,    \
                   float* Y);                                                                  \
  void pagedAttention(ThreadPool& pool, const float* Q, int32_t nQueryTokens,                  \
                      int32_t firstQueryPos, int32_t nHeads, const kv::PagedKVView& K,         \
                      const kv::PagedKVView& V, float scale, float* out, float* scratch,       \
                      int32_t windowTokens, int32_t sinkTokens);                               \
  void quantizeRows(const float* X, int64_t r0, int64_t r1, QuantizedActivations& out);         \
  void packedGroups(const PackedWeights& W, const QuantizedActivations& X, float* Y, int64_t g0, \
                    int64_t g1);                                                               \
  }
CS_DECLARE_LEVEL(isa_scalar)
CS_DECLARE_LEVEL(isa_avx2)
CS_DECLARE_LEVEL(isa_avxvnni)
CS_DECLARE_LEVEL(isa_avx512vnni)
#undef CS_DECLARE_LEVEL

}  // namespace cortex::kernels::detail
