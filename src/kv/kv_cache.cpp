#include "kv/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <map>
#include <new>
#include <numeric>
#include <ostream>
#include <string>

#include "common/half.h"

namespace cortex::kv {

namespace {

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

KVGroups kvGroups(const KVCacheConfig& c) {
  if (!c.layerWindows.empty() && c.layerWindows.size() != static_cast<size_t>(c.numLayers)) {
    throw KVError(KVErrc::InvalidArgument,
                  "layerWindows has " + std::to_string(c.layerWindows.size()) +
                      " entries for " + std::to_string(c.numLayers) + " layers");
  }
  std::map<int32_t, std::vector<int32_t>> byWindow;  // window -> layers; global (0) first
  for (int32_t l = 0; l < c.numLayers; ++l) {
    const int32_t w = c.layerWindows.empty() ? 0 : c.layerWindows[static_cast<size_t>(l)];
    if (w < 0) {
      throw KVError(KVErrc::InvalidArgument,
                    "layer " + std::to_string(l) + " has window " + std::to_string(w));
    }
    byWindow[c.hybrid ? w : 0].push_back(l);
  }
  KVGroups out;
  out.layersPerGroup = 0;
  for (const auto& [w, layers] : byWindow) {
    out.layersPerGroup = std::gcd(out.layersPerGroup, static_cast<int32_t>(layers.size()));
  }
  out.places.resize(static_cast<size_t>(c.numLayers));
  for (const auto& [w, layers] : byWindow) {
    for (size_t i = 0; i < layers.size(); i += static_cast<size_t>(out.layersPerGroup)) {
      KVGroup& g = out.groups.emplace_back();
      g.window = w;
      g.layers.assign(layers.begin() + static_cast<long>(i),
                      layers.begin() + static_cast<long>(i) + out.layersPerGroup);
      for (int32_t slot = 0; slot < out.layersPerGroup; ++slot) {
        out.places[static_cast<size_t>(g.layers[static_cast<size_t>(slot)])] = {
            static_cast<int32_t>(out.groups.size() - 1), slot};
      }
    }
  }
  return out;
}

uint64_t bytesPerBlock(const KVCacheConfig& c) {
  return 2ull * static_cast<uint64_t>(kvGroups(c).layersPerGroup) *
         static_cast<uint64_t>(c.numKVHeads) * rowBytes(c.dtype, c.headDim) *
         static_cast<uint64_t>(c.blockSizeTokens);
}

namespace {

// Blocks a windowed group holds at most while positions up to `tokens` are computed `step` at a
// time: keys from W - 1 positions back through the step's last position, W - 1 + step positions,
// which touch at most ceil((W - 2 + step) / B) + 1 blocks.
int64_t windowBlocks(int64_t window, int64_t step, int64_t blockSize) {
  const int64_t span = window - 1 + std::max<int64_t>(step, 1);
  return (span - 1 + blockSize - 1) / blockSize + 1;
}

}  // namespace

int64_t blocksForSequence(const KVCacheConfig& c, int64_t tokens, int32_t stepTokens) {
  const int64_t B = c.blockSizeTokens;
  const int64_t nb = (std::max<int64_t>(tokens, 0) + B - 1) / B;
  int64_t total = 0;
  for (const KVGroup& g : kvGroups(c).groups) {
    total += g.window == 0 ? nb : std::min(nb, windowBlocks(g.window, stepTokens, B));
  }
  return total;
}

int64_t blocksForWindowedSequence(const KVCacheConfig& c, SeqWindow win, int32_t stepTokens) {
  const int64_t B = c.blockSizeTokens;
  int64_t total = 0;
  for (const KVGroup& g : kvGroups(c).groups) {
    total += g.window == 0 ? (win.sinks + B - 1) / B + windowBlocks(win.window, stepTokens, B)
                           : windowBlocks(g.window, stepTokens, B);
  }
  return total;
}

uint64_t bytesForSequence(const KVCacheConfig& c, int64_t tokens, int32_t stepTokens) {
  return static_cast<uint64_t>(blocksForSequence(c, tokens, stepTokens)) * bytesPerBlock(c);
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

static int32_t capacityFromConfig(const KVCacheConfig& c, int32_t numBlocks) {
  const uint64_t n = c.maxMemoryBytes / kv::bytesPerBlock(c);
  if (n > static_cast<uint64_t>(INT32_MAX)) {
    throw KVError(KVErrc::InvalidArgument, "the maximum KV memory gives more than 2^31 blocks");
  }
  return std::max(numBlocks, static_cast<int32_t>(n));
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
    : config_(validated(config)),
      groups_(kvGroups(config_)),
      numBlocks_(blocksFromConfig(config_)),
      capacity_(capacityFromConfig(config_, numBlocks_.load())),
      pool_(numBlocks_.load(), capacity_) {
  const int64_t B = config_.blockSizeTokens;
  const int64_t H = config_.numKVHeads;
  const int64_t D = rowStrideElements(config_.dtype, config_.headDim);  // a row, its scale included
  // Strides over the capacity, so a block's address never depends on how many blocks are in use.
  const int64_t N = capacity_;
  bytesPerBlock_ = kv::bytesPerBlock(config_);
  KVArena& a = arena_;
  a.numLayers = config_.numLayers;
  a.numKVHeads = config_.numKVHeads;
  a.headDim = config_.headDim;
  a.blockSizeTokens = config_.blockSizeTokens;
  a.numGroups = numGroups();
  a.layersPerBlock = groups_.layersPerGroup;
  a.places = groups_.places;
  a.dtype = config_.dtype;
  a.tokenStride = D;
  a.slotStride = N * H * B * D;
  if (config_.layout == KVLayout::LayerMajor) {
    a.blockStride = H * B * D;
    a.headStride = B * D;
  } else {
    a.blockStride = B * D;
    a.headStride = N * B * D;
  }
  halfBytes_ = static_cast<uint64_t>(a.layersPerBlock * a.slotStride) * dtypeBytes(a.dtype);
  // Address space for the capacity, no access; the blocks in use get memory (commitBlocks). The
  // mapping is page-aligned, which covers the 64 bytes the kernels' loads want.
  reservedBytes_ = std::max<uint64_t>(2 * halfBytes_, 1);
  void* p = mmap(nullptr, reservedBytes_, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) {
    throw KVError(KVErrc::InvalidArgument, "cannot reserve a KV arena of " +
                                               std::to_string(reservedBytes_) + " bytes: " +
                                               std::strerror(errno));
  }
  memory_ = static_cast<std::byte*>(p);
  a.kBase = memory_;
  a.vBase = memory_ + halfBytes_;
  try {
    commitBlocks(0, numBlocks());
  } catch (...) {
    munmap(memory_, reservedBytes_);
    throw;
  }
  blockFill_.assign(static_cast<size_t>(capacity_), 0);
  blockGroup_.assign(static_cast<size_t>(capacity_), 0);
  heldRefs_.assign(static_cast<size_t>(capacity_), 0);
  if (config_.prefixCaching) {
    blockTokens_.assign(static_cast<size_t>(capacity_) * static_cast<size_t>(B), 0);
    blockParent_.assign(static_cast<size_t>(capacity_), 0);
  }
  // Everything that decides what a block holds, besides its tokens and the tokens before them
  // (and its group: groupHash).
  hashRoot_ = splitmix64(config_.prefixHashSeed ^ splitmix64(
      static_cast<uint64_t>(config_.dtype) << 48 ^ static_cast<uint64_t>(B) << 32 ^
      static_cast<uint64_t>(config_.numLayers) << 16 ^ static_cast<uint64_t>(H) << 8 ^
      static_cast<uint64_t>(D)));
  if (numGroups() > 1) {
    for (const KVGroup& g : groups_.groups) {
      hashRoot_ = splitmix64(hashRoot_ ^ static_cast<uint64_t>(g.window) << 32 ^
                             static_cast<uint64_t>(g.layers.size()));
    }
  }
}

KVCache::~KVCache() {
  if (memory_ != nullptr) munmap(memory_, reservedBytes_);
}

int32_t KVCache::blocksForTokens(int64_t tokens) const {
  if (tokens < 0) throw KVError(KVErrc::InvalidArgument, "negative token count");
  return static_cast<int32_t>((tokens + config_.blockSizeTokens - 1) / config_.blockSizeTokens);
}

int64_t KVCache::blocksForSequence(int64_t tokens, int32_t stepTokens) const {
  return kv::blocksForSequence(config_, tokens, stepTokens);
}

int64_t KVCache::maxSequenceTokensFor(int32_t blocks, int32_t stepTokens) const {
  const int64_t B = config_.blockSizeTokens;
  const int64_t N = blocks;
  if (kv::blocksForSequence(config_, static_cast<int64_t>(INT32_MAX / B) * B, stepTokens) <= N) {
    return INT32_MAX;  // only windows, and they fit
  }
  int64_t lo = 0, hi = N;  // the most logical blocks whose blocks fit (blocks grow with tokens)
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (kv::blocksForSequence(config_, mid * B, stepTokens) <= N) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo * B;
}

void KVCache::warmup() {
  forEachBlockRange(0, numBlocks(), [&](size_t off, size_t len) {
    for (size_t at = off; at < off + len; at += kPageBytes) memory_[at] = std::byte{0};
    memory_[off + len - 1] = std::byte{0};
  });
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

void KVCache::checkGroup(int32_t group) const {
  if (group < 0 || group >= numGroups()) {
    throw KVError(KVErrc::InvalidArgument, "group " + std::to_string(group) + " is not in [0, " +
                                               std::to_string(numGroups()) + ")");
  }
}

int32_t KVCache::firstNeededBlock(int32_t group, int64_t tokens) const {
  const int64_t w = groups_.groups[static_cast<size_t>(group)].window;
  if (w == 0) return 0;
  return static_cast<int32_t>(std::max<int64_t>(0, tokens - w + 1) / config_.blockSizeTokens);
}

int32_t KVCache::firstNeededBlock(const Sequence& s, int32_t group, int64_t tokens) const {
  const int64_t own = groups_.groups[static_cast<size_t>(group)].window;
  const int64_t w = own > 0 ? own : s.win.window;
  if (w == 0) return 0;
  const int32_t kept = s.tables[static_cast<size_t>(group)].kept;
  return std::max(kept, static_cast<int32_t>(std::max<int64_t>(0, tokens - w + 1) /
                                             config_.blockSizeTokens));
}

void KVCache::applyWindow(Sequence& s, SeqWindow win) const {
  if (win.window < 0 || win.sinks < 0 || (win.sinks > 0 && win.window == 0)) {
    throw KVError(KVErrc::InvalidArgument,
                  "a sequence window needs window >= 0 and sinks >= 0, sinks only with a window "
                  "(got window " + std::to_string(win.window) + ", sinks " +
                      std::to_string(win.sinks) + ")");
  }
  s.win = win;
  if (!win.on()) return;
  const int32_t sinkBlocks = blocksForTokens(win.sinks);
  for (int32_t g = 0; g < numGroups(); ++g) {
    Table& t = s.tables[static_cast<size_t>(g)];
    t.kept = groups_.groups[static_cast<size_t>(g)].window == 0 ? sinkBlocks : 0;
    t.dropped = std::max(t.dropped, t.kept);
  }
}

int32_t KVCache::fullAttentionBlocks(SeqWindow win) const {
  if (!win.on()) return INT32_MAX;
  return static_cast<int32_t>((int64_t{win.sinks} + win.window) / config_.blockSizeTokens);
}

int32_t KVCache::hashableBlocks(const Sequence& s) const {
  return s.shifted > 0 ? static_cast<int32_t>(s.hashes.size()) : fullAttentionBlocks(s.win);
}

void KVCache::giveBackLocked(Table& t, int32_t drop) {
  for (; t.dropped < drop; ++t.dropped) {
    BlockId& b = t.blocks[static_cast<size_t>(t.dropped)];
    if (b == kNoBlock) continue;
    if (pool_.refCount(b) == 1) {
      liveTokens_ -= blockFill_[b];
      blockFill_[b] = 0;
    }
    pool_.free(b);
    b = kNoBlock;
  }
}

void KVCache::takeBlocks(std::span<BlockId> out, int32_t group) {
  if (out.empty()) return;
  pool_.allocate(out, &evictedScratch_);
  noteEvicted();  // before the blocks' group changes: events report the first group's blocks
  for (BlockId b : out) blockGroup_[b] = group;
}

void KVCache::fillBlocks(std::span<const BlockId> blocks, int32_t tokens) {
  for (BlockId b : blocks) {
    blockFill_[b] = std::min(tokens, config_.blockSizeTokens);
    tokens -= blockFill_[b];
  }
}

void KVCache::allocateFor(SeqId seq, int32_t initialTokens, SeqWindow win) {
  std::lock_guard lock(mu_);
  allocateLocked(seq, initialTokens, true, win);
}

bool KVCache::tryAllocateFor(SeqId seq, int32_t initialTokens, SeqWindow win) {
  std::lock_guard lock(mu_);
  return allocateLocked(seq, initialTokens, false, win) >= 0;
}

int32_t KVCache::allocateLocked(SeqId seq, int32_t initialTokens, bool throwIfShort,
                                SeqWindow win) {
  if (initialTokens <= 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "allocateFor: initialTokens must be > 0, got " + std::to_string(initialTokens));
  }
  const int32_t nBlocks = blocksForTokens(initialTokens);
  if (seqs_.count(seq) != 0) {
    throw KVError(KVErrc::SequenceExists, seqName(seq) + " is already allocated");
  }
  const int64_t needed = static_cast<int64_t>(nBlocks) * numGroups();
  if (needed > pool_.freeBlocks()) {
    if (!throwIfShort) return -1;
    throw KVError(KVErrc::OutOfBlocks, "allocateFor(" + std::to_string(seq) + ", " +
                                           std::to_string(initialTokens) + " tokens) needs " +
                                           std::to_string(needed) + " blocks, " +
                                           std::to_string(pool_.freeBlocks()) + " free");
  }
  // Allocations that can throw bad_alloc happen before the pool is touched.
  Sequence s;
  s.tables.resize(static_cast<size_t>(numGroups()));
  for (Table& t : s.tables) t.blocks.resize(static_cast<size_t>(nBlocks));
  applyWindow(s, win);
  auto [it, inserted] = seqs_.emplace(seq, std::move(s));
  (void)inserted;
  for (int32_t g = 0; g < numGroups(); ++g) {
    std::vector<BlockId>& blocks = it->second.tables[static_cast<size_t>(g)].blocks;
    takeBlocks(blocks, g);
    fillBlocks(blocks, initialTokens);
  }
  it->second.tokens = initialTokens;
  liveTokens_ += static_cast<int64_t>(initialTokens) * numGroups();
  return 0;
}

void KVCache::appendNeedsLocked(const Sequence& s, int32_t n, int32_t& gross,
                                int32_t& freed) const {
  const int32_t B = config_.blockSizeTokens;
  gross = 0;
  freed = 0;
  const int64_t wanted = static_cast<int64_t>(s.tokens) + n;
  for (size_t g = 0; g < s.tables.size(); ++g) {
    const Table& t = s.tables[g];
    const int64_t capacity = static_cast<int64_t>(t.blocks.size()) * B;
    gross += wanted > capacity ? blocksForTokens(wanted - capacity) : 0;
    if (s.tokens % B != 0 && pool_.refCount(t.blocks.back()) > 1) ++gross;  // copy on write
    const int32_t drop = firstNeededBlock(s, static_cast<int32_t>(g), s.tokens);
    for (int32_t i = t.dropped; i < drop; ++i) {
      freed += pool_.refCount(t.blocks[static_cast<size_t>(i)]) == 1 ? 1 : 0;
    }
  }
}

int32_t KVCache::blocksNeededToAppend(SeqId seq, int32_t n) const {
  if (n <= 0) throw KVError(KVErrc::InvalidArgument, "append count must be > 0");
  std::lock_guard lock(mu_);
  int32_t gross = 0, freed = 0;
  appendNeedsLocked(find(seq), n, gross, freed);
  return std::max(0, gross - freed);
}

void KVCache::setExternalBlockCopier(std::function<void(BlockId from, BlockId to)> copier) {
  externalCopier_ = std::move(copier);
}

void KVCache::copyBlock(BlockId from, BlockId to, int32_t tokens) {
  if (externalCopier_) return externalCopier_(from, to);
  const size_t bytes = rowBytes(config_.dtype, config_.headDim) * static_cast<size_t>(tokens);
  for (int32_t slot = 0; slot < arena_.layersPerBlock; ++slot) {
    for (int32_t head = 0; head < config_.numKVHeads; ++head) {
      const size_t src = headRowsOffset(from, slot, head), dst = headRowsOffset(to, slot, head);
      std::memcpy(arena_.kBase + dst, arena_.kBase + src, bytes);
      std::memcpy(arena_.vBase + dst, arena_.vBase + src, bytes);
    }
  }
}

int32_t KVCache::appendTokens(SeqId seq, int32_t n) { return appendAndCopy(seq, n, true); }

bool KVCache::tryAppendTokens(SeqId seq, int32_t n) { return appendAndCopy(seq, n, false) >= 0; }

int32_t KVCache::appendAndCopy(SeqId seq, int32_t n, bool throwIfShort) {
  std::vector<PendingCopy> copies;
  int32_t first = 0;
  {
    std::lock_guard lock(mu_);
    first = appendLocked(seq, n, throwIfShort, copies);
  }
  if (copies.empty()) return first;
  // note: each source keeps the reference taken for its copy, so no other sequence can be given
  // its block until the copy is over; only this sequence's caller touches the destinations.
  for (const PendingCopy& c : copies) copyBlock(c.from, c.to, c.tokens);
  std::lock_guard lock(mu_);
  for (const PendingCopy& c : copies) {
    --heldRefs_[c.from];
    if (pool_.refCount(c.from) == 1) {
      liveTokens_ -= blockFill_[c.from];
      blockFill_[c.from] = 0;
    }
    pool_.free(c.from);
  }
  return first;
}

int32_t KVCache::appendLocked(SeqId seq, int32_t n, bool throwIfShort,
                              std::vector<PendingCopy>& copies) {
  if (n <= 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "appendTokens: n must be > 0, got " + std::to_string(n));
  }
  const int32_t B = config_.blockSizeTokens;
  Sequence& s = find(seq);
  // Fast path (15 of 16 decode steps at block size 16): room in every group's unshared last
  // block and nothing for a window to give back. The block's fill count says how much room is
  // left without a division.
  bool fast = true;
  for (size_t g = 0; g < s.tables.size() && fast; ++g) {
    const Table& t = s.tables[g];
    const BlockId last = t.blocks.back();
    fast = last != kNoBlock && blockFill_[last] + n <= B && pool_.refCount(last) == 1 &&
           firstNeededBlock(s, static_cast<int32_t>(g), s.tokens) <= t.dropped;
  }
  if (fast) {
    for (Table& t : s.tables) blockFill_[t.blocks.back()] += n;
    liveTokens_ += static_cast<int64_t>(n) * numGroups();
    const int32_t first = s.tokens;
    s.tokens += n;
    return first;
  }
  if (static_cast<int64_t>(s.tokens) + n > INT32_MAX) {
    throw KVError(KVErrc::InvalidArgument, seqName(seq) + " would exceed 2^31 tokens");
  }
  int32_t gross = 0, freed = 0;
  appendNeedsLocked(s, n, gross, freed);
  if (gross > pool_.freeBlocks() + freed) {
    if (!throwIfShort) return -1;
    throw KVError(KVErrc::OutOfBlocks, "appendTokens(" + std::to_string(seq) + ", " +
                                           std::to_string(n) + ") needs " +
                                           std::to_string(gross - freed) + " blocks, " +
                                           std::to_string(pool_.freeBlocks()) + " free");
  }
  // Grow the tables geometrically before changing anything, so a bad_alloc leaves no trace and
  // appends stay amortised O(1).
  const size_t newSize = static_cast<size_t>(blocksForTokens(static_cast<int64_t>(s.tokens) + n));
  for (Table& t : s.tables) {
    if (t.blocks.capacity() < newSize) t.blocks.reserve(std::max(newSize, 2 * t.blocks.capacity()));
  }
  if (s.tokens % B != 0) copies.reserve(s.tables.size());
  const int32_t first = s.tokens;
  const int32_t fillInLast = s.tokens % B;
  // 1. Windows give back the blocks they no longer see, oldest first (evicted first when cached:
  // a later hit needs the blocks just before its end, not the oldest).
  for (size_t g = 0; g < s.tables.size(); ++g) {
    giveBackLocked(s.tables[g], firstNeededBlock(s, static_cast<int32_t>(g), s.tokens));
  }
  // 2. Per group: copy on write of a shared, partly filled last block, then new blocks.
  for (size_t g = 0; g < s.tables.size(); ++g) {
    Table& t = s.tables[g];
    if (fillInLast != 0 && pool_.refCount(t.blocks.back()) > 1) {
      // Copy on write: the partly filled last block is shared, and we are about to write into it.
      const BlockId shared = t.blocks.back();
      BlockId own = kNoBlock;
      takeBlocks(std::span<BlockId>(&own, 1), static_cast<int32_t>(g));
      copies.push_back(PendingCopy{shared, own, fillInLast});
      ++heldRefs_[shared];  // this sequence's reference now belongs to the copy
      blockFill_[own] = fillInLast;
      liveTokens_ += fillInLast;
      t.blocks.back() = own;
    }
    int32_t left = n;
    if (fillInLast != 0) {
      const int32_t take = std::min(left, B - fillInLast);
      blockFill_[t.blocks.back()] += take;
      left -= take;
    }
    if (left > 0) {
      const size_t oldSize = t.blocks.size();
      t.blocks.resize(newSize);
      const std::span<BlockId> fresh = std::span<BlockId>(t.blocks).subspan(oldSize);
      takeBlocks(fresh, static_cast<int32_t>(g));
      fillBlocks(fresh, left);
    }
  }
  s.tokens += n;
  liveTokens_ += static_cast<int64_t>(n) * numGroups();
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
  for (const Table& t : s.tables) {
    for (BlockId b : t.blocks) {
      if (b != kNoBlock) pool_.addRef(b);
    }
  }
}

void KVCache::releaseBlocksLocked(const Sequence& s) {
  // Last position first: the free queue then evicts a sequence's cached tail before its root.
  std::vector<BlockId> order;
  const size_t n = s.tables.front().blocks.size();
  order.reserve(n * s.tables.size());
  for (size_t i = n; i-- > 0;) {
    for (const Table& t : s.tables) {
      const BlockId b = t.blocks[i];
      if (b == kNoBlock) continue;
      if (pool_.refCount(b) == 1) {
        liveTokens_ -= blockFill_[b];
        blockFill_[b] = 0;
      }
      order.push_back(b);
    }
  }
  pool_.free(order);
}

bool KVCache::freeFor(SeqId seq) {
  std::lock_guard lock(mu_);
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return false;
  releaseBlocksLocked(it->second);
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

uint64_t KVCache::groupHash(uint64_t chain, int32_t group) const {
  // The first group's blocks carry the chain itself (what events report).
  return group == 0 ? chain : splitmix64(chain ^ splitmix64(static_cast<uint64_t>(group)));
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
                              std::vector<Table>* tables, std::vector<uint64_t>* hashes) const {
  if (!config_.prefixCaching) return 0;
  const auto B = static_cast<size_t>(config_.blockSizeTokens);
  const int32_t G = numGroups();
  const int32_t full = std::min(maxBlocks, static_cast<int32_t>(prefix.size() / B));
  // found[g][i]: group g's verified block for logical block i (kNoBlock: none). Global groups
  // must hold every block, so the scan stops at the first miss of one of them.
  std::vector<std::vector<BlockId>> found(static_cast<size_t>(G));
  std::vector<uint64_t> chain;
  uint64_t parent = hashRoot_;
  int32_t longest = 0;
  for (; longest < full; ++longest) {
    const int32_t* tokens = prefix.data() + static_cast<size_t>(longest) * B;
    const uint64_t h = chainHash(parent, tokens);
    bool globalsHit = true;
    for (int32_t g = 0; g < G; ++g) {
      BlockId b = pool_.findCached(groupHash(h, g));
      if (b != kNoBlock &&
          (blockParent_[b] != parent ||
           !std::equal(tokens, tokens + B, blockTokens_.begin() + static_cast<long>(b * B)))) {
        b = kNoBlock;
      }
      if (b == kNoBlock && groups_.groups[static_cast<size_t>(g)].window == 0) globalsHit = false;
      found[static_cast<size_t>(g)].push_back(b);
    }
    if (!globalsHit) break;
    chain.push_back(h);
    parent = h;
  }
  // The longest hit whose windows are whole: each windowed group holds every block from the one
  // its window starts in (for the first query after the hit) to the hit's end. With m the last
  // block a group misses before the hit's end, no hit in (m, hits] can be whole (their windows
  // all start at or before m), so the hit drops to m; a shorter hit moves every window back, so
  // this repeats until no group shortens it.
  std::vector<std::vector<int32_t>> lastMiss(static_cast<size_t>(G));  // [i]: last miss before i
  for (int32_t g = 0; g < G; ++g) {
    if (groups_.groups[static_cast<size_t>(g)].window == 0) continue;
    std::vector<int32_t>& m = lastMiss[static_cast<size_t>(g)];
    m.assign(static_cast<size_t>(longest) + 1, -1);
    for (int32_t i = 0; i < longest; ++i) {
      const bool miss = found[static_cast<size_t>(g)][static_cast<size_t>(i)] == kNoBlock;
      m[static_cast<size_t>(i) + 1] = miss ? i : m[static_cast<size_t>(i)];
    }
  }
  int32_t hits = longest;
  for (bool changed = true; changed;) {
    changed = false;
    for (int32_t g = 0; g < G && hits > 0; ++g) {
      if (lastMiss[static_cast<size_t>(g)].empty()) continue;
      const int32_t miss = lastMiss[static_cast<size_t>(g)][static_cast<size_t>(hits)];
      if (miss >= 0 && miss >= firstNeededBlock(g, static_cast<int64_t>(hits) * static_cast<int64_t>(B))) {
        hits = miss;
        changed = true;
      }
    }
  }
  if (tables != nullptr) {
    tables->resize(static_cast<size_t>(G));
    for (int32_t g = 0; g < G; ++g) {
      Table& t = (*tables)[static_cast<size_t>(g)];
      const int32_t lo = firstNeededBlock(g, static_cast<int64_t>(hits) * static_cast<int64_t>(B));
      t.dropped = lo;
      t.blocks.assign(static_cast<size_t>(lo), kNoBlock);
      t.blocks.insert(t.blocks.end(), found[static_cast<size_t>(g)].begin() + lo,
                      found[static_cast<size_t>(g)].begin() + hits);
    }
  }
  if (hashes != nullptr) hashes->assign(chain.begin(), chain.begin() + hits);
  return hits;
}

int32_t KVCache::cachedPrefixTokens(std::span<const int32_t> tokens, SeqWindow win) const {
  std::lock_guard lock(mu_);
  return lookupLocked(tokens, fullAttentionBlocks(win), nullptr, nullptr) *
         config_.blockSizeTokens;
}

int32_t KVCache::blocksNeededToAllocate(std::span<const int32_t> prefix, int32_t totalTokens,
                                        SeqWindow win) const {
  if (totalTokens <= 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "blocksNeededToAllocate: totalTokens must be > 0, got " +
                      std::to_string(totalTokens));
  }
  std::vector<Table> hits;
  std::lock_guard lock(mu_);
  const int32_t h = lookupLocked(
      prefix, std::min((totalTokens - 1) / config_.blockSizeTokens, fullAttentionBlocks(win)),
      &hits, nullptr);
  int32_t cached = 0;
  for (const Table& t : hits) {
    for (BlockId b : t.blocks) cached += b != kNoBlock && pool_.refCount(b) == 0 ? 1 : 0;
  }
  return (blocksForTokens(totalTokens) - h) * numGroups() + cached;
}

int32_t KVCache::tryAllocateWithPrefix(SeqId seq, std::span<const int32_t> prefix,
                                       int32_t totalTokens, SeqWindow win) {
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
  const int32_t hits = lookupLocked(
      prefix, std::min((totalTokens - 1) / B, fullAttentionBlocks(win)), &s.tables, &s.hashes);
  if (s.tables.empty()) s.tables.resize(static_cast<size_t>(numGroups()));  // caching off
  applyWindow(s, win);
  const int32_t nBlocks = blocksForTokens(totalTokens);
  int32_t cached = 0;
  for (const Table& t : s.tables) {
    for (BlockId b : t.blocks) cached += b != kNoBlock && pool_.refCount(b) == 0 ? 1 : 0;
  }
  if ((nBlocks - hits) * numGroups() + cached > pool_.freeBlocks()) return -1;
  // Allocations that can throw bad_alloc happen before the pool is touched.
  for (Table& t : s.tables) t.blocks.resize(static_cast<size_t>(nBlocks), kNoBlock);
  auto [it, inserted] = seqs_.emplace(seq, std::move(s));
  (void)inserted;
  // Hits first, so the allocations below cannot evict them.
  for (Table& t : it->second.tables) {
    for (int32_t i = 0; i < hits; ++i) {
      const BlockId b = t.blocks[static_cast<size_t>(i)];
      if (b == kNoBlock) continue;
      if (pool_.refCount(b) == 0) {
        blockFill_[b] = B;
        liveTokens_ += B;
      }
      pool_.touch(b);
    }
  }
  for (int32_t g = 0; g < numGroups(); ++g) {
    const std::span<BlockId> fresh =
        std::span<BlockId>(it->second.tables[static_cast<size_t>(g)].blocks)
            .subspan(static_cast<size_t>(hits));
    takeBlocks(fresh, g);
    fillBlocks(fresh, totalTokens - hits * B);
  }
  liveTokens_ += static_cast<int64_t>(totalTokens - hits * B) * numGroups();
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
  const size_t full =
      std::min(tokens.size() / B, static_cast<size_t>(hashableBlocks(s)));
  if (s.hashes.size() >= full) return;
  s.hashes.reserve(full);
  KVEvent* stored = nullptr;  // the event of the current run of newly registered blocks
  for (size_t i = s.hashes.size(); i < full; ++i) {
    const uint64_t parent = i == 0 ? hashRoot_ : s.hashes[i - 1];
    const int32_t* blockTokens = tokens.data() + i * B;
    const uint64_t h = chainHash(parent, blockTokens);
    s.hashes.push_back(h);
    for (int32_t g = 0; g < numGroups(); ++g) {
      const BlockId b = s.tables[static_cast<size_t>(g)].blocks[i];
      // note: a shared block may have been registered through another owner already. A block
      // whose content another block already holds stays unhashed: it is freed as an empty block
      // and the other copy serves later hits.
      if (b == kNoBlock || pool_.isHashed(b) || !pool_.setHash(b, groupHash(h, g))) {
        if (g == 0) stored = nullptr;
        continue;
      }
      std::copy(blockTokens, blockTokens + B, blockTokens_.begin() + static_cast<long>(b * B));
      blockParent_[b] = parent;
      if (recordNewBlocks_) {
        newBlocks_.push_back({b, groupHash(h, g), static_cast<int32_t>(i), g});
      }
      if (g != 0 || !recordEvents_) continue;
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
    std::vector<uint64_t> hashes;
    for (const EvictedBlock& e : evictedScratch_) {
      if (blockGroup_[e.block] == 0) hashes.push_back(e.hash);
    }
    if (!hashes.empty()) {
      KVEvent& e = events_.emplace_back();
      e.kind = KVEvent::Kind::BlockRemoved;
      e.blockSizeTokens = config_.blockSizeTokens;
      e.blockHashes = std::move(hashes);
    }
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

KVCache::WindowShift KVCache::shiftWindow(SeqId seq) {
  const int32_t B = config_.blockSizeTokens;
  std::lock_guard lock(mu_);
  Sequence& s = find(seq);
  if (!s.win.on()) {
    throw KVError(KVErrc::InvalidArgument, "shiftWindow: " + seqName(seq) + " has no window");
  }
  // Blocks every group can lose: given back (or about to be: the next query does not read them)
  // after its kept entries.
  int32_t d = INT32_MAX;
  for (int32_t g = 0; g < numGroups(); ++g) {
    d = std::min(d, firstNeededBlock(s, g, s.tokens) - s.tables[static_cast<size_t>(g)].kept);
  }
  WindowShift out;
  if (d <= 0) return out;
  // The blocks that move must be this sequence's alone and unhashed: their keys are rewritten.
  for (int32_t g = 0; g < numGroups(); ++g) {
    const Table& t = s.tables[static_cast<size_t>(g)];
    const int32_t drop = firstNeededBlock(s, g, s.tokens);
    for (size_t i = static_cast<size_t>(drop); i < t.blocks.size(); ++i) {
      const BlockId b = t.blocks[i];
      if (b == kNoBlock) continue;
      if (pool_.refCount(b) != 1 || pool_.isHashed(b)) {
        throw KVError(KVErrc::InvalidArgument,
                      "shiftWindow: " + seqName(seq) + "'s block " + std::to_string(b) +
                          " would move but is shared or cached (its window starts too early)");
      }
    }
  }
  out.moved.reserve(s.tables.size() * s.tables.front().blocks.size());
  for (int32_t g = 0; g < numGroups(); ++g) {
    Table& t = s.tables[static_cast<size_t>(g)];
    giveBackLocked(t, firstNeededBlock(s, g, s.tokens));
    t.blocks.erase(t.blocks.begin() + t.kept, t.blocks.begin() + t.kept + d);
    t.dropped -= d;
    for (size_t i = static_cast<size_t>(t.dropped); i < t.blocks.size(); ++i) {
      if (t.blocks[i] != kNoBlock) out.moved.push_back({g, t.blocks[i], blockFill_[t.blocks[i]]});
    }
  }
  // The chain now ends at the sinks: later blocks sit at positions that no longer match it.
  s.hashes.resize(std::min(s.hashes.size(), static_cast<size_t>(s.tables.front().kept)));
  out.tokens = d * B;
  s.tokens -= out.tokens;
  s.shifted += out.tokens;
  return out;
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

std::vector<BlockId> KVCache::blockTable(SeqId seq, int32_t group) const {
  checkGroup(group);
  std::lock_guard lock(mu_);
  return find(seq).tables[static_cast<size_t>(group)].blocks;
}

TokenSlot KVCache::slotFor(SeqId seq, int32_t pos, int32_t group) const {
  TokenSlot slot;
  slotsFor(seq, pos, std::span<TokenSlot>(&slot, 1), group);
  return slot;
}

void KVCache::slotsFor(SeqId seq, int32_t firstPos, std::span<TokenSlot> out,
                       int32_t group) const {
  checkGroup(group);
  std::lock_guard lock(mu_);
  slotsLocked(seq, find(seq), firstPos, out.size(), group, out.data(), 1);
}

void KVCache::slotsLocked(SeqId seq, const Sequence& s, int32_t firstPos, size_t count,
                          int32_t group, TokenSlot* out, size_t stride) const {
  const int32_t B = config_.blockSizeTokens;
  if (firstPos < 0 || static_cast<int64_t>(firstPos) + static_cast<int64_t>(count) > s.tokens) {
    throw KVError(KVErrc::InvalidArgument,
                  "positions [" + std::to_string(firstPos) + ", " +
                      std::to_string(static_cast<int64_t>(firstPos) + static_cast<int64_t>(count)) +
                      ") are outside " + seqName(seq) + "'s " + std::to_string(s.tokens) +
                      " tokens");
  }
  const Table& t = s.tables[static_cast<size_t>(group)];
  if (count > 0 && firstPos / B >= t.kept && firstPos / B < t.dropped) {
    throw KVError(KVErrc::InvalidArgument,
                  "position " + std::to_string(firstPos) + " of " + seqName(seq) +
                      " is behind group " + std::to_string(group) + "'s window");
  }
  for (size_t i = 0; i < count; ++i) {
    const int32_t pos = firstPos + static_cast<int32_t>(i);
    out[i * stride] = TokenSlot{t.blocks[static_cast<size_t>(pos / B)], pos % B};
  }
}

void KVCache::resolveStep(std::span<const StepSequence> step, std::vector<TokenSlot>& slots,
                          std::vector<BlockId>& blockTables,
                          std::vector<int32_t>& tableStarts) const {
  slots.clear();
  blockTables.clear();
  tableStarts.clear();
  const auto G = static_cast<size_t>(numGroups());
  std::lock_guard lock(mu_);
  try {
    for (const StepSequence& st : step) {
      const Sequence& s = find(st.seq);
      const size_t at = slots.size();
      const auto count = static_cast<size_t>(std::max(st.numTokens, 0));
      slots.resize(at + count * G);
      for (size_t g = 0; g < G; ++g) {  // position-major: group g's slot of position i at i * G + g
        slotsLocked(st.seq, s, st.firstPos, count, static_cast<int32_t>(g), slots.data() + at + g, G);
      }
      const auto n = static_cast<size_t>(blocksForTokens(static_cast<int64_t>(st.firstPos) + st.numTokens));
      tableStarts.push_back(static_cast<int32_t>(blockTables.size()));
      for (const Table& t : s.tables) {
        blockTables.insert(blockTables.end(), t.blocks.begin(), t.blocks.begin() + static_cast<long>(n));
      }
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
  const Table& t = s.tables[static_cast<size_t>(arena_.groupOf(layer))];
  return arena_.kView(layer, t.blocks.data(), static_cast<int32_t>(t.blocks.size()), s.tokens);
}

PagedKVView KVCache::getVView(SeqId seq, int32_t layer) const {
  checkLayer(layer);
  std::lock_guard lock(mu_);
  const Sequence& s = find(seq);
  const Table& t = s.tables[static_cast<size_t>(arena_.groupOf(layer))];
  return arena_.vView(layer, t.blocks.data(), static_cast<int32_t>(t.blocks.size()), s.tokens);
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
     << "Groups: " << numGroups() << " x " << groups_.layersPerGroup << " layers (";
  for (int32_t g = 0; g < numGroups(); ++g) {
    const int32_t w = groups_.groups[static_cast<size_t>(g)].window;
    os << (g ? ", " : "") << (w == 0 ? std::string("global") : "window " + std::to_string(w));
  }
  os << ")\n"
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
    os << "  seq " << id << ": " << s->tokens << " tokens, blocks";
    for (const Table& t : s->tables) {
      os << " [";
      for (size_t i = 0; i < t.blocks.size(); ++i) {
        os << (i ? " " : "");
        if (t.blocks[i] == kNoBlock) {
          os << "-";
          continue;
        }
        os << t.blocks[i];
        if (pool_.refCount(t.blocks[i]) > 1) os << "*";
      }
      os << "]";
    }
    os << "\n";
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
  const int32_t numBlocks = this->numBlocks();
  std::vector<int32_t> owners(static_cast<size_t>(numBlocks), 0);
  for (const auto& [id, s] : seqs_) {
    if (s.tokens <= 0) fail(seqName(id) + " has " + std::to_string(s.tokens) + " tokens");
    if (s.tables.size() != static_cast<size_t>(numGroups())) {
      fail(seqName(id) + " has " + std::to_string(s.tables.size()) + " block tables");
    }
    for (int32_t g = 0; g < numGroups(); ++g) {
      const Table& t = s.tables[static_cast<size_t>(g)];
      const std::string where = seqName(id) + " group " + std::to_string(g);
      if (static_cast<int64_t>(t.blocks.size()) != blocksForTokens(s.tokens)) {
        fail(where + " holds " + std::to_string(t.blocks.size()) + " blocks for " +
             std::to_string(s.tokens) + " tokens");
      }
      // Given back: never a block the next position's query reads, never in a global
      // group of a sequence without a window (firstNeededBlock is 0 there), never a sink.
      if (t.kept < 0 || t.dropped < t.kept ||
          t.dropped > std::max(t.kept, firstNeededBlock(s, g, s.tokens))) {
        fail(where + " gave back blocks [" + std::to_string(t.kept) + ", " +
             std::to_string(t.dropped) + ")");
      }
      for (size_t i = 0; i < t.blocks.size(); ++i) {
        const BlockId b = t.blocks[i];
        if (static_cast<int32_t>(i) >= t.kept && static_cast<int32_t>(i) < t.dropped) {
          if (b != kNoBlock) fail(where + " keeps block " + std::to_string(b) + " it gave back");
          continue;
        }
        if (b < 0 || b >= numBlocks) fail(where + " holds invalid block " + std::to_string(b));
        if (blockGroup_[b] != g) {
          fail(where + " holds block " + std::to_string(b) + " of group " +
               std::to_string(blockGroup_[b]));
        }
        ++owners[b];
        if (i < s.hashes.size()) {
          if (static_cast<int64_t>(i + 1) * B > s.tokens) {
            fail(where + " has a hash for its partly filled block " + std::to_string(i));
          }
          if (pool_.isHashed(b) &&
              (pool_.blockHash(b) != groupHash(s.hashes[i], g) ||
               blockParent_[b] != (i == 0 ? hashRoot_ : s.hashes[i - 1]))) {
            fail("block " + std::to_string(b) + "'s hash or parent is not " + where +
                 "'s chain at block " + std::to_string(i));
          }
        } else if (pool_.isHashed(b)) {
          fail(where + " holds hashed block " + std::to_string(b) + " at unhashed position " +
               std::to_string(i));
        }
        const int32_t expectFill =
            i + 1 < t.blocks.size() ? B : s.tokens - static_cast<int32_t>(i) * B;
        if (blockFill_[b] != expectFill) {
          fail("block " + std::to_string(b) + " records " + std::to_string(blockFill_[b]) +
               " tokens, " + where + " expects " + std::to_string(expectFill));
        }
      }
    }
  }
  int64_t live = 0;
  for (BlockId b = 0; b < numBlocks; ++b) {
    if (pool_.refCount(b) != owners[b] + heldRefs_[b]) {
      fail("block " + std::to_string(b) + " has ref count " + std::to_string(pool_.refCount(b)) +
           " but " + std::to_string(owners[b]) + " block tables and " +
           std::to_string(heldRefs_[b]) + " copies or sessions hold it");
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
      st.totalBytes != static_cast<uint64_t>(numBlocks) * bytesPerBlock_ ||
      st.totalBytes > 2 * halfBytes_) {
    fail("byte accounting: allocated + free != total");
  }
}

}  // namespace cortex::kv
