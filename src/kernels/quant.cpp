#include "kernels/quant.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <sys/mman.h>

#include "kernels/ggml_blocks.h"
#include "kernels/kernel_set.h"
#include "kernels/packed_layout.h"
#include "kernels/parallel_ranges.h"

namespace cortex::kernels {

namespace {

using detail::forRanges;
using detail::kParallelMinMacs;

constexpr size_t kHugePage = size_t{2} << 20;

using detail::PackedLayout;

template <class F>
decltype(auto) withPackable(WeightType type, F&& f) {
  switch (type) {
    case WeightType::Q4_0: return f(std::integral_constant<WeightType, WeightType::Q4_0>{});
    case WeightType::Q4_1: return f(std::integral_constant<WeightType, WeightType::Q4_1>{});
    case WeightType::Q8_0: return f(std::integral_constant<WeightType, WeightType::Q8_0>{});
    case WeightType::Q5_0: return f(std::integral_constant<WeightType, WeightType::Q5_0>{});
    case WeightType::Q5_1: return f(std::integral_constant<WeightType, WeightType::Q5_1>{});
    case WeightType::Q2_K: return f(std::integral_constant<WeightType, WeightType::Q2_K>{});
    case WeightType::Q3_K: return f(std::integral_constant<WeightType, WeightType::Q3_K>{});
    case WeightType::Q4_K: return f(std::integral_constant<WeightType, WeightType::Q4_K>{});
    case WeightType::Q5_K: return f(std::integral_constant<WeightType, WeightType::Q5_K>{});
    case WeightType::Q6_K: return f(std::integral_constant<WeightType, WeightType::Q6_K>{});
    default: throw std::logic_error("withPackable: not a packable type");
  }
}

// --- writing the data blocks of quant.h for row i from its 32 unsigned values u ---

void putNibbles(std::byte* blk, size_t i, const uint8_t* u) {
  for (size_t j = 0; j < 4; ++j) {
    for (size_t k = 0; k < 4; ++k) {
      blk[64 * j + 4 * i + k] =
          static_cast<std::byte>((u[4 * j + k] & 0x0F) | (u[16 + 4 * j + k] & 0x0F) << 4);
    }
  }
}

void putBit4Plane(std::byte* plane, size_t i, const uint8_t* u) {
  for (size_t k = 0; k < 4; ++k) {
    unsigned v = 0;
    for (unsigned n = 0; n < 2; ++n) {
      for (unsigned j = 0; j < 4; ++j) v |= ((u[16 * n + 4 * j + k] >> 4) & 1u) << (j + 4 * n);
    }
    plane[4 * i + k] = static_cast<std::byte>(v);
  }
}

void putQ6HighPlanes(std::byte* planes, size_t i, const uint8_t* u) {
  for (size_t n = 0; n < 2; ++n) {
    for (size_t k = 0; k < 4; ++k) {
      unsigned v = 0;
      for (unsigned j = 0; j < 4; ++j) v |= ((u[16 * n + 4 * j + k] >> 4) & 3u) << (2 * j);
      planes[64 * n + 4 * i + k] = static_cast<std::byte>(v);
    }
  }
}

void putTwoBitPlanes(std::byte* planes, size_t i, const uint8_t* u) {
  for (size_t p = 0; p < 2; ++p) {
    for (size_t k = 0; k < 4; ++k) {
      unsigned v = 0;
      for (unsigned s = 0; s < 4; ++s) v |= (u[16 * p + 4 * s + k] & 3u) << (2 * s);
      planes[64 * p + 4 * i + k] = static_cast<std::byte>(v);
    }
  }
}

void putQ3HighPlane(std::byte* plane, size_t i, const uint8_t* u) {
  for (size_t k = 0; k < 4; ++k) {
    unsigned v = 0;
    for (unsigned j = 0; j < 8; ++j) v |= ((u[4 * j + k] >> 2) & 1u) << j;
    plane[4 * i + k] = static_cast<std::byte>(v);
  }
}

// The data block of row i for 32 values u, in the type's form.
void putData(detail::PackedData data, std::byte* blk, size_t i, const uint8_t* u) {
  using detail::PackedData;
  switch (data) {
    case PackedData::Nibbles: return putNibbles(blk, i, u);
    case PackedData::Bytes:
      for (size_t j = 0; j < 8; ++j) {
        for (size_t k = 0; k < 4; ++k) blk[64 * j + 4 * i + k] = static_cast<std::byte>(u[4 * j + k]);
      }
      return;
    case PackedData::Nibbles5:
      putNibbles(blk, i, u);
      return putBit4Plane(blk + 256, i, u);
    case PackedData::Nibbles6:
      putNibbles(blk, i, u);
      return putQ6HighPlanes(blk + 256, i, u);
    case PackedData::TwoBit: return putTwoBitPlanes(blk, i, u);
    case PackedData::TwoBit3:
      putTwoBitPlanes(blk, i, u);
      return putQ3HighPlane(blk + 128, i, u);
  }
}

void copyHalf(std::byte* dst, const std::byte* src, bool negate) {
  std::memcpy(dst, src, 2);
  if (negate) dst[1] ^= std::byte{0x80};  // the sign bit of a little-endian fp16
}

// Packs the ggml block `src` (one cell's columns of one row) as row i of the cell at `cell`.
template <WeightType WT>
void packCell(const std::byte* src, std::byte* cell, size_t i) {
  using L = PackedLayout<WT>;
  namespace d = detail;
  uint8_t u[256];
  std::byte* data = cell + L::kHeader;
  if constexpr (WT == WeightType::Q8_0) {
    copyHalf(cell + 2 * i, src, false);
    for (int e = 0; e < 32; ++e) u[e] = static_cast<uint8_t>(d::byteAt(src, 2 + e) ^ 0x80);
  } else if constexpr (WT == WeightType::Q4_0 || WT == WeightType::Q4_1) {
    const int qs = WT == WeightType::Q4_0 ? 2 : 4;
    copyHalf(cell + 2 * i, src, false);
    if constexpr (WT == WeightType::Q4_1) copyHalf(cell + L::kM + 2 * i, src + 2, false);
    for (int j = 0; j < 16; ++j) {
      u[j] = d::byteAt(src, qs + j) & 0x0F;
      u[j + 16] = d::byteAt(src, qs + j) >> 4;
    }
  } else if constexpr (WT == WeightType::Q5_0) {
    copyHalf(cell + 2 * i, src + d::Q5_0Block::kD, false);
    d::unpackQ5(src + d::Q5_0Block::kQh, src + d::Q5_0Block::kQs, u);
  } else if constexpr (WT == WeightType::Q5_1) {
    copyHalf(cell + 2 * i, src + d::Q5_1Block::kD, false);
    copyHalf(cell + L::kM + 2 * i, src + d::Q5_1Block::kM, false);
    d::unpackQ5(src + d::Q5_1Block::kQh, src + d::Q5_1Block::kQs, u);
  } else if constexpr (WT == WeightType::Q4_K || WT == WeightType::Q5_K) {
    using B = std::conditional_t<WT == WeightType::Q4_K, d::Q4_KBlock, d::Q5_KBlock>;
    copyHalf(cell + 2 * i, src + B::kD, false);
    copyHalf(cell + L::kNegDmin + 2 * i, src + B::kDmin, true);
    for (size_t p = 0; p < 12; ++p) cell[L::kScales + 16 * p + i] = src[B::kScales + p];
    uint8_t sc[8], m[8];
    if constexpr (WT == WeightType::Q4_K) {
      d::unpackQ4K(src, u, sc, m);
    } else {
      d::unpackQ5K(src, u, sc, m);
    }
  } else if constexpr (WT == WeightType::Q6_K) {
    copyHalf(cell + 2 * i, src + d::Q6_KBlock::kD, false);
    int8_t sc[16];
    d::unpackQ6K(src, u, sc);
    for (size_t q = 0; q < 16; ++q) cell[L::kScales + 16 * q + i] = static_cast<std::byte>(sc[q]);
  } else if constexpr (WT == WeightType::Q3_K) {
    copyHalf(cell + 2 * i, src + d::Q3_KBlock::kD, false);
    for (size_t p = 0; p < 12; ++p) cell[L::kScales + 16 * p + i] = src[d::Q3_KBlock::kScales + p];
    int8_t sc[16];
    d::unpackQ3K(src, u, sc);
  } else {
    static_assert(WT == WeightType::Q2_K);
    copyHalf(cell + 2 * i, src + d::Q2_KBlock::kD, false);
    copyHalf(cell + L::kNegDmin + 2 * i, src + d::Q2_KBlock::kDmin, true);
    for (size_t q = 0; q < 16; ++q) cell[L::kScales + 16 * q + i] = src[d::Q2_KBlock::kScales + q];
    uint8_t sc[16], m[16];
    d::unpackQ2K(src, u, sc, m);
  }
  for (int s = 0; s < L::kCellElems / 32; ++s) {
    putData(L::kData, data + static_cast<size_t>(s) * d::kPackedBlockBytes<WT>, i, u + 32 * s);
  }
}

}  // namespace

void QuantizedActivations::resize(int64_t nRows, int64_t nCols) {
  rows = nRows;
  cols = nCols;
  const auto n = static_cast<size_t>(nRows * nCols);
  const auto nb = static_cast<size_t>(nRows * (nCols / kQuantBlock));
  if (q.size() < n) q.resize(n);
  if (d.size() < nb) {
    d.resize(nb);
    sum.resize(nb);
    dsum.resize(nb);
    sumLo.resize(nb);
  }
}

void quantizeActivations(ThreadPool& pool, const float* X, int64_t rows, int64_t cols,
                         QuantizedActivations& out) {
  if (cols <= 0 || cols % kQuantBlock != 0) {
    throw std::invalid_argument("quantizeActivations: cols = " + std::to_string(cols) +
                                " is not a positive multiple of 32");
  }
  out.resize(std::max<int64_t>(rows, 0), cols);
  if (rows <= 0) return;
  const detail::QuantizeRowsFn fn = detail::activeKernelSet().quantizeRows;
  forRanges(pool, rows, 1, rows * cols >= (1 << 16),
            [&](int64_t r0, int64_t r1) { fn(X, r0, r1, out); });
}

bool PackedWeights::packable(WeightType type) {
  return type != WeightType::F32 && type != WeightType::F16 && type != WeightType::BF16;
}

int64_t PackedWeights::cellElems(WeightType type) { return isKQuant(type) ? 256 : kQuantBlock; }

size_t PackedWeights::groupCellBytes(WeightType type) {
  if (!packable(type)) return 0;
  return withPackable(type, [](auto wt) -> size_t {
    return static_cast<size_t>(detail::kPackedCellBytes<decltype(wt)::value>);
  });
}

std::vector<PackedWeights> PackedWeights::packAll(const std::vector<WeightMatrix>& ws) {
  size_t total = 0;
  for (const WeightMatrix& w : ws) {
    validate(w);
    if (!packable(w.type)) {
      throw std::invalid_argument(std::string("PackedWeights: type ") + toString(w.type) +
                                  " has no integer path (the quantized types do)");
    }
    const int64_t groups = (w.rows + kPackRows - 1) / kPackRows;
    total += static_cast<size_t>(groups * (w.cols / cellElems(w.type))) * groupCellBytes(w.type);
  }
  // note: aligned_alloc wants a multiple of the alignment; every cell is a multiple of 32 bytes.
  const size_t align = total >= kHugePage ? kHugePage : 64;
  const size_t bytes = std::max<size_t>((total + align - 1) / align * align, align);
  std::shared_ptr<std::byte> storage(static_cast<std::byte*>(std::aligned_alloc(align, bytes)),
                                     [](std::byte* p) { std::free(p); });
  if (!storage) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (align == kHugePage) madvise(storage.get(), bytes, MADV_HUGEPAGE);  // a hint: may fail
#endif
  std::vector<PackedWeights> out;
  out.reserve(ws.size());
  size_t offset = 0;
  for (const WeightMatrix& w : ws) {
    out.push_back(PackedWeights(w, storage, storage.get() + offset));
    offset += out.back().bytes();
  }
  return out;
}

PackedWeights::PackedWeights(const WeightMatrix& w, std::shared_ptr<std::byte> storage,
                             std::byte* data)
    : type_(w.type), rows_(w.rows), cols_(w.cols), storage_(std::move(storage)), data_(data) {
  const size_t cell = groupCellBytes(type_);
  const int64_t nc = cellsPerRow();
  std::memset(data_, 0, bytes());
  const size_t srcBlock = blockBytes(type_);  // a ggml block covers one cell's columns
  withPackable(type_, [&](auto wt) {
    for (int64_t r = 0; r < rows_; ++r) {
      const int64_t g = r / kPackRows;
      const auto i = static_cast<size_t>(r % kPackRows);
      const std::byte* src = w.rowPtr(r);
      for (int64_t c = 0; c < nc; ++c, src += srcBlock) {
        packCell<decltype(wt)::value>(src, data_ + static_cast<size_t>(g * nc + c) * cell, i);
      }
    }
  });
}

void matmul(ThreadPool& pool, const PackedWeights& W, const QuantizedActivations& X, float* Y) {
  if (X.cols != W.cols()) {
    throw std::invalid_argument("matmul: activations have " + std::to_string(X.cols) +
                                " features, the weights " + std::to_string(W.cols()));
  }
  if (X.rows <= 0) return;
  const detail::PackedGroupsFn fn = detail::activeKernelSet().packedGroups;
  forRanges(pool, W.groups(), 1, W.rows() * W.cols() * X.rows >= kParallelMinMacs,
            [&](int64_t g0, int64_t g1) { fn(W, X, Y, g0, g1); });
}

}  // namespace cortex::kernels
