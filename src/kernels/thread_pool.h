// The kernels' worker threads: a parallel-for that stays fast on a busy machine.
//
// OpenMP's static split makes every region wait at a barrier for its slowest thread, so one
// descheduled thread on a shared 2-core machine stalls a region for a whole OS time slice (we saw
// ~12 ms stalls, hundreds per token). Here work is split into chunks that threads claim one at a
// time; the caller claims chunks too, and waits only for chunks another thread has actually
// started. A worker that wakes late finds nothing left and goes back to waiting. Which thread runs
// a chunk never changes what the chunk computes, so results are identical for any thread count.
//
// A pool is an ordinary object: whoever runs kernels creates one with the thread count it wants
// and passes it to every kernel that parallelises. There is no process-wide pool, so two engines
// (or a test and a benchmark) with their own pools never wait on each other.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

namespace cortex::kernels {

class ThreadPool {
 public:
  // A pool of `threads` threads, the caller of parallelFor included: threads - 1 workers are
  // started here and live until the pool is destroyed. threads <= 0 means one per hardware
  // thread (at least 1). Throws std::system_error when a worker cannot be started (the ones
  // already started are stopped first).
  explicit ThreadPool(int threads);

  // Stops and joins the workers. Must not run while a parallelFor on this pool is in progress.
  ~ThreadPool();

  // note: workers hold the address of the pool's state, and kernels' scratch is sized from the
  // pool, so a pool is neither copied nor moved; hold it by value or behind a pointer.
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ThreadPool(ThreadPool&&) = delete;
  ThreadPool& operator=(ThreadPool&&) = delete;

  // Threads that run chunks, the caller included; >= 1 and fixed for the pool's life.
  int size() const;

  // Runs fn(chunk, worker) for every chunk in [0, nChunks) and returns when all are done;
  // nothing for nChunks <= 0. Throws std::invalid_argument (before running anything) when
  // nChunks >= 2^20.
  //
  // worker is in [0, size()) and unique among the calls of fn running at the same time, so it can
  // index per-thread scratch; the calling thread runs chunks as worker 0. Chunks are claimed in
  // increasing order but may run concurrently and finish in any order.
  //
  // If fn throws, no further chunks are started, the chunks already started are waited for, and
  // the first exception thrown is rethrown here; later ones are dropped. Chunks never started are
  // skipped, so the output of such a job is partial. The pool is unaffected and the next call
  // runs normally.
  //
  // Calls from several threads on the same pool are serialised (each job takes the pool's own
  // caller lock for its whole run); calls on different pools share nothing and run at the same
  // time. fn must not call parallelFor on the same pool (that would wait on itself); using
  // another pool from inside fn is fine.
  //
  // Workers spin for a short while after each job before they sleep, so the gaps between the
  // kernels of one forward pass cost no wake-up; several pools kept busy at once on a small
  // machine therefore compete for its cores.
  void parallelFor(int64_t nChunks, const std::function<void(int64_t chunk, int worker)>& fn);

 private:
  class State;
  std::unique_ptr<State> state_;
};

}  // namespace cortex::kernels
