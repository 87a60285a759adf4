#include "kv/kv_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <map>
#include <new>
#include <ostream>
#include <string>

#include "common/half.h"

namespace cortex::kv {

namespace {

constexpr size_t kArenaAlignment = 64;
constexpr size_t kPageBytes = 4096;

std::string seqName(SeqId seq) { return "sequence " + std::to_string(seq); }

KVCacheConfig validated(const KVCacheConfig& c) {
  auto bad = [](const std::string& what) { throw KVError(KVErrc::InvalidArgument, what); };
  if (c.numLayers <= 0) bad("numLayers must be > 0, got " + std::to_string(c.numLayers));
  if (c.numKVHeads <= 0) bad("numKVHeads must be > 0, got " + std::to_string(c.numKVHeads));
  if (c.headDim <= 0) bad("headDim must be > 0, got " + std::to_string(c.headDim));
  if (c.blockSizeTokens <= 0) {
    bad("blockSizeTokens must be > 0, got " + std::to_string(c.blockSizeTokens));
  }
  if (c.numBlocks < 0) bad("numBlocks must be >= 0, got " + std::to_string(c.numBlocks));
  if ((c.numBlocks > 0) == (c.memoryBudgetBytes > 0)) {
    bad("give exactly one of numBlocks and memoryBudgetBytes");
  }
  return c;
}

}  // namespace

const char* toString(KVLayout layout) {
  return layout == KVLayout::LayerMajor ? "layer-major" : "head-major";
}

// ---------------------------------------------------------------------------------------------

uint64_t bytesPerToken(const KVCacheConfig& c) {
  return 2ull * static_cast<uint64_t>(c.numLayers) * static_cast<uint64_t>(c.numKVHeads) *
         static_cast<uint64_t>(c.headDim) * dtypeBytes(c.dtype);
}

uint64_t bytesPerBlock(const KVCacheConfig& c) {
  return bytesPerToken(c) * static_cast<uint64_t>(c.blockSizeTokens);
}

static int32_t blocksFromConfig(const KVCacheConfig& c) {
  const uint64_t perBlock = kv::bytesPerBlock(c);
  if (c.numBlocks > 0) return c.numBlocks;
  const uint64_t n = c.memoryBudgetBytes / perBlock;
  if (n == 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "memory budget of " + std::to_string(c.memoryBudgetBytes) +
                      " bytes is smaller than one block (" + std::to_string(perBlock) + " bytes)");
  }
  if (n > static_cast<uint64_t>(INT32_MAX)) {
    throw KVError(KVErrc::InvalidArgument, "memory budget gives more than 2^31 blocks");
  }
  return static_cast<int32_t>(n);
}

namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

KVCache::KVCache(const KVCacheConfig& config)
    : config_(validated(config)), numBlocks_(blocksFromConfig(config_)), pool_(numBlocks_) {
  const int64_t B = config_.blockSizeTokens;
  const int64_t H = config_.numKVHeads;
  const int64_t D = config_.headDim;
  const int64_t N = numBlocks_;
  bytesPerBlock_ = kv::bytesPerBlock(config_);
  KVArena& a = arena_;
  a.numLayers = config_.numLayers;
  a.numKVHeads = config_.numKVHeads;
  a.headDim = config_.headDim;
  a.blockSizeTokens = config_.blockSizeTokens;
  a.dtype = config_.dtype;
  a.layerStride = N * H * B * D;
  if (config_.layout == KVLayout::LayerMajor) {
    a.blockStride = H * B * D;
    a.headStride = B * D;
  } else {
    a.blockStride = B * D;
    a.headStride = N * B * D;
  }
  halfBytes_ = static_cast<uint64_t>(config_.numLayers * a.layerStride) * dtypeBytes(a.dtype);
  const uint64_t total = (2 * halfBytes_ + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
  memory_ = static_cast<std::byte*>(std::aligned_alloc(kArenaAlignment, total));
  if (memory_ == nullptr) {
    throw KVError(KVErrc::InvalidArgument,
                  "cannot allocate a KV arena of " + std::to_string(total) + " bytes");
  }
  a.kBase = memory_;
  a.vBase = memory_ + halfBytes_;
  blockFill_.assign(static_cast<size_t>(numBlocks_), 0);
  pendingCopyRefs_.assign(static_cast<size_t>(numBlocks_), 0);
  if (config_.prefixCaching) {
    blockTokens_.assign(static_cast<size_t>(numBlocks_) * static_cast<size_t>(B), 0);
    blockParent_.assign(static_cast<size_t>(numBlocks_), 0);
  }
  // Everything that decides what a block holds, besides its tokens and the tokens before them.
  hashRoot_ = splitmix64(config_.prefixHashSeed ^ splitmix64(
      static_cast<uint64_t>(config_.dtype) << 48 ^ static_cast<uint64_t>(B) << 32 ^
      static_cast<uint64_t>(config_.numLayers) << 16 ^ static_cast<uint64_t>(H) << 8 ^
      static_cast<uint64_t>(D)));
}

KVCache::~KVCache() { std::free(memory_); }

int32_t KVCache::blocksForTokens(int64_t tokens) const {
  if (tokens < 0) throw KVError(KVErrc::InvalidArgument, "negative token count");
  return static_cast<int32_t>((tokens + config_.blockSizeTokens - 1) / config_.blockSizeTokens);
}

void KVCache::warmup() {
  const uint64_t total = 2 * halfBytes_;
  for (uint64_t off = 0; off < total; off += kPageBytes) memory_[off] = std::byte{0};
  if (total > 0) memory_[total - 1] = std::byte{0};
}

KVCache::Sequence& KVCache::find(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw KVError(KVErrc::UnknownSequence, seqName(seq) + " is not allocated");
  return it->second;
}

const KVCache::Sequence& KVCache::find(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) throw KVError(KVErrc::UnknownSequence, seqName(seq) + " is not allocated");
  return it->second;
}

void KVCache::checkLayer(int32_t layer) const {
  if (layer < 0 || layer >= config_.numLayers) {
    throw KVError(KVErrc::LayerOutOfRange, "layer " + std::to_string(layer) + " is not in [0, " +
                                               std::to_string(config_.numLayers) + ")");
  }
}

void KVCache::allocateFor(SeqId seq, int32_t initialTokens) {
  std::lock_guard lock(mu_);
  allocateLocked(seq, initialTokens, true);
}

bool KVCache::tryAllocateFor(SeqId seq, int32_t initialTokens) {
  std::lock_guard lock(mu_);
  return allocateLocked(seq, initialTokens, false) >= 0;
}

int32_t KVCache::allocateLocked(SeqId seq, int32_t initialTokens, bool throwIfShort) {
  if (initialTokens <= 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "allocateFor: initialTokens must be > 0, got " + std::to_string(initialTokens));
  }
  const int32_t nBlocks = blocksForTokens(initialTokens);
  if (seqs_.count(seq) != 0) {
    throw KVError(KVErrc::SequenceExists, seqName(seq) + " is already allocated");
  }
  if (nBlocks > pool_.freeBlocks()) {
    if (!throwIfShort) return -1;
    throw KVError(KVErrc::OutOfBlocks, "allocateFor(" + std::to_string(seq) + ", " +
                                           std::to_string(initialTokens) + " tokens) needs " +
                                           std::to_string(nBlocks) + " blocks, " +
                                           std::to_string(pool_.freeBlocks()) + " free");
  }
  // Allocations that can throw bad_alloc happen before the pool is touched.
  Sequence s;
  s.blocks.resize(static_cast<size_t>(nBlocks));
  auto [it, inserted] = seqs_.emplace(seq, std::move(s));
  (void)inserted;
  pool_.allocate(it->second.blocks, &evictedScratch_);
  noteEvicted();
  it->second.tokens = initialTokens;
  int32_t left = initialTokens;
  for (BlockId b : it->second.blocks) {
    blockFill_[b] = std::min(left, config_.blockSizeTokens);
    left -= blockFill_[b];
  }
  liveTokens_ += initialTokens;
  return 0;
}

int32_t KVCache::blocksNeededLocked(const Sequence& s, int32_t n) const {
  const int32_t B = config_.blockSizeTokens;
  const int64_t capacity = static_cast<int64_t>(s.blocks.size()) * B;
  const int64_t wanted = static_cast<int64_t>(s.tokens) + n;
  const int32_t fresh = wanted > capacity ? blocksForTokens(wanted - capacity) : 0;
  const bool copyOnWrite = s.tokens % B != 0 && pool_.refCount(s.blocks.back()) > 1;
  return fresh + (copyOnWrite ? 1 : 0);
}

int32_t KVCache::blocksNeededToAppend(SeqId seq, int32_t n) const {
  if (n <= 0) throw KVError(KVErrc::InvalidArgument, "append count must be > 0");
  std::lock_guard lock(mu_);
  return blocksNeededLocked(find(seq), n);
}

void KVCache::copyBlock(BlockId from, BlockId to, int32_t tokens) {
  const size_t bytes = static_cast<size_t>(config_.headDim) * dtypeBytes(config_.dtype) *
                       static_cast<size_t>(tokens);
  for (int32_t layer = 0; layer < config_.numLayers; ++layer) {
    for (int32_t head = 0; head < config_.numKVHeads; ++head) {
      // Within a block, one head's rows are contiguous in both layouts.
      const int64_t src = arena_.rowByteOffset({from, 0}, layer, head);
      const int64_t dst = arena_.rowByteOffset({to, 0}, layer, head);
      std::memcpy(arena_.kBase + dst, arena_.kBase + src, bytes);
      std::memcpy(arena_.vBase + dst, arena_.vBase + src, bytes);
    }
  }
}

int32_t KVCache::appendTokens(SeqId seq, int32_t n) { return appendAndCopy(seq, n, true); }

bool KVCache::tryAppendTokens(SeqId seq, int32_t n) { return appendAndCopy(seq, n, false) >= 0; }

int32_t KVCache::appendAndCopy(SeqId seq, int32_t n, bool throwIfShort) {
  PendingCopy copy;
  int32_t first = 0;
  {
    std::lock_guard lock(mu_);
    first = appendLocked(seq, n, throwIfShort, copy);
  }
  if (copy.from == kNoBlock) return first;
  // note: the source keeps the reference taken for this copy, so no other sequence can be given
  // its block until the copy is over; only this sequence's caller touches the destination.
  copyBlock(copy.from, copy.to, copy.tokens);
  std::lock_guard lock(mu_);
  --pendingCopyRefs_[copy.from];
  if (pool_.refCount(copy.from) == 1) {
    liveTokens_ -= blockFill_[copy.from];
    blockFill_[copy.from] = 0;
  }
  pool_.free(copy.from);
  return first;
}

int32_t KVCache::appendLocked(SeqId seq, int32_t n, bool throwIfShort, PendingCopy& copy) {
  if (n <= 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "appendTokens: n must be > 0, got " + std::to_string(n));
  }
  const int32_t B = config_.blockSizeTokens;
  Sequence& s = find(seq);
  // Fast path (15 of 16 decode steps at block size 16): room in an unshared last block. The
  // block's fill count says how much room is left without a division.
  const BlockId last = s.blocks.back();
  if (blockFill_[last] + n <= B && pool_.refCount(last) == 1) {
    blockFill_[last] += n;
    liveTokens_ += n;
    const int32_t first = s.tokens;
    s.tokens += n;
    return first;
  }
  if (static_cast<int64_t>(s.tokens) + n > INT32_MAX) {
    throw KVError(KVErrc::InvalidArgument, seqName(seq) + " would exceed 2^31 tokens");
  }
  const int32_t needed = blocksNeededLocked(s, n);
  if (needed > pool_.freeBlocks()) {
    if (!throwIfShort) return -1;
    throw KVError(KVErrc::OutOfBlocks, "appendTokens(" + std::to_string(seq) + ", " +
                                           std::to_string(n) + ") needs " +
                                           std::to_string(needed) + " blocks, " +
                                           std::to_string(pool_.freeBlocks()) + " free");
  }
  // Grow the table geometrically before changing anything, so a bad_alloc leaves no trace and
  // appends stay amortised O(1).
  const size_t maxBlocks = s.blocks.size() + static_cast<size_t>(needed);
  if (s.blocks.capacity() < maxBlocks) s.blocks.reserve(std::max(maxBlocks, 2 * s.blocks.capacity()));
  const int32_t first = s.tokens;
  const int32_t fillInLast = s.tokens % B;
  if (fillInLast != 0 && pool_.refCount(s.blocks.back()) > 1) {
    // Copy on write: the partly filled last block is shared, and we are about to write into it.
    const BlockId shared = s.blocks.back();
    const BlockId own = pool_.allocateOne(&evictedScratch_);
    copy = PendingCopy{shared, own, fillInLast};
    ++pendingCopyRefs_[shared];  // this sequence's reference now belongs to the copy
    blockFill_[own] = fillInLast;
    liveTokens_ += fillInLast;
    s.blocks.back() = own;
  }
  int32_t left = n;
  if (fillInLast != 0) {
    const int32_t take = std::min(left, B - fillInLast);
    blockFill_[s.blocks.back()] += take;
    left -= take;
  }
  if (left > 0) {
    const size_t oldSize = s.blocks.size();
    s.blocks.resize(oldSize + static_cast<size_t>(blocksForTokens(left)));
    pool_.allocate(std::span<BlockId>(s.blocks).subspan(oldSize), &evictedScratch_);
    for (size_t i = oldSize; i < s.blocks.size(); ++i) {
      blockFill_[s.blocks[i]] = std::min(left, B);
      left -= blockFill_[s.blocks[i]];
    }
  }
  s.tokens += n;
  liveTokens_ += n;
  noteEvicted();
  return first;
}

void KVCache::fork(SeqId src, SeqId dst) {
  std::lock_guard lock(mu_);
  const Sequence& s = find(src);
  if (seqs_.count(dst) != 0) {
    throw KVError(KVErrc::SequenceExists, "fork: " + seqName(dst) + " is already allocated");
  }
  Sequence copy = s;
  seqs_.emplace(dst, std::move(copy));
  for (BlockId b : s.blocks) pool_.addRef(b);
}

void KVCache::releaseBlocksLocked(const std::vector<BlockId>& blocks) {
  for (BlockId b : blocks) {
    if (pool_.refCount(b) == 1) {
      liveTokens_ -= blockFill_[b];
      blockFill_[b] = 0;
    }
  }
  // Last block first: the free queue then evicts a sequence's cached tail before its root.
  const std::vector<BlockId> reversed(blocks.rbegin(), blocks.rend());
  pool_.free(reversed);
}

bool KVCache::freeFor(SeqId seq) {
  std::lock_guard lock(mu_);
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return false;
  releaseBlocksLocked(it->second.blocks);
  seqs_.erase(it);
  return true;
}

// --- prefix caching ------------------------------------------------------------------------------

uint64_t KVCache::chainHash(uint64_t parent, const int32_t* tokens) const {
  uint64_t h = splitmix64(parent);
  for (int32_t i = 0; i < config_.blockSizeTokens; ++i) {
    h = splitmix64(h ^ static_cast<uint32_t>(tokens[i]));
  }
  return h;
}

std::vector<uint64_t> KVCache::blockHashes(std::span<const int32_t> tokens) const {
  const int32_t B = config_.blockSizeTokens;
  std::vector<uint64_t> out;
  uint64_t parent = hashRoot_;
  for (size_t i = 0; (i + 1) * static_cast<size_t>(B) <= tokens.size(); ++i) {
    parent = chainHash(parent, tokens.data() + i * static_cast<size_t>(B));
    out.push_back(parent);
  }
  return out;
}

int32_t KVCache::lookupLocked(std::span<const int32_t> prefix, int32_t maxBlocks,
                              std::vector<BlockId>* out, std::vector<uint64_t>* hashes) const {
  if (!config_.prefixCaching) return 0;
  const auto B = static_cast<size_t>(config_.blockSizeTokens);
  const int32_t full = std::min(maxBlocks, static_cast<int32_t>(prefix.size() / B));
  uint64_t parent = hashRoot_;
  int32_t hits = 0;
  for (; hits < full; ++hits) {
    const int32_t* tokens = prefix.data() + static_cast<size_t>(hits) * B;
    const uint64_t h = chainHash(parent, tokens);
    const BlockId b = pool_.findCached(h);
    if (b == kNoBlock || blockParent_[b] != parent ||
        !std::equal(tokens, tokens + B, blockTokens_.begin() + static_cast<long>(b * B))) {
      break;
    }
    if (out != nullptr) out->push_back(b);
    if (hashes != nullptr) hashes->push_back(h);
    parent = h;
  }
  return hits;
}

int32_t KVCache::cachedPrefixTokens(std::span<const int32_t> tokens) const {
  std::lock_guard lock(mu_);
  return lookupLocked(tokens, INT32_MAX, nullptr, nullptr) * config_.blockSizeTokens;
}

int32_t KVCache::blocksNeededToAllocate(std::span<const int32_t> prefix,
                                        int32_t totalTokens) const {
  if (totalTokens <= 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "blocksNeededToAllocate: totalTokens must be > 0, got " +
                      std::to_string(totalTokens));
  }
  std::vector<BlockId> hits;
  std::lock_guard lock(mu_);
  lookupLocked(prefix, (totalTokens - 1) / config_.blockSizeTokens, &hits, nullptr);
  int32_t cached = 0;
  for (BlockId b : hits) cached += pool_.refCount(b) == 0 ? 1 : 0;
  return blocksForTokens(totalTokens) - static_cast<int32_t>(hits.size()) + cached;
}

int32_t KVCache::tryAllocateWithPrefix(SeqId seq, std::span<const int32_t> prefix,
                                       int32_t totalTokens) {
  if (totalTokens <= 0) {
    throw KVError(KVErrc::InvalidArgument, "tryAllocateWithPrefix: totalTokens must be > 0, got " +
                                               std::to_string(totalTokens));
  }
  const int32_t B = config_.blockSizeTokens;
  Sequence s;
  std::lock_guard lock(mu_);
  if (seqs_.count(seq) != 0) {
    throw KVError(KVErrc::SequenceExists, seqName(seq) + " is already allocated");
  }
  const int32_t hits = lookupLocked(prefix, (totalTokens - 1) / B, &s.blocks, &s.hashes);
  const int32_t fresh = blocksForTokens(totalTokens) - hits;
  int32_t cached = 0;
  for (BlockId b : s.blocks) cached += pool_.refCount(b) == 0 ? 1 : 0;
  if (fresh + cached > pool_.freeBlocks()) return -1;
  // Allocations that can throw bad_alloc happen before the pool is touched.
  s.blocks.resize(static_cast<size_t>(hits + fresh));
  auto [it, inserted] = seqs_.emplace(seq, std::move(s));
  (void)inserted;
  std::vector<BlockId>& blocks = it->second.blocks;
  // Hits first, so the allocation below cannot evict them.
  for (int32_t i = 0; i < hits; ++i) {
    const BlockId b = blocks[static_cast<size_t>(i)];
    if (pool_.refCount(b) == 0) {
      blockFill_[b] = B;
      liveTokens_ += B;
    }
    pool_.touch(b);
  }
  pool_.allocate(std::span<BlockId>(blocks).subspan(static_cast<size_t>(hits)), &evictedScratch_);
  noteEvicted();
  int32_t left = totalTokens - hits * B;
  for (size_t i = static_cast<size_t>(hits); i < blocks.size(); ++i) {
    blockFill_[blocks[i]] = std::min(left, B);
    left -= blockFill_[blocks[i]];
  }
  liveTokens_ += totalTokens - hits * B;
  it->second.tokens = totalTokens;
  return hits * B;
}

void KVCache::cacheComputedBlocks(SeqId seq, std::span<const int32_t> tokens) {
  if (!config_.prefixCaching) return;
  const auto B = static_cast<size_t>(config_.blockSizeTokens);
  std::lock_guard lock(mu_);
  Sequence& s = find(seq);
  if (tokens.size() > static_cast<size_t>(s.tokens)) {
    throw KVError(KVErrc::InvalidArgument,
                  "cacheComputedBlocks: " + std::to_string(tokens.size()) + " tokens given, " +
                      seqName(seq) + " holds " + std::to_string(s.tokens));
  }
  const size_t full = tokens.size() / B;
  if (s.hashes.size() >= full) return;
  s.hashes.reserve(full);
  KVEvent* stored = nullptr;  // the event of the current run of newly registered blocks
  for (size_t i = s.hashes.size(); i < full; ++i) {
    const uint64_t parent = i == 0 ? hashRoot_ : s.hashes[i - 1];
    const int32_t* blockTokens = tokens.data() + i * B;
    const uint64_t h = chainHash(parent, blockTokens);
    const BlockId b = s.blocks[i];
    s.hashes.push_back(h);
    // note: a shared block may have been registered through another owner already. A block whose
    // content another block already holds stays unhashed: it is freed as an empty block and the
    // other copy serves later hits.
    if (pool_.isHashed(b) || !pool_.setHash(b, h)) {
      stored = nullptr;
      continue;
    }
    std::copy(blockTokens, blockTokens + B, blockTokens_.begin() + static_cast<long>(b * B));
    blockParent_[b] = parent;
    if (!recordEvents_) continue;
    if (stored == nullptr) {
      stored = &events_.emplace_back();
      stored->kind = KVEvent::Kind::BlockStored;
      stored->blockSizeTokens = config_.blockSizeTokens;
      if (i > 0) stored->parentHash = parent;
    }
    stored->blockHashes.push_back(h);
    stored->tokenIds.insert(stored->tokenIds.end(), blockTokens, blockTokens + B);
  }
}

int32_t KVCache::resetPrefixCache() {
  std::lock_guard lock(mu_);
  const int32_t evicted = pool_.evictAllCached(&evictedScratch_);
  if (recordEvents_ && pool_.hashedBlocks() == 0 && evicted > 0) {
    evictedScratch_.clear();
    KVEvent& e = events_.emplace_back();
    e.kind = KVEvent::Kind::AllBlocksCleared;
    e.blockSizeTokens = config_.blockSizeTokens;
  }
  noteEvicted();
  return evicted;
}

void KVCache::noteEvicted() {
  if (evictedScratch_.empty()) return;
  if (recordEvents_) {
    KVEvent& e = events_.emplace_back();
    e.kind = KVEvent::Kind::BlockRemoved;
    e.blockSizeTokens = config_.blockSizeTokens;
    e.blockHashes = evictedScratch_;
  }
  evictedScratch_.clear();
}

void KVCache::recordEvents(bool on) {
  std::lock_guard lock(mu_);
  recordEvents_ = on;
  if (!on) events_.clear();
}

void KVCache::takeEvents(std::vector<KVEvent>& out) {
  std::lock_guard lock(mu_);
  for (KVEvent& e : events_) out.push_back(std::move(e));
  events_.clear();
}

int32_t KVCache::usedTokens(SeqId seq) const {
  std::lock_guard lock(mu_);
  return find(seq).tokens;
}

int32_t KVCache::getTokenOffsetInBlock(SeqId seq) const {
  std::lock_guard lock(mu_);
  return find(seq).tokens % config_.blockSizeTokens;
}

bool KVCache::hasSequence(SeqId seq) const {
  std::lock_guard lock(mu_);
  return seqs_.count(seq) != 0;
}

std::vector<BlockId> KVCache::blockTable(SeqId seq) const {
  std::lock_guard lock(mu_);
  return find(seq).blocks;
}

TokenSlot KVCache::slotFor(SeqId seq, int32_t pos) const {
  TokenSlot slot;
  slotsFor(seq, pos, std::span<TokenSlot>(&slot, 1));
  return slot;
}

void KVCache::slotsFor(SeqId seq, int32_t firstPos, std::span<TokenSlot> out) const {
  std::lock_guard lock(mu_);
  slotsLocked(seq, find(seq), firstPos, out);
}

void KVCache::slotsLocked(SeqId seq, const Sequence& s, int32_t firstPos,
                          std::span<TokenSlot> out) const {
  const int32_t B = config_.blockSizeTokens;
  if (firstPos < 0 || static_cast<int64_t>(firstPos) + static_cast<int64_t>(out.size()) > s.tokens) {
    throw KVError(KVErrc::InvalidArgument,
                  "positions [" + std::to_string(firstPos) + ", " +
                      std::to_string(static_cast<int64_t>(firstPos) + static_cast<int64_t>(out.size())) +
                      ") are outside " + seqName(seq) + "'s " + std::to_string(s.tokens) +
                      " tokens");
  }
  for (size_t i = 0; i < out.size(); ++i) {
    const int32_t pos = firstPos + static_cast<int32_t>(i);
    out[i] = TokenSlot{s.blocks[static_cast<size_t>(pos / B)], pos % B};
  }
}

void KVCache::resolveStep(std::span<const StepSequence> step, std::vector<TokenSlot>& slots,
                          std::vector<BlockId>& blockTables,
                          std::vector<int32_t>& tableStarts) const {
  slots.clear();
  blockTables.clear();
  tableStarts.clear();
  std::lock_guard lock(mu_);
  try {
    for (const StepSequence& st : step) {
      const Sequence& s = find(st.seq);
      const size_t at = slots.size();
      slots.resize(at + static_cast<size_t>(std::max(st.numTokens, 0)));
      slotsLocked(st.seq, s, st.firstPos, std::span<TokenSlot>(slots).subspan(at));
      const auto n = static_cast<size_t>(blocksForTokens(static_cast<int64_t>(st.firstPos) + st.numTokens));
      tableStarts.push_back(static_cast<int32_t>(blockTables.size()));
      blockTables.insert(blockTables.end(), s.blocks.begin(), s.blocks.begin() + static_cast<long>(n));
    }
  } catch (...) {
    slots.clear();
    blockTables.clear();
    tableStarts.clear();
    throw;
  }
}

std::byte* KVCache::kRow(TokenSlot slot, int32_t layer, int32_t head) {
  checkLayer(layer);
  return arena_.kBase + arena_.rowByteOffset(slot, layer, head);
}

std::byte* KVCache::vRow(TokenSlot slot, int32_t layer, int32_t head) {
  checkLayer(layer);
  return arena_.vBase + arena_.rowByteOffset(slot, layer, head);
}

void KVCache::writeKV(TokenSlot slot, int32_t layer, const float* k, const float* v) {
  checkLayer(layer);
  kv::writeKV(arena_, slot, layer, k, v);
}

PagedKVView KVCache::getKView(SeqId seq, int32_t layer) const {
  checkLayer(layer);
  std::lock_guard lock(mu_);
  const Sequence& s = find(seq);
  return arena_.kView(layer, s.blocks.data(), static_cast<int32_t>(s.blocks.size()), s.tokens);
}

PagedKVView KVCache::getVView(SeqId seq, int32_t layer) const {
  checkLayer(layer);
  std::lock_guard lock(mu_);
  const Sequence& s = find(seq);
  return arena_.vView(layer, s.blocks.data(), static_cast<int32_t>(s.blocks.size()), s.tokens);
}

KVCacheStats KVCache::statsLocked() const {
  KVCacheStats st;
  st.totalBlocks = pool_.totalBlocks();
  st.usedBlocks = pool_.usedBlocks();
  st.freeBlocks = pool_.freeBlocks();
  st.sharedBlocks = pool_.sharedBlocks();
  st.cachedBlocks = pool_.cachedBlocks();
  st.numSequences = static_cast<int32_t>(seqs_.size());
  st.liveTokens = liveTokens_;
  st.allocatedTokenSlots = static_cast<int64_t>(st.usedBlocks) * config_.blockSizeTokens;
  st.totalBytes = static_cast<uint64_t>(st.totalBlocks) * bytesPerBlock_;
  st.allocatedBytes = static_cast<uint64_t>(st.usedBlocks) * bytesPerBlock_;
  st.freeBytes = static_cast<uint64_t>(st.freeBlocks) * bytesPerBlock_;
  if (st.allocatedTokenSlots > 0) {
    st.utilization =
        static_cast<double>(st.liveTokens) / static_cast<double>(st.allocatedTokenSlots);
    st.fragmentation = 1.0 - st.utilization;
  }
  return st;
}

KVCacheStats KVCache::stats() const {
  std::lock_guard lock(mu_);
  return statsLocked();
}

uint64_t KVCache::getTotalAllocated() const { return stats().allocatedBytes; }
uint64_t KVCache::getTotalFree() const { return stats().freeBytes; }
int32_t KVCache::getNumAllocatedSequences() const { return stats().numSequences; }
bool KVCache::isFull() const { return freeBlocks() == 0; }
double KVCache::getFragmentation() const { return stats().fragmentation; }
double KVCache::getUtilization() const { return stats().utilization; }

int32_t KVCache::freeBlocks() const {
  std::lock_guard lock(mu_);
  return pool_.freeBlocks();
}

int32_t KVCache::usedBlocks() const {
  std::lock_guard lock(mu_);
  return pool_.usedBlocks();
}

void KVCache::dumpCacheStats(std::ostream& os) const {
  std::lock_guard lock(mu_);
  const KVCacheStats st = statsLocked();
  constexpr double kMiB = 1024.0 * 1024.0;
  const auto flags = os.flags();
  os << std::fixed << std::setprecision(2);
  os << "=== KV Cache Statistics ===\n"
     << "Layers: " << config_.numLayers << ", KV heads: " << config_.numKVHeads
     << ", head dim: " << config_.headDim << ", dtype: " << toString(config_.dtype)
     << ", layout: " << toString(config_.layout) << "\n"
     << "Block size: " << config_.blockSizeTokens << " tokens (" << bytesPerBlock_
     << " bytes)\n"
     << "Total blocks: " << st.totalBlocks << "\n"
     << "Used blocks: " << st.usedBlocks << " (" << st.sharedBlocks << " shared)\n"
     << "Free blocks: " << st.freeBlocks << " (" << st.cachedBlocks << " of them cached)\n"
     << "Total memory: " << static_cast<double>(st.totalBytes) / kMiB << " MiB\n"
     << "Allocated: " << static_cast<double>(st.allocatedBytes) / kMiB << " MiB\n"
     << "Free: " << static_cast<double>(st.freeBytes) / kMiB << " MiB\n"
     << "Sequences: " << st.numSequences << "\n"
     << "Live tokens: " << st.liveTokens << " of " << st.allocatedTokenSlots
     << " allocated slots\n"
     << "Utilization: " << st.utilization * 100.0 << "%\n"
     << "Fragmentation: " << st.fragmentation * 100.0 << "%\n";
  os.flags(flags);
  // Sorted by id so dumps are stable and diffable.
  std::map<SeqId, const Sequence*> sorted;
  for (const auto& [id, s] : seqs_) sorted.emplace(id, &s);
  for (const auto& [id, s] : sorted) {
    os << "  seq " << id << ": " << s->tokens << " tokens, blocks [";
    for (size_t i = 0; i < s->blocks.size(); ++i) {
      os << (i ? " " : "") << s->blocks[i];
      if (pool_.refCount(s->blocks[i]) > 1) os << "*";
    }
    os << "]\n";
  }
}

void KVCache::dumpBlockMap(std::ostream& os) const {
  std::lock_guard lock(mu_);
  pool_.dumpBlockMap(os);
}

void KVCache::checkInvariants() const {
  auto fail = [](const std::string& what) { throw KVError(KVErrc::InvariantViolated, what); };
  std::lock_guard lock(mu_);
  pool_.checkInvariants();
  const int32_t B = config_.blockSizeTokens;
  std::vector<int32_t> owners(static_cast<size_t>(numBlocks_), 0);
  for (const auto& [id, s] : seqs_) {
    if (s.tokens <= 0) fail(seqName(id) + " has " + std::to_string(s.tokens) + " tokens");
    if (static_cast<int64_t>(s.blocks.size()) != blocksForTokens(s.tokens)) {
      fail(seqName(id) + " holds " + std::to_string(s.blocks.size()) + " blocks for " +
           std::to_string(s.tokens) + " tokens");
    }
    for (size_t i = 0; i < s.blocks.size(); ++i) {
      const BlockId b = s.blocks[i];
      if (b < 0 || b >= numBlocks_) fail(seqName(id) + " holds invalid block " + std::to_string(b));
      ++owners[b];
      if (i < s.hashes.size()) {
        if (static_cast<int64_t>(i + 1) * B > s.tokens) {
          fail(seqName(id) + " has a hash for its partly filled block " + std::to_string(i));
        }
        if (pool_.isHashed(b) &&
            (pool_.blockHash(b) != s.hashes[i] ||
             blockParent_[b] != (i == 0 ? hashRoot_ : s.hashes[i - 1]))) {
          fail("block " + std::to_string(b) + "'s hash or parent is not " + seqName(id) +
               "'s chain at block " + std::to_string(i));
        }
      } else if (pool_.isHashed(b)) {
        fail(seqName(id) + " holds hashed block " + std::to_string(b) + " at unhashed position " +
             std::to_string(i));
      }
      const int32_t expectFill =
          i + 1 < s.blocks.size() ? B : s.tokens - static_cast<int32_t>(i) * B;
      if (blockFill_[b] != expectFill) {
        fail("block " + std::to_string(b) + " records " + std::to_string(blockFill_[b]) +
             " tokens, " + seqName(id) + " expects " + std::to_string(expectFill));
      }
    }
  }
  int64_t live = 0;
  for (BlockId b = 0; b < numBlocks_; ++b) {
    if (pool_.refCount(b) != owners[b] + pendingCopyRefs_[b]) {
      fail("block " + std::to_string(b) + " has ref count " + std::to_string(pool_.refCount(b)) +
           " but " + std::to_string(owners[b]) + " block tables and " +
           std::to_string(pendingCopyRefs_[b]) + " copies hold it");
    }
    if (pool_.refCount(b) == 0 && blockFill_[b] != 0) {
      fail("free block " + std::to_string(b) + " records " + std::to_string(blockFill_[b]) +
           " tokens");
    }
    live += blockFill_[b];
  }
  if (live != liveTokens_) {
    fail("live tokens " + std::to_string(liveTokens_) + " but blocks hold " + std::to_string(live));
  }
  const KVCacheStats st = statsLocked();
  if (st.allocatedBytes + st.freeBytes != st.totalBytes ||
      st.totalBytes != static_cast<uint64_t>(numBlocks_) * bytesPerBlock_ ||
      st.totalBytes > 2 * halfBytes_) {
    fail("byte accounting: allocated + free != total");
  }
}

}  // namespace cortex::kv
