// Internal to the kernels: splitting a product's rows (or row groups) over a pool's threads.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/thread_pool.h"

namespace cortex::kernels::detail {

// Below this many multiply-adds one thread does the whole product: waking the others costs more.
inline constexpr int64_t kParallelMinMacs = 1 << 15;

// Chunks per thread: a thread that gets the core late (a busy machine) leaves its chunks to the
// others instead of stalling the whole product.
inline constexpr int kChunksPerThread = 4;

// Runs body(i0, i1) over ranges covering [0, n), each a whole number of `unit`s (so tiles stay
// whole; the last range ends at n), on the pool's threads when `parallel`, otherwise inline.
// Who runs a range never changes what it computes.
template <class Body>
void forRanges(ThreadPool& pool, int64_t n, int64_t unit, bool parallel, Body&& body) {
  const int64_t units = (n + unit - 1) / unit;
  if (!parallel || pool.size() == 1 || units < 2) {
    body(int64_t{0}, n);
    return;
  }
  const int64_t nChunks = std::min<int64_t>(units, int64_t{pool.size()} * kChunksPerThread);
  pool.parallelFor(nChunks, [&](int64_t c, int) {
    const int64_t per = units / nChunks, extra = units % nChunks;
    const int64_t u0 = c * per + std::min(c, extra);
    const int64_t u1 = u0 + per + (c < extra ? 1 : 0);
    body(std::min(n, u0 * unit), std::min(n, u1 * unit));
  });
}

}  // namespace cortex::kernels::detail
