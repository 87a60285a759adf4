// The kernels' worker threads: a parallel-for that stays fast on a busy machine.
//
// OpenMP's static split makes every region wait at a barrier for its slowest thread, so one
// descheduled thread on a shared 2-core machine stalls a region for a whole OS time slice (we saw
// ~12 ms stalls, hundreds per token). Here work is split into chunks that threads claim one at a
// time; the caller claims chunks too, and waits only for chunks another thread has actually
// started. A worker that wakes late finds nothing left and goes back to waiting. Which thread runs
// a chunk never changes what the chunk computes, so results are identical for any thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace cortex::kernels {

// Threads the kernels use, the caller included; n <= 0 means one per hardware thread. Not to be
// called while kernels run.
void setNumThreads(int n);
int numThreads();

// Runs fn(chunk, worker) for every chunk in [0, nChunks) (nChunks < 2^20) and returns when all
// are done. worker is in [0, numThreads()) and unique among concurrently running calls of fn
// (index per-thread scratch with it). Calls from several threads at once are serialised.
void parallelFor(int64_t nChunks, const std::function<void(int64_t chunk, int worker)>& fn);

}  // namespace cortex::kernels
