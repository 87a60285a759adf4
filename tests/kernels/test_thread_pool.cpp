// The kernels' thread pool: every chunk runs exactly once, worker ids are unique among running
// chunks, jobs from several callers of one pool are serialised, and separate pools are
// independent. Runs under TSan in CI.
#include "kernels/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <stdexcept>
#include <thread>
#include <vector>

namespace cortex::kernels {
namespace {

// Runs one job of n chunks on `pool` and checks that each chunk ran once, on a worker id in
// range that no other running chunk had at the same time.
void expectEachChunkOnceWithValidWorkers(ThreadPool& pool, int64_t n) {
  const int threads = pool.size();
  std::vector<std::atomic<int>> runs(static_cast<size_t>(n));
  std::vector<std::atomic<int>> busy(static_cast<size_t>(threads));
  std::atomic<int> badWorker{0};
  pool.parallelFor(n, [&](int64_t c, int w) {
    if (w < 0 || w >= threads) {
      ++badWorker;
      return;
    }
    if (busy[static_cast<size_t>(w)].fetch_add(1) != 0) ++badWorker;
    runs[static_cast<size_t>(c)].fetch_add(1);
    busy[static_cast<size_t>(w)].fetch_sub(1);
  });
  EXPECT_EQ(badWorker.load(), 0) << "n " << n;
  for (auto& r : runs) ASSERT_EQ(r.load(), 1) << "n " << n;
}

// Waits up to 10 s for `flag`; a test that would otherwise hang fails instead.
bool waitFor(const std::atomic<bool>& flag) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!flag.load()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

TEST(ThreadPool, SizeCountsTheCallerAndDefaultsToTheHardware) {
  const unsigned hw = std::thread::hardware_concurrency();
  const int expected = hw == 0 ? 1 : static_cast<int>(hw);
  EXPECT_EQ(ThreadPool(0).size(), expected);
  EXPECT_EQ(ThreadPool(-3).size(), expected);
  EXPECT_EQ(ThreadPool(1).size(), 1);
  EXPECT_EQ(ThreadPool(3).size(), 3);
}

TEST(ThreadPool, EveryChunkRunsOnceWithAValidWorker) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    ASSERT_EQ(pool.size(), threads);
    for (int64_t n : {1, 2, 7, 100, 5000}) expectEachChunkOnceWithValidWorkers(pool, n);
  }
}

TEST(ThreadPool, EmptyJobsRunNothing) {
  ThreadPool pool(2);
  std::atomic<int> runs{0};
  pool.parallelFor(0, [&](int64_t, int) { ++runs; });
  pool.parallelFor(-5, [&](int64_t, int) { ++runs; });
  EXPECT_EQ(runs.load(), 0);
}

TEST(ThreadPool, RejectsTooManyChunksBeforeRunningAny) {
  ThreadPool pool(2);
  std::atomic<int> runs{0};
  EXPECT_THROW(pool.parallelFor(int64_t{1} << 20, [&](int64_t, int) { ++runs; }),
               std::invalid_argument);
  EXPECT_EQ(runs.load(), 0);
  expectEachChunkOnceWithValidWorkers(pool, 100);
}

// Two threads share one pool; while a chunk of one caller's job runs, no chunk of the other
// caller's job may be running.
TEST(ThreadPool, ManyJobsInARowAndFromSeveralCallers) {
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  std::atomic<int> inJob[2] = {0, 0};
  std::atomic<int> overlaps{0};
  auto caller = [&](int me) {
    for (int j = 0; j < 2000; ++j) {
      pool.parallelFor(5, [&](int64_t c, int) {
        inJob[me].fetch_add(1);
        if (inJob[1 - me].load() != 0) ++overlaps;
        total += c + 1;
        inJob[me].fetch_sub(1);
      });
    }
  };
  std::thread a(caller, 0), b(caller, 1);
  a.join();
  b.join();
  EXPECT_EQ(total.load(), 2 * 2000 * 15);
  EXPECT_EQ(overlaps.load(), 0);
}

TEST(ThreadPool, ResultsDoNotDependOnTheThreadThatRunsAChunk) {
  auto job = [](ThreadPool& pool, std::vector<double>& out) {
    pool.parallelFor(64, [&](int64_t c, int) {
      double s = 0;
      for (int i = 1; i <= 1000; ++i) s += 1.0 / (static_cast<double>(c) + i);
      out[static_cast<size_t>(c)] = s;
    });
  };
  std::vector<double> one(64);
  ThreadPool single(1);
  job(single, one);
  for (int threads : {2, 3}) {
    ThreadPool pool(threads);
    std::vector<double> many(64);
    job(pool, many);
    EXPECT_EQ(one, many) << threads << " threads";
  }
}

// Two pools in use at the same time from two threads: both finish, with their own worker ids.
TEST(ThreadPool, TwoPoolsAtTheSameTime) {
  ThreadPool p2(2), p3(3);
  auto caller = [](ThreadPool& pool, std::atomic<int64_t>& total, std::atomic<int>& bad) {
    for (int j = 0; j < 1000; ++j) {
      pool.parallelFor(9, [&](int64_t c, int w) {
        if (w < 0 || w >= pool.size()) ++bad;
        total += c + 1;
      });
    }
  };
  std::atomic<int64_t> t2{0}, t3{0};
  std::atomic<int> bad2{0}, bad3{0};
  std::thread a(caller, std::ref(p2), std::ref(t2), std::ref(bad2));
  std::thread b(caller, std::ref(p3), std::ref(t3), std::ref(bad3));
  a.join();
  b.join();
  EXPECT_EQ(t2.load(), 1000 * 45);
  EXPECT_EQ(t3.load(), 1000 * 45);
  EXPECT_EQ(bad2.load(), 0);
  EXPECT_EQ(bad3.load(), 0);
}

// A job on one pool cannot hold up another pool: a chunk of pool A's job waits for a whole job
// on pool B, run from another thread, to finish.
TEST(ThreadPool, PoolsDoNotWaitForEachOther) {
  ThreadPool a(2), b(2);
  std::atomic<bool> aRunning{false}, bDone{false};
  std::atomic<bool> bFinishedFirst{false};
  std::thread userOfA([&] {
    a.parallelFor(4, [&](int64_t c, int) {
      if (c != 0) return;
      aRunning = true;
      bFinishedFirst = waitFor(bDone);
    });
  });
  ASSERT_TRUE(waitFor(aRunning));
  std::atomic<int64_t> sum{0};
  b.parallelFor(100, [&](int64_t c, int) { sum += c; });
  bDone = true;
  userOfA.join();
  EXPECT_EQ(sum.load(), 100 * 99 / 2);
  EXPECT_TRUE(bFinishedFirst.load());
}

// A chunk may run a job on another pool.
TEST(ThreadPool, ChunksMayUseAnotherPool) {
  ThreadPool outer(2), inner(2);
  std::atomic<int64_t> sum{0};
  outer.parallelFor(8, [&](int64_t c, int) {
    inner.parallelFor(16, [&](int64_t d, int) { sum += c * 16 + d; });
  });
  EXPECT_EQ(sum.load(), 128 * 127 / 2);
}

}  // namespace
}  // namespace cortex::kernels
