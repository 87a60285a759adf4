// KVCache::resize: the pool grows or shrinks while in use, without moving any block's address.
//
// The arena's address range is reserved for the capacity at construction (strides are computed
// over the capacity, so block b of slot s sits at the same address whatever the pool's size);
// only the blocks in use are backed by memory. Growing commits the new blocks' ranges
// (mprotect read-write; pages arrive on first touch) and adds them to the pool as empty blocks.
// Shrinking evicts the cached blocks above the new size, moves each block in use above it to a
// free block below it (its K/V copied, every table that holds it updated, its hash and fill
// carried over), removes the top blocks from the pool and gives their memory back
// (madvise(MADV_DONTNEED), then no access). Partial pages at a range's ends stay committed.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>

#include "kv/kv_cache.h"

namespace cortex::kv {

namespace {

size_t pageBytes() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

}  // namespace

void KVCache::forEachBlockRange(int32_t from, int32_t to,
                                const std::function<void(size_t, size_t)>& fn) const {
  if (from >= to) return;
  const size_t el = dtypeBytes(config_.dtype);
  const bool headMajor = config_.layout == KVLayout::HeadMajor;
  const int32_t heads = headMajor ? config_.numKVHeads : 1;
  for (uint64_t half : {uint64_t{0}, halfBytes_}) {
    for (int32_t slot = 0; slot < arena_.layersPerBlock; ++slot) {
      for (int32_t head = 0; head < heads; ++head) {
        const int64_t start = slot * arena_.slotStride + head * arena_.headStride +
                              from * arena_.blockStride;
        const int64_t len = (to - from) * arena_.blockStride;
        fn(static_cast<size_t>(half) + static_cast<size_t>(start) * el,
           static_cast<size_t>(len) * el);
      }
    }
  }
}

void KVCache::commitBlocks(int32_t from, int32_t to) {
  const size_t page = pageBytes();
  forEachBlockRange(from, to, [&](size_t off, size_t len) {
    const size_t lo = off / page * page;
    const size_t hi = std::min<size_t>((off + len + page - 1) / page * page, reservedBytes_);
    if (mprotect(memory_ + lo, hi - lo, PROT_READ | PROT_WRITE) != 0) {
      throw KVError(KVErrc::InvalidArgument, std::string("cannot commit KV arena memory: ") +
                                                 std::strerror(errno));
    }
  });
}

void KVCache::decommitBlocks(int32_t from, int32_t to) {
  const size_t page = pageBytes();
  forEachBlockRange(from, to, [&](size_t off, size_t len) {
    // Inward: a page shared with a block still in use stays.
    const size_t lo = (off + page - 1) / page * page;
    const size_t hi = (off + len) / page * page;
    if (hi <= lo) return;
    madvise(memory_ + lo, hi - lo, MADV_DONTNEED);
    mprotect(memory_ + lo, hi - lo, PROT_NONE);
  });
}

int32_t KVCache::resize(int32_t blocks) {
  if (externalCopier_) {
    throw KVError(KVErrc::InvalidArgument,
                  "resize: this cache's K/V live outside its arena (another backend)");
  }
  if (blocks < 1 || blocks > capacity_) {
    throw KVError(KVErrc::InvalidArgument, "resize: " + std::to_string(blocks) +
                                               " blocks is not in [1, " +
                                               std::to_string(capacity_) + "]");
  }
  const int32_t old = numBlocks();
  if (blocks == old) return 0;
  if (blocks > old) {
    commitBlocks(old, blocks);  // before any block of it can be handed out
    std::lock_guard lock(mu_);
    pool_.grow(blocks);
    numBlocks_.store(blocks, std::memory_order_relaxed);
    return 0;
  }
  const auto B = static_cast<size_t>(config_.blockSizeTokens);
  int32_t moved = 0;
  {
    std::lock_guard lock(mu_);
    if (pool_.usedBlocks() > blocks) {
      throw KVError(KVErrc::OutOfBlocks, "resize: " + std::to_string(pool_.usedBlocks()) +
                                             " blocks are in use, more than " +
                                             std::to_string(blocks));
    }
    std::vector<BlockId> high;  // in use above the new size
    for (BlockId b = blocks; b < old; ++b) {
      if (pool_.refCount(b) == 0) continue;
      if (heldRefs_[static_cast<size_t>(b)] != 0) {
        throw KVError(KVErrc::InvalidArgument,
                      "resize: block " + std::to_string(b) +
                          " is being copied or saved right now; try again");
      }
      high.push_back(b);
    }
    // Free blocks below the new size to move them to: there are enough, since at most `blocks`
    // are in use. Empty ones first, then the least recently used cached ones.
    std::vector<BlockId> targets;
    for (BlockId b : pool_.freeListOrder()) {
      if (targets.size() == high.size()) break;
      if (b < blocks) targets.push_back(b);
    }
    std::unordered_map<BlockId, BlockId> remap;
    for (size_t i = 0; i < high.size(); ++i) {
      const BlockId from = high[i];
      const BlockId to = targets[i];
      pool_.relocate(from, to, &evictedScratch_);
      forEachBlockRange(0, 1, [&](size_t off, size_t len) {
        // The block's runs, at `from` and `to` (each run is len bytes for one block).
        const size_t step = static_cast<size_t>(arena_.blockStride) * dtypeBytes(config_.dtype);
        std::memcpy(memory_ + off + static_cast<size_t>(to) * step,
                    memory_ + off + static_cast<size_t>(from) * step, len);
      });
      const auto f = static_cast<size_t>(from);
      const auto t = static_cast<size_t>(to);
      blockFill_[t] = blockFill_[f];
      blockGroup_[t] = blockGroup_[f];
      blockFill_[f] = 0;
      if (config_.prefixCaching) {
        std::copy_n(blockTokens_.begin() + static_cast<long>(f * B), B,
                    blockTokens_.begin() + static_cast<long>(t * B));
        blockParent_[t] = blockParent_[f];
      }
      remap.emplace(from, to);
    }
    if (!remap.empty()) {
      for (auto& [seq, s] : seqs_) {
        for (Table& table : s.tables) {
          for (BlockId& b : table.blocks) {
            if (auto it = remap.find(b); it != remap.end()) b = it->second;
          }
        }
      }
      for (NewBlock& n : newBlocks_) {
        if (auto it = remap.find(n.block); it != remap.end()) n.block = it->second;
      }
    }
    pool_.shrink(blocks, &evictedScratch_);
    noteEvicted();
    numBlocks_.store(blocks, std::memory_order_relaxed);
    moved = static_cast<int32_t>(high.size());
  }
  decommitBlocks(blocks, old);
  return moved;
}

}  // namespace cortex::kv
