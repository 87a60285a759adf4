#include "kernels/quant.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include <sys/mman.h>

#include "kernels/kernel_set.h"
#include "kernels/parallel_ranges.h"

namespace cortex::kernels {

namespace {

using detail::forRanges;
using detail::kParallelMinMacs;

constexpr size_t kHugePage = size_t{2} << 20;

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
  return type == WeightType::Q4_0 || type == WeightType::Q4_1 || type == WeightType::Q8_0;
}

size_t PackedWeights::groupBlockBytes(WeightType type) {
  switch (type) {
    case WeightType::Q4_0: return 32 + 4 * 64;
    case WeightType::Q4_1: return 64 + 4 * 64;
    case WeightType::Q8_0: return 32 + 8 * 64;
    default: return 0;
  }
}

std::vector<PackedWeights> PackedWeights::packAll(const std::vector<WeightMatrix>& ws) {
  size_t total = 0;
  for (const WeightMatrix& w : ws) {
    validate(w);
    if (!packable(w.type)) {
      throw std::invalid_argument(std::string("PackedWeights: type ") + toString(w.type) +
                                  " has no integer path (Q4_0, Q4_1, Q8_0 do)");
    }
    const int64_t groups = (w.rows + kPackRows - 1) / kPackRows;
    total += static_cast<size_t>(groups * (w.cols / kQuantBlock)) * groupBlockBytes(w.type);
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
  const size_t cell = groupBlockBytes(type_);
  const int64_t nb = blocksPerRow();
  std::memset(data_, 0, bytes());
  const size_t srcBlock = blockBytes(type_);
  const size_t scaleBytes = type_ == WeightType::Q4_1 ? 64 : 32;
  for (int64_t r = 0; r < rows_; ++r) {
    const int64_t g = r / kPackRows;
    const auto i = static_cast<size_t>(r % kPackRows);
    const std::byte* src = w.rowPtr(r);
    for (int64_t b = 0; b < nb; ++b, src += srcBlock) {
      std::byte* cellp = data_ + static_cast<size_t>(g * nb + b) * cell;
      std::byte* quads = cellp + scaleBytes;
      std::memcpy(cellp + 2 * i, src, 2);  // d
      switch (type_) {
        case WeightType::Q4_0:
          for (size_t j = 0; j < 4; ++j) std::memcpy(quads + j * 64 + i * 4, src + 2 + 4 * j, 4);
          break;
        case WeightType::Q4_1:
          std::memcpy(cellp + 32 + 2 * i, src + 2, 2);  // m
          for (size_t j = 0; j < 4; ++j) std::memcpy(quads + j * 64 + i * 4, src + 4 + 4 * j, 4);
          break;
        default:  // Q8_0: q + 128
          for (size_t j = 0; j < 8; ++j) {
            for (size_t k = 0; k < 4; ++k) {
              quads[j * 64 + i * 4 + k] = src[2 + 4 * j + k] ^ std::byte{0x80};
            }
          }
          break;
      }
    }
  }
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
