#include "kernels/thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CS_PAUSE() _mm_pause()
#else
#define CS_PAUSE() ((void)0)
#endif

namespace cortex::kernels {

namespace {

// The job state in one word, so a claim is one compare-and-swap and can never mix two jobs:
// [generation: 24 bits][chunk count: 20 bits][next chunk: 20 bits].
constexpr uint64_t kIdxBits = 20;
constexpr uint64_t kIdxMask = (1ull << kIdxBits) - 1;
constexpr uint64_t kGenMask = (1ull << 24) - 1;
uint64_t idxOf(uint64_t s) { return s & kIdxMask; }
uint64_t countOf(uint64_t s) { return (s >> kIdxBits) & kIdxMask; }
uint64_t genOf(uint64_t s) { return s >> (2 * kIdxBits); }

// Spin this many pauses waiting for work before sleeping: covers the gaps between the kernels
// of one forward pass (microseconds) without burning a core when the engine is idle.
constexpr int kSpinPauses = 20000;

int hardwareThreads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

}  // namespace

class ThreadPool::State {
 public:
  explicit State(int n) : n_(n) {
    try {
      for (int w = 1; w < n_; ++w) workers_.emplace_back([this, w] { work(w); });
    } catch (...) {
      // note: the destructor does not run when the constructor throws, and a joinable
      // std::thread destroyed unjoined would terminate the process.
      stopWorkers();
      throw;
    }
  }
  ~State() { stopWorkers(); }

  int size() const { return n_; }

  void run(int64_t nChunks, const std::function<void(int64_t, int)>& fn) {
    if (nChunks <= 0) return;
    if (static_cast<uint64_t>(nChunks) > kIdxMask) throw std::invalid_argument("too many chunks");
    std::lock_guard callers(callerMu_);
    if (n_ == 1 || nChunks == 1) {
      // An exception simply leaves the loop: later chunks are not started, as in a shared job.
      for (int64_t c = 0; c < nChunks; ++c) fn(c, 0);
      return;
    }
    fn_ = &fn;
    remaining_.store(nChunks, std::memory_order_relaxed);
    const uint64_t gen = (genOf(state_.load(std::memory_order_relaxed)) + 1) & kGenMask;
    state_.store((gen << (2 * kIdxBits)) | (static_cast<uint64_t>(nChunks) << kIdxBits),
                 std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard lock(sleepMu_);
      sleepCv_.notify_all();
    }
    while (claimAndRun(0)) {
    }
    // Only chunks another thread has claimed are left: they are running now.
    for (int spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 1000) {
        CS_PAUSE();
      } else {
        std::this_thread::yield();
      }
    }
    fn_ = nullptr;
    // note: every chunk has finished (remaining_ was read as 0 with acquire after each one's
    // release), so no thread touches error_ any more and it can be read without errorMu_.
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  // Claims one chunk of the current job and runs it; false when nothing is left to claim.
  bool claimAndRun(int worker) {
    uint64_t s = state_.load(std::memory_order_acquire);
    while (idxOf(s) < countOf(s)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
        try {
          // note: fn_ belongs to this job: the caller cannot finish (and replace it) before this
          // claimed chunk is done.
          (*fn_)(static_cast<int64_t>(idxOf(s)), worker);
        } catch (...) {
          fail(std::current_exception());
        }
        // note: counted only once the catch block has ended, so the caller that sees the job
        // finished also sees this thread done with the exception object.
        remaining_.fetch_sub(1, std::memory_order_release);
        return true;
      }
    }
    return false;
  }

  // Keeps the job's first exception and withdraws the chunks nobody has claimed yet. Runs while
  // the failing chunk still counts in remaining_, so the job (and its generation) is current.
  void fail(std::exception_ptr e) {
    {
      std::lock_guard lock(errorMu_);
      if (!error_) error_ = std::move(e);
    }
    uint64_t s = state_.load(std::memory_order_acquire);
    while (idxOf(s) < countOf(s)) {
      // Marking every chunk claimed makes later claims fail like at the end of a normal job.
      const uint64_t done = (s & ~kIdxMask) | countOf(s);
      if (state_.compare_exchange_weak(s, done, std::memory_order_acq_rel,
                                       std::memory_order_acquire)) {
        // The withdrawn chunks will never run: they are finished as far as the caller's wait
        // is concerned.
        remaining_.fetch_sub(static_cast<int64_t>(countOf(s) - idxOf(s)),
                             std::memory_order_release);
        return;
      }
    }
  }

  bool hasWork() const {
    const uint64_t s = state_.load(std::memory_order_seq_cst);
    return idxOf(s) < countOf(s);
  }

  void work(int worker) {
    for (;;) {
      while (claimAndRun(worker)) {
      }
      bool found = false;
      for (int i = 0; i < kSpinPauses; ++i) {
        if (hasWork()) {
          found = true;
          break;
        }
        CS_PAUSE();
      }
      if (found) continue;
      std::unique_lock lock(sleepMu_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      sleepCv_.wait(lock, [&] { return stop_ || hasWork(); });
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      if (stop_) return;
    }
  }

  void stopWorkers() {
    {
      std::lock_guard lock(sleepMu_);
      stop_ = true;
    }
    sleepCv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  const int n_;
  std::vector<std::thread> workers_;
  std::mutex callerMu_;  // one job at a time
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> remaining_{0};  // chunks of the job neither finished nor withdrawn
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  std::mutex errorMu_;       // taken only when a chunk throws
  std::exception_ptr error_;  // the current job's first exception
  std::mutex sleepMu_;
  std::condition_variable sleepCv_;
  std::atomic<int> sleepers_{0};
  bool stop_ = false;
};

ThreadPool::ThreadPool(int threads)
    : state_(std::make_unique<State>(threads <= 0 ? hardwareThreads() : threads)) {}

ThreadPool::~ThreadPool() = default;

int ThreadPool::size() const { return state_->size(); }

void ThreadPool::parallelFor(int64_t nChunks,
                             const std::function<void(int64_t chunk, int worker)>& fn) {
  state_->run(nChunks, fn);
}

}  // namespace cortex::kernels
