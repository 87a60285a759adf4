// The kernels' thread pool: every chunk runs exactly once, worker ids are unique among running
// chunks, jobs from several callers are serialised. Runs under TSan in CI.
#include "kernels/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace cortex::kernels {
namespace {

TEST(ThreadPool, EveryChunkRunsOnceWithAValidWorker) {
  for (int threads : {1, 2, 3}) {
    setNumThreads(threads);
    ASSERT_EQ(numThreads(), threads);
    for (int64_t n : {1, 2, 7, 100, 5000}) {
      std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
      std::vector<std::atomic<int>> busy(static_cast<size_t>(threads));
      std::atomic<int> badWorker{0};
      parallelFor(n, [&](int64_t c, int w) {
        if (w < 0 || w >= threads || busy[static_cast<size_t>(w)].fetch_add(1) != 0) ++badWorker;
        runs[static_cast<size_t>(c)].fetch_add(1);
        busy[static_cast<size_t>(w)].fetch_sub(1);
      });
      EXPECT_EQ(badWorker.load(), 0);
      for (auto& r : runs) ASSERT_EQ(r.load(), 1);
    }
  }
  setNumThreads(0);
}

TEST(ThreadPool, ManyJobsInARowAndFromSeveralCallers) {
  setNumThreads(2);
  std::atomic<int64_t> total{0};
  auto caller = [&] {
    for (int j = 0; j < 2000; ++j) parallelFor(5, [&](int64_t c, int) { total += c + 1; });
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  EXPECT_EQ(total.load(), 2 * 2000 * 15);
  setNumThreads(0);
}

TEST(ThreadPool, ResultsDoNotDependOnTheThreadThatRunsAChunk) {
  std::vector<double> one(64), two(64);
  auto job = [](std::vector<double>& out) {
    parallelFor(64, [&](int64_t c, int) {
      double s = 0;
      for (int i = 1; i <= 1000; ++i) s += 1.0 / (static_cast<double>(c) + i);
      out[static_cast<size_t>(c)] = s;
    });
  };
  setNumThreads(1);
  job(one);
  setNumThreads(2);
  job(two);
  EXPECT_EQ(one, two);
  setNumThreads(0);
}

}  // namespace
}  // namespace cortex::kernels
