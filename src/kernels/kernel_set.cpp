#include "kernels/kernel_set.h"

#include "kernels/attention.h"
#include "kernels/matmul.h"

#include <stdexcept>
#include <string>

namespace cortex::kernels::detail {

namespace {
// note: the float matmul has no VNNI-specific code and attention none for AVX-VNNI; those levels
// use the AVX2 compilation of them (AVX512-VNNI has its own attention, 16 lanes wide).
const KernelSet kSets[] = {
    {Isa::Scalar, isa_scalar::matmulFloat, isa_scalar::pagedAttention, isa_scalar::quantizeRows,
     isa_scalar::packedGroups},
    {Isa::Avx2, isa_avx2::matmulFloat, isa_avx2::pagedAttention, isa_avx2::quantizeRows,
     isa_avx2::packedGroups},
    {Isa::AvxVnni, isa_avx2::matmulFloat, isa_avx2::pagedAttention, isa_avxvnni::quantizeRows,
     isa_avxvnni::packedGroups},
    {Isa::Avx512Vnni, isa_avx2::matmulFloat, isa_avx512vnni::pagedAttention,
     isa_avx512vnni::quantizeRows, isa_avx512vnni::packedGroups},
};
}  // namespace

const KernelSet& kernelSet(Isa isa) {
  if (!cpuSupports(isa)) {
    throw std::invalid_argument(std::string("kernel level ") + toString(isa) +
                                " is not supported by this CPU");
  }
  return kSets[static_cast<int>(isa)];
}

const KernelSet& activeKernelSet() {
  static const KernelSet& set = kernelSet(activeIsa());
  return set;
}

}  // namespace cortex::kernels::detail

namespace cortex::kernels {

void matmul(ThreadPool& pool, const WeightMatrix& W, const float* X, int64_t nTokens, float* Y) {
  validate(W);
  if (nTokens <= 0) return;
  detail::activeKernelSet().matmulFloat(pool, W, X, nTokens, Y);
}

size_t pagedAttentionScratchFloats(const ThreadPool& pool, int32_t maxKeyTokens) {
  return static_cast<size_t>(pool.size()) * detail::kAttentionMaxGroup *
         detail::kAttentionTileTokens * detail::scoreStride(maxKeyTokens);
}

void pagedAttention(ThreadPool& pool, const float* Q, int32_t nQueryTokens, int32_t firstQueryPos,
                    int32_t nHeads, const kv::PagedKVView& K, const kv::PagedKVView& V,
                    float scale, float* out, float* scratch, int32_t windowTokens,
                    int32_t sinkTokens) {
  detail::activeKernelSet().pagedAttention(pool, Q, nQueryTokens, firstQueryPos, nHeads, K, V,
                                           scale, out, scratch, windowTokens, sinkTokens);
}

}  // namespace cortex::kernels
