#include "kv/block_pool.h"

#include <algorithm>
#include <ostream>
#include <string>

#include "kv/kv_error.h"

namespace cortex::kv {

const char* toString(KVErrc code) {
  switch (code) {
    case KVErrc::InvalidArgument: return "invalid argument";
    case KVErrc::UnknownSequence: return "unknown sequence";
    case KVErrc::SequenceExists: return "sequence exists";
    case KVErrc::LayerOutOfRange: return "layer out of range";
    case KVErrc::OutOfBlocks: return "out of KV blocks";
    case KVErrc::InvariantViolated: return "KV invariant violated";
  }
  return "unknown KV error";
}

BlockPool::BlockPool(int32_t numBlocks) : total_(numBlocks), numFree_(0) {
  if (numBlocks < 1) {
    throw KVError(KVErrc::InvalidArgument,
                  "a block pool needs at least 1 block, got " + std::to_string(numBlocks));
  }
  refs_.assign(static_cast<size_t>(numBlocks), 0);
  next_.assign(static_cast<size_t>(numBlocks), kNoBlock);
  prev_.assign(static_cast<size_t>(numBlocks), kNoBlock);
  for (BlockId id = 0; id < numBlocks; ++id) pushFreeTail(id);
}

void BlockPool::checkId(BlockId id, const char* what) const {
  if (id < 0 || id >= total_) {
    throw KVError(KVErrc::InvalidArgument, std::string(what) + ": block id " +
                                               std::to_string(id) + " is not in [0, " +
                                               std::to_string(total_) + ")");
  }
}

void BlockPool::pushFreeTail(BlockId id) {
  next_[id] = kNoBlock;
  prev_[id] = tail_;
  if (tail_ != kNoBlock) {
    next_[tail_] = id;
  } else {
    head_ = id;
  }
  tail_ = id;
  ++numFree_;
}

BlockId BlockPool::popFreeHead() {
  const BlockId id = head_;
  head_ = next_[id];
  if (head_ != kNoBlock) {
    prev_[head_] = kNoBlock;
  } else {
    tail_ = kNoBlock;
  }
  next_[id] = kNoBlock;
  prev_[id] = kNoBlock;
  --numFree_;
  return id;
}

void BlockPool::allocate(std::span<BlockId> out) {
  if (out.empty()) throw KVError(KVErrc::InvalidArgument, "allocate: asked for 0 blocks");
  if (out.size() > static_cast<size_t>(numFree_)) {
    throw KVError(KVErrc::OutOfBlocks, "allocate: asked for " + std::to_string(out.size()) +
                                           " blocks, " + std::to_string(numFree_) + " of " +
                                           std::to_string(total_) + " free");
  }
  for (BlockId& id : out) {
    id = popFreeHead();
    refs_[id] = 1;
  }
}

BlockId BlockPool::allocateOne() {
  BlockId id = kNoBlock;
  allocate(std::span<BlockId>(&id, 1));
  return id;
}

void BlockPool::free(std::span<const BlockId> ids) {
  // Drop the references first and undo them all if one id is bad, so a bad call changes nothing
  // (an id listed k times must hold k references).
  for (size_t i = 0; i < ids.size(); ++i) {
    const BlockId id = ids[i];
    if (id < 0 || id >= total_ || refs_[id] == 0) {
      for (size_t j = 0; j < i; ++j) {
        if (++refs_[ids[j]] == 2) ++numShared_;
      }
      checkId(id, "free");
      throw KVError(KVErrc::InvalidArgument,
                    "free: block " + std::to_string(id) + " is not in use (double free?)");
    }
    if (refs_[id]-- == 2) --numShared_;
  }
  for (BlockId id : ids) {
    // note: a block listed twice reaches here twice; only the first visit may queue it.
    const bool queued = prev_[id] != kNoBlock || head_ == id;
    if (refs_[id] == 0 && !queued) pushFreeTail(id);
  }
}

void BlockPool::addRef(BlockId id) {
  checkId(id, "addRef");
  if (refs_[id] == 0) {
    throw KVError(KVErrc::InvalidArgument,
                  "addRef: block " + std::to_string(id) + " is free");
  }
  if (++refs_[id] == 2) ++numShared_;
}

int32_t BlockPool::refCount(BlockId id) const {
  checkId(id, "refCount");
  return refs_[id];
}

double BlockPool::fragmentation() const {
  if (numFree_ == 0) return 0.0;
  int32_t longest = 0;
  int32_t run = 0;
  for (BlockId id = 0; id < total_; ++id) {
    run = refs_[id] == 0 ? run + 1 : 0;
    longest = std::max(longest, run);
  }
  return 1.0 - static_cast<double>(longest) / static_cast<double>(numFree_);
}

void BlockPool::dumpBlockMap(std::ostream& os) const {
  os << "Block map (" << total_ << " blocks: " << usedBlocks() << " used, " << numShared_
     << " shared, " << numFree_ << " free; '.' free, 'X' used, 'S' shared)\n";
  constexpr int32_t kPerLine = 64;
  for (BlockId id = 0; id < total_; ++id) {
    if (id % kPerLine == 0) {
      os << (id == 0 ? "" : "\n");
      os.width(6);
      os << id << " ";
    }
    os << (refs_[id] == 0 ? '.' : refs_[id] == 1 ? 'X' : 'S');
  }
  os << "\n";
}

std::vector<BlockId> BlockPool::freeListOrder() const {
  std::vector<BlockId> order;
  order.reserve(static_cast<size_t>(numFree_));
  for (BlockId id = head_; id != kNoBlock && order.size() <= static_cast<size_t>(total_);
       id = next_[id]) {
    order.push_back(id);
  }
  return order;
}

void BlockPool::checkInvariants() const {
  auto fail = [](const std::string& what) { throw KVError(KVErrc::InvariantViolated, what); };
  int32_t walked = 0;
  BlockId prev = kNoBlock;
  for (BlockId id = head_; id != kNoBlock; id = next_[id]) {
    if (id < 0 || id >= total_) fail("free list holds out-of-range id " + std::to_string(id));
    if (++walked > total_) fail("free list has a cycle");
    if (refs_[id] != 0) {
      fail("block " + std::to_string(id) + " is on the free list with " +
           std::to_string(refs_[id]) + " references");
    }
    if (prev_[id] != prev) fail("free list back link of block " + std::to_string(id) + " is wrong");
    prev = id;
  }
  if (prev != tail_) fail("free list tail is " + std::to_string(tail_) + ", walk ended at " +
                          std::to_string(prev));
  int32_t zero = 0;
  int32_t shared = 0;
  for (BlockId id = 0; id < total_; ++id) {
    if (refs_[id] < 0) fail("block " + std::to_string(id) + " has a negative ref count");
    zero += refs_[id] == 0 ? 1 : 0;
    shared += refs_[id] > 1 ? 1 : 0;
  }
  if (zero != walked || walked != numFree_) {
    fail("free count mismatch: " + std::to_string(numFree_) + " recorded, " +
         std::to_string(walked) + " on the list, " + std::to_string(zero) + " with ref 0");
  }
  if (shared != numShared_) {
    fail("shared count " + std::to_string(numShared_) + " but " + std::to_string(shared) +
         " blocks have ref > 1");
  }
}

}  // namespace cortex::kv
