// The disk tier: records round trip through files, a held key keeps its first record, eviction
// follows use, a restart finds the records in their last order, and what happens to the folder
// behind the store's back (files deleted, changed or foreign, the folder gone) is a miss or an
// error message, never a crash.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvtier/disk_store.h"

namespace cortex::kvtier {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;
using Status = Fetched::Status;

Bytes randomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Bytes b(n);
  for (std::byte& x : b) x = static_cast<std::byte>(rng() & 0xff);
  return b;
}

void writeRaw(const fs::path& p, const Bytes& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(f.good()) << p;
}

void setAge(const fs::path& p, int hours) {
  fs::last_write_time(p, fs::file_time_type::clock::now() - std::chrono::hours(hours));
}

// Each test gets its own folder; the store's folder is a child of it, so a test can delete or
// replace the store's folder and the teardown still finds everything.
class DiskTier : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = fs::temp_directory_path() /
            ("cs_disk_store_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
    dir_ = root_ / "blocks";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  static void put(DiskStore& s, uint64_t key, const Bytes& b) {
    std::string error;
    ASSERT_TRUE(s.put(key, b, error)) << error;
  }
  static Status statusOf(DiskStore& s, uint64_t key) { return s.get(key).status; }

  fs::path root_;
  fs::path dir_;
  const std::string ns_ = "0123456789abcdef";
};

TEST_F(DiskTier, PutGetRoundTrip) {
  DiskStore s(dir_, 1 << 20, ns_);
  EXPECT_TRUE(fs::is_directory(dir_));
  EXPECT_STREQ(s.name(), "disk");
  const Bytes a = randomBytes(300 * 1024 + 7, 1);
  put(s, 0x42, a);
  EXPECT_EQ(s.pathFor(0x42), dir_ / (ns_ + "-0000000000000042.kvblock"));
  EXPECT_EQ(fs::file_size(s.pathFor(0x42)), a.size());
  EXPECT_EQ(s.bytesStored(), a.size());
  EXPECT_EQ(s.numRecords(), 1u);
  EXPECT_TRUE(s.up());

  const Fetched f = s.get(0x42);
  ASSERT_EQ(f.status, Status::Found) << f.error;
  EXPECT_EQ(f.bytes, a);
  EXPECT_EQ(statusOf(s, 0x43), Status::Missing);

  // The full key range spells 16 digits.
  const Bytes b = randomBytes(100, 2);
  put(s, ~uint64_t{0}, b);
  EXPECT_TRUE(fs::exists(dir_ / (ns_ + "-ffffffffffffffff.kvblock")));
  EXPECT_EQ(s.get(~uint64_t{0}).bytes, b);
  // No temporary file is left behind.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_), fs::directory_iterator()), 2);
}

TEST_F(DiskTier, ContainsLooksAtTheIndex) {
  DiskStore s(dir_, 1 << 20, ns_);
  put(s, 1, randomBytes(10, 1));
  put(s, 3, randomBytes(10, 3));
  const std::vector<uint64_t> keys = {1, 2, 3, 4};
  EXPECT_EQ(s.contains(keys), (std::vector<uint8_t>{1, 0, 1, 0}));
  EXPECT_TRUE(s.contains({}).empty());
}

TEST_F(DiskTier, PutOfHeldKeyKeepsTheFirstRecord) {
  DiskStore s(dir_, 1 << 20, ns_);
  const Bytes first = randomBytes(500, 1);
  put(s, 7, first);
  put(s, 7, randomBytes(900, 2));
  EXPECT_EQ(s.get(7).bytes, first);
  EXPECT_EQ(s.bytesStored(), first.size());
  EXPECT_EQ(s.numRecords(), 1u);
}

TEST_F(DiskTier, EvictsLeastRecentlyUsed) {
  DiskStore s(dir_, 3000, ns_);
  for (uint64_t k = 1; k <= 3; ++k) put(s, k, randomBytes(1000, k));
  EXPECT_EQ(s.bytesStored(), 3000u);

  EXPECT_EQ(statusOf(s, 1), Status::Found);  // 1 is now the most recent: 2 goes first
  put(s, 4, randomBytes(1000, 4));
  EXPECT_EQ(s.contains(std::vector<uint64_t>{1, 2, 3, 4}), (std::vector<uint8_t>{1, 0, 1, 1}));
  EXPECT_FALSE(fs::exists(s.pathFor(2)));
  EXPECT_EQ(s.bytesStored(), 3000u);

  put(s, 3, randomBytes(1000, 33));  // a put of a held key is a use too: 1 goes next
  put(s, 5, randomBytes(1000, 5));
  EXPECT_EQ(s.contains(std::vector<uint64_t>{1, 3, 4, 5}), (std::vector<uint8_t>{0, 1, 1, 1}));
  EXPECT_FALSE(fs::exists(s.pathFor(1)));

  // A bigger record evicts as many as it needs.
  put(s, 6, randomBytes(2500, 6));
  EXPECT_EQ(s.contains(std::vector<uint64_t>{3, 4, 5, 6}), (std::vector<uint8_t>{0, 0, 0, 1}));
  EXPECT_EQ(s.bytesStored(), 2500u);
  EXPECT_EQ(s.numRecords(), 1u);
}

TEST_F(DiskTier, RefusesRecordLargerThanCapacity) {
  DiskStore s(dir_, 1000, ns_);
  put(s, 1, randomBytes(400, 1));
  std::string error;
  EXPECT_FALSE(s.put(2, randomBytes(1001, 2), error));
  EXPECT_NE(error.find("1001"), std::string::npos) << error;
  EXPECT_FALSE(fs::exists(s.pathFor(2)));
  EXPECT_EQ(s.contains(std::vector<uint64_t>{1, 2}), (std::vector<uint8_t>{1, 0}));
  EXPECT_TRUE(s.up());  // the medium is fine
  put(s, 3, randomBytes(1000, 3));  // exactly the capacity fits, alone
  EXPECT_EQ(s.bytesStored(), 1000u);
  EXPECT_EQ(s.numRecords(), 1u);
}

TEST_F(DiskTier, FileDeletedBehindTheBackIsMissing) {
  DiskStore s(dir_, 1 << 20, ns_);
  put(s, 1, randomBytes(100, 1));
  put(s, 2, randomBytes(200, 2));
  fs::remove(s.pathFor(1));
  EXPECT_EQ(s.contains(std::vector<uint64_t>{1}), (std::vector<uint8_t>{1}));  // no I/O
  const Fetched f = s.get(1);
  EXPECT_EQ(f.status, Status::Missing);
  EXPECT_TRUE(f.error.empty());
  EXPECT_EQ(s.contains(std::vector<uint64_t>{1}), (std::vector<uint8_t>{0}));
  EXPECT_EQ(s.bytesStored(), 200u);

  // A put of a held key whose file is gone writes it again rather than claim it.
  fs::remove(s.pathFor(2));
  const Bytes again = randomBytes(300, 22);
  put(s, 2, again);
  EXPECT_EQ(s.get(2).bytes, again);
  EXPECT_EQ(s.bytesStored(), 300u);
}

TEST_F(DiskTier, ChangedFileIsReturnedAsItIs) {
  DiskStore s(dir_, 10000, ns_);
  put(s, 1, randomBytes(1000, 1));
  put(s, 2, randomBytes(1000, 2));

  const Bytes shorter = randomBytes(10, 9);
  writeRaw(s.pathFor(1), shorter);
  Fetched f = s.get(1);
  ASSERT_EQ(f.status, Status::Found) << f.error;
  EXPECT_EQ(f.bytes, shorter);
  EXPECT_EQ(s.bytesStored(), 1010u);

  writeRaw(s.pathFor(1), {});
  f = s.get(1);
  EXPECT_EQ(f.status, Status::Found);
  EXPECT_TRUE(f.bytes.empty());
  EXPECT_EQ(s.bytesStored(), 1000u);

  const Bytes longer = randomBytes(4000, 10);
  writeRaw(s.pathFor(2), longer);
  EXPECT_EQ(s.get(2).bytes, longer);
  EXPECT_EQ(s.bytesStored(), 4000u);

  // Grown past the capacity: no record the store could have written. Refused and deleted.
  writeRaw(s.pathFor(2), randomBytes(10001, 11));
  f = s.get(2);
  EXPECT_EQ(f.status, Status::Failed);
  EXPECT_NE(f.error.find(s.pathFor(2).string()), std::string::npos) << f.error;
  EXPECT_TRUE(f.bytes.empty());
  EXPECT_FALSE(fs::exists(s.pathFor(2)));
  EXPECT_EQ(s.bytesStored(), 0u);
  EXPECT_EQ(s.numRecords(), 1u);
}

TEST_F(DiskTier, UnreadableRecordFailsAndIsForgotten) {
  DiskStore s(dir_, 10000, ns_);
  put(s, 1, randomBytes(100, 1));
  put(s, 2, randomBytes(100, 2));
  fs::remove(s.pathFor(1));
  fs::create_directory(s.pathFor(1));  // something that is not a file where the record was
  const Fetched f = s.get(1);
  EXPECT_EQ(f.status, Status::Failed);
  EXPECT_NE(f.error.find(s.pathFor(1).string()), std::string::npos) << f.error;
  EXPECT_EQ(s.contains(std::vector<uint64_t>{1, 2}), (std::vector<uint8_t>{0, 1}));
  EXPECT_EQ(s.bytesStored(), 100u);
  EXPECT_EQ(statusOf(s, 1), Status::Missing);
}

TEST_F(DiskTier, Remove) {
  DiskStore s(dir_, 1 << 20, ns_);
  put(s, 1, randomBytes(100, 1));
  put(s, 2, randomBytes(200, 2));
  s.remove(1);
  EXPECT_FALSE(fs::exists(s.pathFor(1)));
  EXPECT_EQ(statusOf(s, 1), Status::Missing);
  EXPECT_EQ(s.bytesStored(), 200u);
  s.remove(1);  // unknown: no-op
  s.remove(99);
  EXPECT_EQ(s.numRecords(), 1u);
  EXPECT_EQ(statusOf(s, 2), Status::Found);
}

TEST_F(DiskTier, RestartFindsRecords) {
  Bytes recs[4];
  {
    DiskStore s(dir_, 1 << 20, ns_);
    for (uint64_t k = 1; k <= 3; ++k) put(s, k, recs[k] = randomBytes(1000 + k, k));
  }
  {
    DiskStore s(dir_, 1 << 20, ns_);
    EXPECT_EQ(s.numRecords(), 3u);
    EXPECT_EQ(s.bytesStored(), 3006u);
    for (uint64_t k = 1; k <= 3; ++k) EXPECT_EQ(s.get(k).bytes, recs[k]);
  }
  // Oldest modification is least recently used; a get refreshes it for the next run.
  setAge(dir_ / (ns_ + "-0000000000000001.kvblock"), 3);
  setAge(dir_ / (ns_ + "-0000000000000002.kvblock"), 2);
  setAge(dir_ / (ns_ + "-0000000000000003.kvblock"), 1);
  {
    DiskStore s(dir_, 1 << 20, ns_);
    EXPECT_EQ(statusOf(s, 1), Status::Found);
  }
  {
    // Room for two: the least recently used one (2) is evicted at the scan.
    DiskStore s(dir_, 2100, ns_);
    EXPECT_EQ(s.contains(std::vector<uint64_t>{1, 2, 3}), (std::vector<uint8_t>{1, 0, 1}));
    EXPECT_FALSE(fs::exists(s.pathFor(2)));
    EXPECT_EQ(s.bytesStored(), 2004u);
    // And the order continues: 3 (older) goes before 1.
    put(s, 4, randomBytes(1000, 4));
    EXPECT_EQ(s.contains(std::vector<uint64_t>{1, 3, 4}), (std::vector<uint8_t>{1, 0, 1}));
  }
}

TEST_F(DiskTier, LeavesOtherFilesAlone) {
  fs::create_directories(dir_);
  const std::vector<fs::path> foreign = {
      dir_ / "fedcba9876543210-0000000000000001.kvblock",  // another namespace
      dir_ / (ns_ + "-000000000000000A.kvblock"),           // not our spelling
      dir_ / (ns_ + "-00000000000001.kvblock"),             // too short
      dir_ / (ns_ + "-0000000000000001.kvblock.bak"),
      dir_ / "notes.txt",
      dir_ / "fedcba9876543210-0000000000000001.kvblock.tmp.1234567890",  // another's temp
  };
  for (const fs::path& p : foreign) writeRaw(p, randomBytes(5000, 1));
  fs::create_directory(dir_ / (ns_ + "-0000000000000002.kvblock"));  // a folder, not a record

  DiskStore s(dir_, 3000, ns_);
  EXPECT_EQ(s.numRecords(), 0u);
  EXPECT_EQ(s.bytesStored(), 0u);
  for (uint64_t k = 1; k <= 5; ++k) put(s, k == 2 ? 7 : k, randomBytes(1000, k));  // evicts
  EXPECT_EQ(s.bytesStored(), 3000u);
  for (const fs::path& p : foreign) EXPECT_EQ(fs::file_size(p), 5000u) << p;
  EXPECT_TRUE(fs::is_directory(dir_ / (ns_ + "-0000000000000002.kvblock")));

  DiskStore again(dir_, 1 << 20, ns_);
  EXPECT_EQ(again.numRecords(), 3u);
  EXPECT_EQ(again.bytesStored(), 3000u);
}

TEST_F(DiskTier, DeletesStaleTempFiles) {
  fs::create_directories(dir_);
  const std::string record = ns_ + "-0000000000000001.kvblock";
  const fs::path dead = dir_ / (record + ".tmp.2147483647");  // beyond any pid_max
  const fs::path mine = dir_ / (record + ".tmp." + std::to_string(::getpid()));
  const fs::path huge = dir_ / (record + ".tmp.99999999999999999999999");
  const fs::path live = dir_ / (record + ".tmp.1");  // pid 1 is alive: its write may be in flight
  const fs::path odd = dir_ / (record + ".tmp.12x");
  for (const fs::path& p : {dead, mine, huge, live, odd}) writeRaw(p, randomBytes(100, 1));

  DiskStore s(dir_, 1 << 20, ns_);
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_FALSE(fs::exists(mine));
  EXPECT_FALSE(fs::exists(huge));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(odd));
  EXPECT_EQ(s.numRecords(), 0u);
  EXPECT_EQ(s.bytesStored(), 0u);
}

TEST_F(DiskTier, ThrowsWhenFolderCannotBeMade) {
  writeRaw(root_ / "file", randomBytes(10, 1));
  try {
    DiskStore s(root_ / "file" / "blocks", 1000, ns_);
    FAIL() << "no exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find((root_ / "file" / "blocks").string()), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(DiskStore(root_ / "file", 1000, ns_), std::runtime_error);
}

TEST_F(DiskTier, ThrowsForZeroCapacity) {
  EXPECT_THROW(DiskStore(dir_, 0, ns_), std::invalid_argument);
}

TEST_F(DiskTier, PutMakesADeletedFolderAgain) {
  DiskStore s(dir_, 1 << 20, ns_);
  put(s, 1, randomBytes(100, 1));
  fs::remove_all(dir_);
  const Bytes b = randomBytes(200, 2);
  put(s, 2, b);
  EXPECT_TRUE(s.up());
  EXPECT_EQ(s.get(2).bytes, b);
  EXPECT_EQ(statusOf(s, 1), Status::Missing);
  EXPECT_EQ(s.bytesStored(), 200u);
}

TEST_F(DiskTier, PutIntoUnusableFolderFails) {
  DiskStore s(dir_, 1 << 20, ns_);
  put(s, 1, randomBytes(100, 1));
  fs::remove_all(dir_);
  writeRaw(dir_, randomBytes(10, 1));  // a file where the folder was: it cannot be made again

  std::string error;
  EXPECT_FALSE(s.put(2, randomBytes(200, 2), error));
  EXPECT_NE(error.find(dir_.string()), std::string::npos) << error;
  EXPECT_FALSE(s.up());
  EXPECT_EQ(s.contains(std::vector<uint64_t>{1, 2}), (std::vector<uint8_t>{1, 0}));
  error.clear();
  EXPECT_FALSE(s.put(1, randomBytes(100, 1), error));  // held, but its file is gone
  EXPECT_FALSE(error.empty());
  EXPECT_EQ(statusOf(s, 1), Status::Missing);
  EXPECT_EQ(s.bytesStored(), 0u);

  fs::remove(dir_);
  put(s, 3, randomBytes(300, 3));
  EXPECT_TRUE(s.up());
  EXPECT_EQ(s.bytesStored(), 300u);
}

}  // namespace
}  // namespace cortex::kvtier
