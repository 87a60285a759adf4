#include "kvtier/disk_store.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <stdexcept>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace cortex::kvtier {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kSuffix = ".kvblock";
constexpr std::string_view kTmp = ".tmp.";
constexpr size_t kHexDigits = 16;

std::string sysError(const char* what, const fs::path& path, int err) {
  return std::string("disk tier: ") + what + " '" + path.string() +
         "': " + std::generic_category().message(err);
}

// The path no longer leads to a file: it, or the folder, was deleted (or the folder replaced).
bool gone(int err) { return err == ENOENT || err == ENOTDIR; }

// The key of a record file "<ns>-<16 lowercase hex>.kvblock"; false for any other name. Only the
// spelling pathFor writes counts, so one key never has two files.
bool parseRecordName(std::string_view name, std::string_view ns, uint64_t& key) {
  if (name.size() != ns.size() + 1 + kHexDigits + kSuffix.size()) return false;
  if (name.substr(0, ns.size()) != ns || name[ns.size()] != '-') return false;
  if (name.substr(name.size() - kSuffix.size()) != kSuffix) return false;
  key = 0;
  for (char c : name.substr(ns.size() + 1, kHexDigits)) {
    uint64_t digit = 0;
    if (c >= '0' && c <= '9') {
      digit = static_cast<uint64_t>(c - '0');
    } else if (c >= 'a' && c <= 'f') {
      digit = static_cast<uint64_t>(c - 'a' + 10);
    } else {
      return false;
    }
    key = key << 4 | digit;
  }
  return true;
}

// Whether `name` is a temporary file of ours, "<record name>.tmp.<pid>", and that pid's write can
// no longer finish: the process is gone, or it is this one (whose writes never outlive a put).
// Another live process may share the folder; its write in flight is left alone.
bool isStaleTemp(std::string_view name, std::string_view ns) {
  const size_t recordLen = ns.size() + 1 + kHexDigits + kSuffix.size();
  uint64_t key = 0;
  if (name.size() <= recordLen + kTmp.size() ||
      !parseRecordName(name.substr(0, recordLen), ns, key) ||
      name.substr(recordLen, kTmp.size()) != kTmp) {
    return false;
  }
  uint64_t pid = 0;
  for (char c : name.substr(recordLen + kTmp.size())) {
    if (c < '0' || c > '9') return false;
    // Beyond any pid: no process can own it (and this stops the overflow).
    if (pid > 0xffffffffu) return true;
    pid = pid * 10 + static_cast<uint64_t>(c - '0');
  }
  if (pid == 0 || pid > 0x7fffffffu) return true;
  const auto p = static_cast<pid_t>(pid);
  if (p == ::getpid()) return true;
  return ::kill(p, 0) != 0 && errno == ESRCH;
}

// Writes all of `data` to a new file at `path`; 0 or the errno of the step that failed.
int writeFile(const fs::path& path, std::span<const std::byte> data) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno;
  int err = 0;
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : EIO;
      break;
    }
    done += static_cast<size_t>(n);
  }
  // No fsync: this is a cache and a record is verified when read (block_record.h); the rename
  // alone keeps readers from half a file.
  if (::close(fd) != 0 && err == 0) err = errno;
  return err;
}

}  // namespace

DiskStore::DiskStore(fs::path dir, uint64_t capacityBytes, std::string nameSpace)
    : dir_(std::move(dir)), capacity_(capacityBytes), ns_(std::move(nameSpace)) {
  if (capacity_ == 0) throw std::invalid_argument("disk tier: the capacity must be at least 1 byte");
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) {
    throw std::runtime_error("disk tier: cannot create the folder '" + dir_.string() +
                             "': " + ec.message());
  }
  if (!fs::is_directory(dir_, ec)) {
    throw std::runtime_error("disk tier: '" + dir_.string() + "' is not a folder" +
                             (ec ? ": " + ec.message() : std::string()));
  }
  scan();
  evictBeyond(capacity_);
}

void DiskStore::scan() {
  struct Record {
    fs::file_time_type mtime;
    uint64_t key = 0;
    uint64_t bytes = 0;
  };
  std::vector<Record> found;
  std::error_code ec;
  for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    std::error_code fileEc;  // a file that vanishes or cannot be examined is skipped
    Record r;
    if (parseRecordName(name, ns_, r.key)) {
      if (!it->is_regular_file(fileEc)) continue;
      r.bytes = it->file_size(fileEc);
      if (fileEc) continue;
      r.mtime = it->last_write_time(fileEc);
      if (fileEc) continue;
      found.push_back(r);
    } else if (isStaleTemp(name, ns_)) {
      fs::remove(it->path(), fileEc);
    }
  }
  if (ec) {
    throw std::runtime_error("disk tier: cannot read the folder '" + dir_.string() +
                             "': " + ec.message());
  }
  // Oldest first: a get refreshes the file's mtime, so this is the last run's LRU order. Ties
  // (coarse file clocks) go by key, only to be deterministic.
  std::sort(found.begin(), found.end(), [](const Record& a, const Record& b) {
    return a.mtime != b.mtime ? a.mtime < b.mtime : a.key < b.key;
  });
  uint64_t total = 0;
  for (const Record& r : found) {
    index_[r.key] = Entry{r.bytes, lru_.insert(lru_.end(), r.key)};
    total += r.bytes;
  }
  bytes_.store(total);
}

fs::path DiskStore::pathFor(uint64_t key) const {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string name = ns_;
  name += '-';
  for (int shift = 60; shift >= 0; shift -= 4) name += kHex[(key >> shift) & 0xf];
  name += kSuffix;
  return dir_ / name;
}

void DiskStore::touch(Entry& e) { lru_.splice(lru_.end(), lru_, e.lru); }

void DiskStore::forget(uint64_t key) {
  const auto it = index_.find(key);
  if (it == index_.end()) return;
  bytes_.store(bytes_.load() - it->second.bytes);
  lru_.erase(it->second.lru);
  index_.erase(it);
}

void DiskStore::erase(uint64_t key) {
  std::error_code ec;  // a file already gone is the wanted end; one that cannot go is forgotten
  fs::remove(pathFor(key), ec);
  forget(key);
}

void DiskStore::evictBeyond(uint64_t limit) {
  while (bytes_.load() > limit && !lru_.empty()) erase(lru_.front());
}

std::vector<uint8_t> DiskStore::contains(std::span<const uint64_t> keys) {
  std::vector<uint8_t> out(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) out[i] = index_.count(keys[i]) != 0 ? 1 : 0;
  return out;
}

Fetched DiskStore::get(uint64_t key) {
  Fetched out;
  const auto it = index_.find(key);
  if (it == index_.end()) return out;
  const fs::path path = pathFor(key);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    forget(key);
    if (!gone(err)) {
      out.status = Fetched::Status::Failed;
      out.error = sysError("cannot open", path, err);
    }
    return out;
  }
  struct stat st {};
  bool drop = false;  // not a file to keep: delete it rather than only forget it
  if (::fstat(fd, &st) != 0) {
    out.error = sysError("cannot stat", path, errno);
  } else if (!S_ISREG(st.st_mode)) {
    out.error = "disk tier: '" + path.string() + "' is not a regular file";
  } else if (static_cast<uint64_t>(st.st_size) > capacity_) {
    // Replaced behind our back by something no put could have written; eviction would delete it
    // anyway, so do not read it whole first.
    out.error = "disk tier: '" + path.string() + "' holds " + std::to_string(st.st_size) +
                " bytes, more than the capacity of " + std::to_string(capacity_);
    drop = true;
  } else {
    // The size is the file's now, not the indexed one: a file replaced behind our back is
    // returned as it is and the caller judges its content.
    out.bytes.resize(static_cast<size_t>(st.st_size));
    size_t got = 0;
    while (got < out.bytes.size()) {
      const ssize_t n = ::read(fd, out.bytes.data() + got, out.bytes.size() - got);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        out.error = sysError("cannot read", path, errno);
        break;
      }
      if (n == 0) break;  // truncated since the fstat: what is there is the record
      got += static_cast<size_t>(n);
    }
    out.bytes.resize(got);
    // The mtime carries the LRU order to the next run; failing to set it only loses that.
    if (out.error.empty()) (void)::futimens(fd, nullptr);
  }
  ::close(fd);
  if (!out.error.empty()) {
    out.status = Fetched::Status::Failed;
    out.bytes.clear();
    if (drop) {
      erase(key);
    } else {
      forget(key);
    }
    return out;
  }
  out.status = Fetched::Status::Found;
  Entry& e = it->second;
  bytes_.store(bytes_.load() - e.bytes + out.bytes.size());
  e.bytes = out.bytes.size();
  touch(e);
  evictBeyond(capacity_);  // the record may have grown; it is now the most recent, so it stays
  return out;
}

bool DiskStore::put(uint64_t key, std::span<const std::byte> record, std::string& error) {
  const fs::path path = pathFor(key);
  if (const auto it = index_.find(key); it != index_.end()) {
    // Refreshing the mtime keeps the order across restarts and checks the file is still there;
    // one deleted behind our back is written again below instead of claimed as held.
    if (::utimensat(AT_FDCWD, path.c_str(), nullptr, 0) == 0 || !gone(errno)) {
      touch(it->second);
      return true;
    }
    forget(key);
  }
  if (record.size() > capacity_) {
    error = "disk tier: a record of " + std::to_string(record.size()) +
            " bytes is larger than the capacity of " + std::to_string(capacity_) + " bytes";
    return false;
  }
  fs::path tmp = path;
  tmp += std::string(kTmp) + std::to_string(::getpid());
  std::string why;
  int err = writeFile(tmp, record);
  if (err == ENOENT) {
    // The folder was deleted behind our back: make it again, once.
    std::error_code ec;
    fs::create_directories(dir_, ec);
    if (ec) {
      why = "disk tier: cannot create the folder '" + dir_.string() + "': " + ec.message();
    } else {
      err = writeFile(tmp, record);
    }
  }
  if (why.empty() && err != 0) why = sysError("cannot write", tmp, err);
  if (why.empty() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    why = sysError("cannot rename the temporary file onto", path, errno);
  }
  if (!why.empty()) {
    std::error_code ec;
    fs::remove(tmp, ec);
    error = std::move(why);
    up_.store(false);
    return false;
  }
  index_[key] = Entry{record.size(), lru_.insert(lru_.end(), key)};
  bytes_.store(bytes_.load() + record.size());
  evictBeyond(capacity_);  // the new record fits the capacity alone and is the most recent
  up_.store(true);
  return true;
}

bool DiskStore::probe() {
  if (up_.load()) return true;
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (!ec && fs::is_directory(dir_, ec)) up_.store(true);
  return up_.load();
}

void DiskStore::remove(uint64_t key) {
  if (index_.count(key) != 0) erase(key);
}

}  // namespace cortex::kvtier
