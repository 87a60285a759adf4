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

BlockPool::BlockPool(int32_t numBlocks, int32_t capacity)
    : total_(numBlocks), capacity_(capacity == 0 ? numBlocks : capacity), numFree_(0) {
  if (numBlocks < 1) {
    throw KVError(KVErrc::InvalidArgument,
                  "a block pool needs at least 1 block, got " + std::to_string(numBlocks));
  }
  if (capacity_ < numBlocks) {
    throw KVError(KVErrc::InvalidArgument, "a block pool's capacity (" +
                                               std::to_string(capacity_) + ") is below its size (" +
                                               std::to_string(numBlocks) + ")");
  }
  const auto n = static_cast<size_t>(capacity_);
  refs_.assign(n, 0);
  next_.assign(n, kNoBlock);
  prev_.assign(n, kNoBlock);
  queued_.assign(n, 0);
  hashed_.assign(n, 0);
  hash_.assign(n, 0);
  // Load factor at most 1/2 keeps linear probes short.
  size_t slots = 2;
  while (slots < 2 * n) slots *= 2;
  table_.assign(slots, kNoBlock);
  tableMask_ = slots - 1;
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
  queued_[id] = 1;
  ++numFree_;
}

void BlockPool::pushFreeHead(BlockId id) {
  prev_[id] = kNoBlock;
  next_[id] = head_;
  if (head_ != kNoBlock) {
    prev_[head_] = id;
  } else {
    tail_ = id;
  }
  head_ = id;
  queued_[id] = 1;
  ++numFree_;
}

void BlockPool::unlinkFree(BlockId id) {
  if (prev_[id] != kNoBlock) {
    next_[prev_[id]] = next_[id];
  } else {
    head_ = next_[id];
  }
  if (next_[id] != kNoBlock) {
    prev_[next_[id]] = prev_[id];
  } else {
    tail_ = prev_[id];
  }
  next_[id] = kNoBlock;
  prev_[id] = kNoBlock;
  queued_[id] = 0;
  --numFree_;
}

uint64_t BlockPool::mix(uint64_t h) {
  // The hashes are already uniform; this only guards against structured keys in tests.
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

size_t BlockPool::findSlot(uint64_t hash) const {
  size_t i = slotOf(hash);
  while (table_[i] != kNoBlock && hash_[table_[i]] != hash) i = (i + 1) & tableMask_;
  return i;
}

void BlockPool::eraseHash(BlockId id) {
  size_t hole = findSlot(hash_[id]);
  table_[hole] = kNoBlock;
  // Backward-shift deletion: move later members of the probe run into the hole when their home
  // slot does not lie strictly between the hole and them, so every lookup still finds them.
  for (size_t j = (hole + 1) & tableMask_; table_[j] != kNoBlock; j = (j + 1) & tableMask_) {
    const size_t home = slotOf(hash_[table_[j]]);
    const bool homeBetween = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
    if (!homeBetween) {
      table_[hole] = table_[j];
      table_[j] = kNoBlock;
      hole = j;
    }
  }
  hashed_[id] = 0;
  --numHashed_;
}

void BlockPool::allocate(std::span<BlockId> out, std::vector<EvictedBlock>* evicted) {
  if (out.empty()) throw KVError(KVErrc::InvalidArgument, "allocate: asked for 0 blocks");
  if (out.size() > static_cast<size_t>(numFree_)) {
    throw KVError(KVErrc::OutOfBlocks, "allocate: asked for " + std::to_string(out.size()) +
                                           " blocks, " + std::to_string(numFree_) + " of " +
                                           std::to_string(total_) + " free");
  }
  for (BlockId& id : out) {
    id = head_;
    unlinkFree(id);
    if (hashed_[id]) {
      if (evicted != nullptr) evicted->push_back({id, hash_[id]});
      eraseHash(id);
      --numCached_;
    }
    refs_[id] = 1;
  }
}

BlockId BlockPool::allocateOne(std::vector<EvictedBlock>* evicted) {
  BlockId id = kNoBlock;
  allocate(std::span<BlockId>(&id, 1), evicted);
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
    if (refs_[id] != 0 || queued_[id]) continue;
    if (hashed_[id]) {
      pushFreeTail(id);
      ++numCached_;
    } else {
      pushFreeHead(id);
    }
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

BlockId BlockPool::findCached(uint64_t hash) const { return table_[findSlot(hash)]; }

void BlockPool::touch(BlockId id) {
  checkId(id, "touch");
  if (!hashed_[id]) {
    throw KVError(KVErrc::InvalidArgument, "touch: block " + std::to_string(id) + " is not cached");
  }
  if (refs_[id] == 0) {
    unlinkFree(id);
    --numCached_;
    refs_[id] = 1;
  } else if (++refs_[id] == 2) {
    ++numShared_;
  }
}

bool BlockPool::setHash(BlockId id, uint64_t hash) {
  checkId(id, "setHash");
  if (refs_[id] == 0 || hashed_[id]) {
    throw KVError(KVErrc::InvalidArgument, "setHash: block " + std::to_string(id) +
                                               (refs_[id] == 0 ? " is free" : " is already hashed"));
  }
  const size_t slot = findSlot(hash);
  if (table_[slot] != kNoBlock) return false;
  table_[slot] = id;
  hash_[id] = hash;
  hashed_[id] = 1;
  ++numHashed_;
  return true;
}

void BlockPool::clearHash(BlockId id) {
  checkId(id, "clearHash");
  if (refs_[id] == 0) {
    throw KVError(KVErrc::InvalidArgument, "clearHash: block " + std::to_string(id) + " is free");
  }
  if (hashed_[id]) eraseHash(id);
}

bool BlockPool::isHashed(BlockId id) const {
  checkId(id, "isHashed");
  return hashed_[id] != 0;
}

uint64_t BlockPool::blockHash(BlockId id) const {
  checkId(id, "blockHash");
  if (!hashed_[id]) {
    throw KVError(KVErrc::InvalidArgument, "blockHash: block " + std::to_string(id) +
                                               " has no hash");
  }
  return hash_[id];
}

int32_t BlockPool::evictAllCached(std::vector<EvictedBlock>* removed) {
  int32_t evicted = 0;
  for (BlockId id = head_; id != kNoBlock;) {
    const BlockId next = next_[id];
    if (hashed_[id]) {
      if (removed != nullptr) removed->push_back({id, hash_[id]});
      eraseHash(id);
      --numCached_;
      // Now an empty block: it moves to the head, where empty blocks are reused first.
      unlinkFree(id);
      pushFreeHead(id);
      ++evicted;
    }
    id = next;
  }
  return evicted;
}

void BlockPool::grow(int32_t n) {
  if (n < total_ || n > capacity_) {
    throw KVError(KVErrc::InvalidArgument, "grow: " + std::to_string(n) + " blocks is not in [" +
                                               std::to_string(total_) + ", " +
                                               std::to_string(capacity_) + "]");
  }
  // Highest first onto the head, so the new blocks are handed out in id order.
  for (BlockId id = n - 1; id >= total_; --id) {
    refs_[id] = 0;
    hashed_[id] = 0;
    pushFreeHead(id);
  }
  total_ = n;
}

void BlockPool::shrink(int32_t n, std::vector<EvictedBlock>* evicted) {
  if (n < 1 || n > total_) {
    throw KVError(KVErrc::InvalidArgument, "shrink: " + std::to_string(n) + " blocks is not in [1, " +
                                               std::to_string(total_) + "]");
  }
  for (BlockId id = n; id < total_; ++id) {
    if (refs_[id] != 0) {
      throw KVError(KVErrc::InvalidArgument, "shrink: block " + std::to_string(id) +
                                                 " is in use");
    }
  }
  for (BlockId id = n; id < total_; ++id) {
    if (hashed_[id]) {
      if (evicted != nullptr) evicted->push_back({id, hash_[id]});
      eraseHash(id);
      --numCached_;
    }
    unlinkFree(id);
  }
  total_ = n;
}

void BlockPool::relocate(BlockId from, BlockId to, std::vector<EvictedBlock>* evicted) {
  checkId(from, "relocate");
  checkId(to, "relocate");
  if (refs_[from] == 0 || refs_[to] != 0) {
    throw KVError(KVErrc::InvalidArgument, "relocate: block " + std::to_string(from) +
                                               " must be in use and block " + std::to_string(to) +
                                               " free");
  }
  unlinkFree(to);
  if (hashed_[to]) {
    if (evicted != nullptr) evicted->push_back({to, hash_[to]});
    eraseHash(to);
    --numCached_;
  }
  refs_[to] = refs_[from];
  refs_[from] = 0;
  if (hashed_[from]) {
    const uint64_t h = hash_[from];
    eraseHash(from);
    table_[findSlot(h)] = to;
    hash_[to] = h;
    hashed_[to] = 1;
    ++numHashed_;
  }
  pushFreeHead(from);
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
     << " shared, " << numCached_ << " cached, " << numFree_ - numCached_
     << " free; '.' free, 'C' cached, 'X' used, 'S' shared)\n";
  constexpr int32_t kPerLine = 64;
  for (BlockId id = 0; id < total_; ++id) {
    if (id % kPerLine == 0) {
      os << (id == 0 ? "" : "\n");
      os.width(6);
      os << id << " ";
    }
    os << (refs_[id] == 0 ? (hashed_[id] ? 'C' : '.') : refs_[id] == 1 ? 'X' : 'S');
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
  int32_t cached = 0;
  int32_t hashed = 0;
  for (BlockId id = 0; id < total_; ++id) {
    if (queued_[id] != (refs_[id] == 0 ? 1 : 0)) {
      fail("block " + std::to_string(id) + " queue flag disagrees with its ref count");
    }
    if (!hashed_[id]) continue;
    ++hashed;
    cached += refs_[id] == 0 ? 1 : 0;
    if (findCached(hash_[id]) != id) {
      fail("hashed block " + std::to_string(id) + " is not found under its hash");
    }
  }
  int32_t inTable = 0;
  for (BlockId id : table_) {
    if (id == kNoBlock) continue;
    ++inTable;
    if (id < 0 || id >= total_ || !hashed_[id]) {
      fail("the hash table holds block " + std::to_string(id) + ", which has no hash");
    }
  }
  if (cached != numCached_ || hashed != numHashed_ || inTable != hashed) {
    fail("cached count " + std::to_string(numCached_) + " (actual " + std::to_string(cached) +
         "), hashed " + std::to_string(numHashed_) + " (actual " + std::to_string(hashed) +
         ", in table " + std::to_string(inTable) + ")");
  }
}

}  // namespace cortex::kv
