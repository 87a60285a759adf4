// The kernels' thread pool: every chunk runs exactly once, worker ids are unique among running
// chunks, jobs from several callers of one pool are serialised, an exception thrown by any chunk
// reaches the caller after the running chunks finish and leaves the pool usable, and separate
// pools are independent. Runs under TSan in CI.
#include "kernels/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace cortex::kernels {
namespace {

// What a test chunk throws, so the test can tell which chunk's exception came back.
struct ChunkError {
  int64_t chunk;
};

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

// One chunk throws, at the start, the middle or the end of jobs of various sizes: the caller gets
// that exception, every chunk that started has finished by then, none ran twice, and the next
// job on the pool runs normally.
TEST(ThreadPool, ExceptionFromOneChunkReachesTheCaller) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    for (int64_t n : {1, 2, 7, 100, 5000}) {
      for (int64_t bad : {int64_t{0}, n / 2, n - 1}) {
        SCOPED_TRACE(testing::Message() << threads << " threads, " << n << " chunks, chunk "
                                        << bad << " throws");
        std::vector<std::atomic<int>> started(static_cast<size_t>(n)),
            finished(static_cast<size_t>(n));
        int64_t caught = -1;
        try {
          pool.parallelFor(n, [&](int64_t c, int) {
            started[static_cast<size_t>(c)].fetch_add(1);
            if (c == bad) {
              finished[static_cast<size_t>(c)].fetch_add(1);
              throw ChunkError{c};
            }
            // A little work, so other threads are still inside chunks when the throw happens.
            volatile double s = 0;
            for (int i = 0; i < 200; ++i) s = s + 1.0 / (i + 1);
            finished[static_cast<size_t>(c)].fetch_add(1);
          });
        } catch (const ChunkError& e) {
          caught = e.chunk;
        }
        EXPECT_EQ(caught, bad);
        for (int64_t c = 0; c < n; ++c) {
          const auto i = static_cast<size_t>(c);
          ASSERT_LE(started[i].load(), 1) << "chunk " << c;
          ASSERT_EQ(started[i].load(), finished[i].load()) << "chunk " << c << " still running";
          // Chunks are handed out in order, and a handed-out chunk always completes.
          if (c <= bad) {
            ASSERT_EQ(started[i].load(), 1) << "chunk " << c;
          }
        }
        expectEachChunkOnceWithValidWorkers(pool, n);
      }
    }
  }
}

// Every chunk throws: one exception comes back and no thread starts a second chunk once its
// first has thrown, so at most size() chunks run.
TEST(ThreadPool, EveryChunkThrowing) {
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    for (int rep = 0; rep < 50; ++rep) {
      std::atomic<int> runs{0};
      EXPECT_THROW(pool.parallelFor(10000,
                                    [&](int64_t c, int) {
                                      ++runs;
                                      throw std::runtime_error("chunk " + std::to_string(c));
                                    }),
                   std::runtime_error);
      EXPECT_GE(runs.load(), 1);
      EXPECT_LE(runs.load(), threads);
      expectEachChunkOnceWithValidWorkers(pool, 1000);
    }
  }
}

// The throwing chunk runs on a worker thread, not on the caller: the caller's own chunk holds on
// until some worker has claimed a chunk, and only workers throw.
TEST(ThreadPool, ExceptionFromAWorkerThreadReachesTheCaller) {
  const auto callerThread = std::this_thread::get_id();
  for (int threads : {2, 3}) {
    ThreadPool pool(threads);
    for (int rep = 0; rep < 50; ++rep) {
      std::atomic<bool> workerClaimed{false};
      std::atomic<bool> callerWaited{true};
      std::atomic<int> thrownOffCaller{0};
      try {
        pool.parallelFor(1000, [&](int64_t c, int w) {
          if (w == 0) {
            EXPECT_EQ(std::this_thread::get_id(), callerThread);
            if (c == 0 && !waitFor(workerClaimed)) callerWaited = false;
            return;
          }
          EXPECT_NE(std::this_thread::get_id(), callerThread);
          workerClaimed = true;
          ++thrownOffCaller;
          throw std::runtime_error("worker chunk " + std::to_string(c));
        });
        ADD_FAILURE() << "no exception";
      } catch (const std::runtime_error& e) {
        EXPECT_EQ(std::string(e.what()).rfind("worker chunk ", 0), 0u) << e.what();
      }
      ASSERT_TRUE(callerWaited.load()) << "no worker claimed a chunk";
      EXPECT_GE(thrownOffCaller.load(), 1);
      EXPECT_LE(thrownOffCaller.load(), threads - 1);
      expectEachChunkOnceWithValidWorkers(pool, 1000);
    }
  }
}

// The caller's chunk throws while workers are inside slow chunks: parallelFor returns (by the
// exception) only after those chunks have finished, since they may still be using the caller's
// data.
TEST(ThreadPool, RethrowsOnlyAfterRunningChunksFinish) {
  for (int threads : {2, 3}) {
    ThreadPool pool(threads);
    for (int rep = 0; rep < 5; ++rep) {
      std::atomic<bool> workerRunning{false}, callerThrowing{false};
      std::atomic<int> started{0}, finished{0};
      EXPECT_THROW(pool.parallelFor(100,
                                    [&](int64_t c, int w) {
                                      if (w == 0) {
                                        EXPECT_TRUE(waitFor(workerRunning));
                                        callerThrowing = true;
                                        throw ChunkError{c};
                                      }
                                      ++started;
                                      workerRunning = true;
                                      EXPECT_TRUE(waitFor(callerThrowing));
                                      std::this_thread::sleep_for(std::chrono::milliseconds(20));
                                      ++finished;
                                    }),
                   ChunkError);
      EXPECT_GE(started.load(), 1);
      EXPECT_EQ(finished.load(), started.load());
      expectEachChunkOnceWithValidWorkers(pool, 100);
    }
  }
}

// Throwing and normal jobs alternate on one pool from two caller threads.
TEST(ThreadPool, ThrowingJobsInterleavedWithNormalOnes) {
  ThreadPool pool(3);
  std::atomic<int> wrong{0};
  auto caller = [&](int64_t bad) {
    for (int j = 0; j < 300; ++j) {
      try {
        pool.parallelFor(50, [&](int64_t c, int) {
          if (c == bad) throw ChunkError{c};
        });
        ++wrong;
      } catch (const ChunkError& e) {
        if (e.chunk != bad) ++wrong;
      }
      std::atomic<int64_t> sum{0};
      pool.parallelFor(50, [&](int64_t c, int) { sum += c; });
      if (sum.load() != 50 * 49 / 2) ++wrong;
    }
  };
  std::thread a(caller, 3), b(caller, 41);
  a.join();
  b.join();
  EXPECT_EQ(wrong.load(), 0);
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

// A chunk may run a job on another pool, and an exception from that inner job travels through
// both.
TEST(ThreadPool, ChunksMayUseAnotherPool) {
  ThreadPool outer(2), inner(2);
  std::atomic<int64_t> sum{0};
  outer.parallelFor(8, [&](int64_t c, int) {
    inner.parallelFor(16, [&](int64_t d, int) { sum += c * 16 + d; });
  });
  EXPECT_EQ(sum.load(), 128 * 127 / 2);
  EXPECT_THROW(outer.parallelFor(8,
                                 [&](int64_t c, int) {
                                   inner.parallelFor(16, [&](int64_t d, int) {
                                     if (c == 5 && d == 7) throw ChunkError{d};
                                   });
                                 }),
               ChunkError);
  expectEachChunkOnceWithValidWorkers(outer, 100);
  expectEachChunkOnceWithValidWorkers(inner, 100);
}

}  // namespace
}  // namespace cortex::kernels
