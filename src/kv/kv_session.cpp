// KVCache sessions: a cached prefix's K/V written to a stream and read back into the prefix cache.
//
// Format (version 1; integers little-endian as the host stores them, which every supported
// machine is):
//   char[8]  "CSKVSESS"
//   u32      version (1)
//   u64      the cache's hash root: the model fingerprint (prefixHashSeed), KV format, block size,
//            layer and head shape and layer groups; a session only loads into a cache with the
//            same root
//   u32 x 6  block size, KV format (KVDType), groups, layers per group, KV heads, row bytes: the
//            same facts spelled out, for the error message when they differ
//   u32      tokens n (a multiple of the block size), u32 metadata bytes m, u32 records r
//   i32 x n  token ids
//   m bytes  metadata
//   r x      record: u32 logical block, u32 group, then the block's K/V: for each slot of the
//            group's layers and each KV head, the block's B rows of K, then the same of V
//   u64      FNV-1a 64 of every byte before it
// A record's block is registered under the chained hash of the tokens up to its end, mixed with
// its group, exactly as cacheComputedBlocks would have registered it.
#include <algorithm>
#include <cstring>
#include <istream>
#include <iterator>
#include <ostream>

#include "kv/kv_cache.h"

namespace cortex::kv {

namespace {

constexpr char kMagic[8] = {'C', 'S', 'K', 'V', 'S', 'E', 'S', 'S'};
constexpr uint32_t kVersion = 1;

[[noreturn]] void bad(const std::string& what) {
  throw KVError(KVErrc::InvalidArgument, "KV session: " + what);
}

uint64_t fnv1a(const std::byte* p, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 0x100000001b3ull;
  return h;
}

// Appends values to a byte buffer.
struct Writer {
  std::vector<std::byte>& buf;
  template <typename T>
  void put(const T& v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    buf.insert(buf.end(), p, p + sizeof v);
  }
  void bytes(const void* p, size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    buf.insert(buf.end(), b, b + n);
  }
};

// Reads values from a byte buffer; running past its end is a truncated file.
struct Reader {
  const std::vector<std::byte>& buf;
  size_t at = 0;
  const std::byte* take(size_t n) {
    if (n > buf.size() - at) bad("the file is truncated");
    const std::byte* p = buf.data() + at;
    at += n;
    return p;
  }
  template <typename T>
  T get() {
    T v;
    std::memcpy(&v, take(sizeof v), sizeof v);
    return v;
  }
};

}  // namespace

size_t KVCache::blockPayloadBytes() const {
  return 2 * static_cast<size_t>(arena_.layersPerBlock) * static_cast<size_t>(config_.numKVHeads) *
         rowBytes(config_.dtype, config_.headDim) * static_cast<size_t>(config_.blockSizeTokens);
}

void KVCache::copyBlockOut(BlockId b, std::byte* buf) const {
  const size_t rows = rowBytes(config_.dtype, config_.headDim) *
                      static_cast<size_t>(config_.blockSizeTokens);
  for (const std::byte* half : {arena_.kBase, arena_.vBase}) {
    for (int32_t slot = 0; slot < arena_.layersPerBlock; ++slot) {
      for (int32_t head = 0; head < config_.numKVHeads; ++head, buf += rows) {
        std::memcpy(buf, half + headRowsOffset(b, slot, head), rows);
      }
    }
  }
}

void KVCache::copyBlockIn(BlockId b, const std::byte* buf) {
  const size_t rows = rowBytes(config_.dtype, config_.headDim) *
                      static_cast<size_t>(config_.blockSizeTokens);
  for (std::byte* half : {arena_.kBase, arena_.vBase}) {
    for (int32_t slot = 0; slot < arena_.layersPerBlock; ++slot) {
      for (int32_t head = 0; head < config_.numKVHeads; ++head, buf += rows) {
        std::memcpy(half + headRowsOffset(b, slot, head), buf, rows);
      }
    }
  }
}

void KVCache::holdLocked(BlockId b) {
  if (pool_.refCount(b) == 0) {  // a cached block: it holds a whole block of tokens
    blockFill_[b] = config_.blockSizeTokens;
    liveTokens_ += config_.blockSizeTokens;
  }
  pool_.touch(b);
  ++heldRefs_[b];
}

void KVCache::releaseHeldLocked(BlockId b) {
  --heldRefs_[b];
  if (pool_.refCount(b) == 1) {
    liveTokens_ -= blockFill_[b];
    blockFill_[b] = 0;
  }
  pool_.free(b);
}

int32_t KVCache::saveSession(std::span<const int32_t> tokens, std::string_view metadata,
                             std::ostream& out) {
  if (!config_.prefixCaching) bad("prefix caching is off, so there are no cached blocks to save");
  const int32_t B = config_.blockSizeTokens;
  std::vector<Table> tables;
  int32_t hits = 0;
  // (logical block, group, block) of every block saved, held while its bytes are copied.
  struct Held {
    uint32_t index, group;
    BlockId block;
  };
  std::vector<Held> held;
  {
    std::lock_guard lock(mu_);
    hits = lookupLocked(tokens, INT32_MAX, &tables, nullptr);
    for (int32_t g = 0; g < numGroups(); ++g) {
      const Table& t = tables[static_cast<size_t>(g)];
      for (int32_t i = t.dropped; i < hits; ++i) {
        held.push_back({static_cast<uint32_t>(i), static_cast<uint32_t>(g),
                        t.blocks[static_cast<size_t>(i)]});
      }
    }
    for (const Held& h : held) holdLocked(h.block);
  }
  std::vector<std::byte> buf;
  try {
    const size_t payload = blockPayloadBytes();
    buf.reserve(128 + static_cast<size_t>(hits) * B * 4 + metadata.size() +
                held.size() * (8 + payload));
    Writer w{buf};
    w.bytes(kMagic, sizeof kMagic);
    w.put(kVersion);
    w.put(hashRoot_);
    for (uint32_t v : {static_cast<uint32_t>(B), static_cast<uint32_t>(config_.dtype),
                       static_cast<uint32_t>(numGroups()),
                       static_cast<uint32_t>(groups_.layersPerGroup),
                       static_cast<uint32_t>(config_.numKVHeads),
                       static_cast<uint32_t>(rowBytes(config_.dtype, config_.headDim))}) {
      w.put(v);
    }
    w.put(static_cast<uint32_t>(hits * B));
    w.put(static_cast<uint32_t>(metadata.size()));
    w.put(static_cast<uint32_t>(held.size()));
    w.bytes(tokens.data(), static_cast<size_t>(hits) * B * sizeof(int32_t));
    w.bytes(metadata.data(), metadata.size());
    for (const Held& h : held) {
      w.put(h.index);
      w.put(h.group);
      const size_t at = buf.size();
      buf.resize(at + payload);
      copyBlockOut(h.block, buf.data() + at);
    }
    w.put(fnv1a(buf.data(), buf.size()));
  } catch (...) {
    std::lock_guard lock(mu_);
    for (const Held& h : held) releaseHeldLocked(h.block);
    throw;
  }
  {
    std::lock_guard lock(mu_);
    for (const Held& h : held) releaseHeldLocked(h.block);
  }
  out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  if (!out) bad("writing the session failed");
  return hits * B;
}

KVCache::LoadedSession KVCache::loadSession(std::istream& in) {
  if (!config_.prefixCaching) bad("prefix caching is off, so a session's blocks cannot be kept");
  std::vector<std::byte> buf;
  {
    const std::string all{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    if (in.bad()) bad("reading the session failed");
    buf.resize(all.size());
    if (!all.empty()) std::memcpy(buf.data(), all.data(), all.size());
  }
  if (buf.size() < sizeof kMagic || std::memcmp(buf.data(), kMagic, sizeof kMagic) != 0) {
    bad("not a CortexStream KV session file");
  }
  if (buf.size() < sizeof kMagic + 4 + 8) bad("the file is truncated");
  Reader r{buf, sizeof kMagic};
  const auto version = r.get<uint32_t>();
  if (version != kVersion) {
    bad("format version " + std::to_string(version) + ", this build reads version " +
        std::to_string(kVersion));
  }
  const auto root = r.get<uint64_t>();
  uint32_t shape[6];
  for (uint32_t& v : shape) v = r.get<uint32_t>();
  const int32_t B = config_.blockSizeTokens;
  const auto nTokens = r.get<uint32_t>();
  const auto metaBytes = r.get<uint32_t>();
  const auto nRecords = r.get<uint32_t>();
  // The file's own block size (its shape), so a foreign file is named as such below, not as
  // truncated; once the shape matches this cache's it equals blockPayloadBytes().
  const uint64_t payload = 2ull * shape[3] * shape[4] * shape[5] * shape[0];
  const uint64_t size =
      r.at + uint64_t{nTokens} * 4 + metaBytes + uint64_t{nRecords} * (8 + payload) + 8;
  if (buf.size() < size) {
    bad("the file is truncated (" + std::to_string(buf.size()) + " of " + std::to_string(size) +
        " bytes)");
  }
  if (buf.size() > size) bad("unexpected bytes after the last record");
  uint64_t stored;
  std::memcpy(&stored, buf.data() + buf.size() - 8, 8);
  if (fnv1a(buf.data(), buf.size() - 8) != stored) bad("checksum mismatch (the file is damaged)");
  const uint32_t expect[6] = {static_cast<uint32_t>(B), static_cast<uint32_t>(config_.dtype),
                              static_cast<uint32_t>(numGroups()),
                              static_cast<uint32_t>(groups_.layersPerGroup),
                              static_cast<uint32_t>(config_.numKVHeads),
                              static_cast<uint32_t>(rowBytes(config_.dtype, config_.headDim))};
  if (!std::equal(shape, shape + 6, expect) || root != hashRoot_) {
    const bool formatKnown = shape[1] < std::size(kKVFormats);
    bad(std::string("saved by another model or KV cache configuration (block size ") +
        std::to_string(shape[0]) + ", KV format " +
        (formatKnown ? toString(static_cast<KVDType>(shape[1])) : "?") + ", " +
        std::to_string(shape[2]) + " layer groups; this cache: block size " + std::to_string(B) +
        ", " + toString(config_.dtype) + ", " + std::to_string(numGroups()) + " groups" +
        (std::equal(shape, shape + 6, expect) ? ", and a different model file or precision)"
                                              : ")"));
  }
  if (nTokens % static_cast<uint32_t>(B) != 0) bad("its token count is not whole blocks");
  LoadedSession out;
  out.tokens.resize(nTokens);
  const std::byte* tokenBytes = r.take(size_t{nTokens} * 4);
  if (nTokens > 0) std::memcpy(out.tokens.data(), tokenBytes, size_t{nTokens} * 4);
  const std::byte* meta = r.take(metaBytes);
  out.metadata.assign(reinterpret_cast<const char*>(meta), metaBytes);
  struct Record {
    uint32_t index, group;
    const std::byte* bytes;
  };
  std::vector<Record> records(nRecords);
  const uint32_t nBlocks = nTokens / static_cast<uint32_t>(B);
  for (Record& rec : records) {
    rec.index = r.get<uint32_t>();
    rec.group = r.get<uint32_t>();
    if (rec.index >= nBlocks || rec.group >= static_cast<uint32_t>(numGroups())) {
      bad("a record names block " + std::to_string(rec.index) + " of group " +
          std::to_string(rec.group) + " outside the session");
    }
    rec.bytes = r.take(static_cast<size_t>(payload));
  }
  std::vector<InstallRecord> installs;
  installs.reserve(records.size());
  for (const Record& rec : records) {
    installs.push_back({static_cast<int32_t>(rec.index), static_cast<int32_t>(rec.group), rec.bytes});
  }
  out.blocksLoaded = installBlocks(out.tokens, installs, /*partial=*/false);
  return out;
}

int32_t KVCache::installBlocks(std::span<const int32_t> tokens, std::vector<InstallRecord>& records,
                               bool partial) {
  const int32_t B = config_.blockSizeTokens;
  const std::vector<uint64_t> chain = blockHashes(tokens);
  std::stable_sort(records.begin(), records.end(), [](const InstallRecord& a,
                                                      const InstallRecord& b) {
    return a.index < b.index;
  });
  // Hold what the cache has already, take blocks for the rest: all or nothing, or (partial) the
  // longest run of whole logical blocks the free blocks allow.
  {
    std::lock_guard lock(mu_);
    int32_t needed = 0;
    size_t fits = records.size();
    for (size_t i = 0; i < records.size(); ++i) {
      InstallRecord& rec = records[i];
      rec.block = pool_.findCached(groupHash(chain[static_cast<size_t>(rec.index)], rec.group));
      // A fresh block and a cached one held alike leave the free queue.
      if (rec.block == kNoBlock || pool_.refCount(rec.block) == 0) ++needed;
      if (needed > pool_.freeBlocks() && fits == records.size()) {
        fits = i;
        while (fits > 0 && records[fits - 1].index == rec.index) --fits;
      }
    }
    if (fits < records.size()) {
      if (!partial) {
        throw KVError(KVErrc::OutOfBlocks, "KV session: " + std::to_string(needed) +
                                               " blocks to load, " +
                                               std::to_string(pool_.freeBlocks()) + " free");
      }
      records.resize(fits);
    }
    for (InstallRecord& rec : records) {
      if (rec.block != kNoBlock) holdLocked(rec.block);
    }
    for (InstallRecord& rec : records) {
      if (rec.block != kNoBlock) continue;
      takeBlocks(std::span<BlockId>(&rec.block, 1), rec.group);
      rec.fresh = true;
      blockFill_[rec.block] = B;
      liveTokens_ += B;
      ++heldRefs_[rec.block];
    }
  }
  // Only this call touches the fresh blocks until they are registered.
  for (const InstallRecord& rec : records) {
    if (rec.fresh) copyBlockIn(rec.block, rec.bytes);
  }
  int32_t loaded = 0;
  std::lock_guard lock(mu_);
  for (const InstallRecord& rec : records) {
    if (!rec.fresh) continue;
    const auto index = static_cast<size_t>(rec.index);
    const uint64_t parent = index == 0 ? hashRoot_ : chain[index - 1];
    if (!pool_.setHash(rec.block, groupHash(chain[index], rec.group))) {
      continue;  // the same content was registered meanwhile: this copy is freed as empty
    }
    const int32_t* blockTokens = tokens.data() + index * static_cast<size_t>(B);
    std::copy(blockTokens, blockTokens + B,
              blockTokens_.begin() + static_cast<long>(rec.block) * B);
    blockParent_[rec.block] = parent;
    ++loaded;
    if (recordEvents_ && rec.group == 0) {
      KVEvent& e = events_.emplace_back();
      e.kind = KVEvent::Kind::BlockStored;
      e.blockSizeTokens = B;
      if (index > 0) e.parentHash = parent;
      e.blockHashes.push_back(chain[index]);
      e.tokenIds.assign(blockTokens, blockTokens + B);
    }
  }
  // Last position first, as a freed sequence: a prefix's root is evicted last.
  for (auto it = records.rbegin(); it != records.rend(); ++it) releaseHeldLocked(it->block);
  return loaded;
}

void KVCache::recordNewBlocks(bool on) {
  std::lock_guard lock(mu_);
  recordNewBlocks_ = on;
  if (!on) newBlocks_.clear();
}

void KVCache::takeNewBlocks(std::vector<ExportedBlock>& out) {
  const auto B = static_cast<size_t>(config_.blockSizeTokens);
  const size_t first = out.size();
  std::vector<BlockId> held;
  {
    std::lock_guard lock(mu_);
    for (const NewBlock& n : newBlocks_) {
      // note: a block evicted (and maybe reused) since it was hashed holds other content now.
      if (!pool_.isHashed(n.block) || pool_.blockHash(n.block) != n.key) continue;
      ExportedBlock& e = out.emplace_back();
      e.key = n.key;
      e.parent = blockParent_[n.block];
      e.index = n.index;
      e.group = n.group;
      const int32_t* t = blockTokens_.data() + static_cast<size_t>(n.block) * B;
      e.tokens.assign(t, t + B);
      holdLocked(n.block);
      held.push_back(n.block);
    }
    newBlocks_.clear();
  }
  try {
    for (size_t i = 0; i < held.size(); ++i) {
      ExportedBlock& e = out[first + i];
      e.payload.resize(blockPayloadBytes());
      copyBlockOut(held[i], e.payload.data());
    }
  } catch (...) {
    std::lock_guard lock(mu_);
    for (BlockId b : held) releaseHeldLocked(b);
    out.resize(first);
    throw;
  }
  std::lock_guard lock(mu_);
  for (BlockId b : held) releaseHeldLocked(b);
}

int32_t KVCache::installTierBlocks(std::span<const int32_t> tokens,
                                   std::span<const TierBlock> blocks) {
  if (!config_.prefixCaching) {
    throw KVError(KVErrc::InvalidArgument, "installTierBlocks: prefix caching is off");
  }
  const int32_t nBlocks = static_cast<int32_t>(tokens.size()) / config_.blockSizeTokens;
  std::vector<InstallRecord> records;
  records.reserve(blocks.size());
  for (const TierBlock& b : blocks) {
    if (b.index < 0 || b.index >= nBlocks || b.group < 0 || b.group >= numGroups()) {
      throw KVError(KVErrc::InvalidArgument,
                    "installTierBlocks: block " + std::to_string(b.index) + " of group " +
                        std::to_string(b.group) + " is outside the prefix's " +
                        std::to_string(nBlocks) + " blocks");
    }
    records.push_back({b.index, b.group, b.payload});
  }
  if (records.empty()) return 0;
  installBlocks(tokens.first(static_cast<size_t>(nBlocks) * config_.blockSizeTokens), records,
                /*partial=*/true);
  if (records.empty()) return 0;
  const int32_t first = records.front().index;
  int32_t n = 0;
  for (const InstallRecord& rec : records) n = std::max(n, rec.index - first + 1);
  return n;
}

}  // namespace cortex::kv
