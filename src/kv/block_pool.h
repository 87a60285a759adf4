// BlockPool (KVBlockAllocator in the original CortexStream KV cache design; see docs/design.md):
// the physical layer of the KV cache.
//
// A fixed number of equal blocks, identified by dense integer ids [0, totalBlocks). The pool
// knows nothing about bytes or tokens: it hands out ids, counts references and keeps free ids in
// an intrusive FIFO free list (links live in per-block arrays, so freeing a block and taking it
// out of the middle of the list are both O(1), and the list order is the reuse order). Nothing is
// allocated on the heap after construction.
//
// Not thread-safe by itself: KVCache serialises every call under its own lock.
// Errors: every precondition violation throws KVError (see kv_error.h) and changes nothing.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <span>
#include <vector>

#include "kv/paged_view.h"

namespace cortex::kv {

class BlockPool {
 public:
  // numBlocks >= 1. All blocks start free, in id order (0 is handed out first).
  explicit BlockPool(int32_t numBlocks);

  // Takes out.size() blocks, all or nothing: on success writes their ids to `out` (in free-list
  // order) with ref count 1; throws KVError{OutOfBlocks} without touching anything when fewer
  // are free, KVError{InvalidArgument} when out is empty.
  void allocate(std::span<BlockId> out);
  // Takes one block (ref count 1); throws KVError{OutOfBlocks} when none is free.
  BlockId allocateOne();

  // Drops one reference to each block; a block whose count reaches 0 goes to the tail of the
  // free list. Every id must be in use (ref count >= 1): checked before anything changes.
  void free(std::span<const BlockId> ids);
  void free(BlockId id) { free(std::span<const BlockId>(&id, 1)); }

  // Adds one reference to a block in use (sharing between sequences).
  void addRef(BlockId id);

  // 0 for a free block.
  int32_t refCount(BlockId id) const;

  int32_t freeBlocks() const { return numFree_; }
  int32_t usedBlocks() const { return total_ - numFree_; }
  int32_t totalBlocks() const { return total_; }
  // Blocks with ref count > 1.
  int32_t sharedBlocks() const { return numShared_; }

  // External fragmentation as a contiguous allocator sees it: 1 - (longest run of consecutive
  // free ids / free blocks), 0 when nothing is free. Reported for comparison only: a paged cache
  // never needs consecutive ids, so this number never limits allocation. O(totalBlocks).
  double fragmentation() const;

  // An ASCII map of the pool, 64 blocks a line: '.' free, 'X' used by one owner, 'S' shared.
  void dumpBlockMap(std::ostream& os) const;

  // Free ids from head (next handed out) to tail. O(freeBlocks); for tests and dumps.
  std::vector<BlockId> freeListOrder() const;

  // Verifies the free list (acyclic, doubly linked, exactly the ref-0 blocks, count matches) and
  // the shared count. Throws KVError{InvariantViolated} describing the first problem found.
  void checkInvariants() const;

 private:
  void checkId(BlockId id, const char* what) const;
  void pushFreeTail(BlockId id);
  BlockId popFreeHead();

  int32_t total_;
  int32_t numFree_;
  int32_t numShared_ = 0;
  BlockId head_ = kNoBlock;
  BlockId tail_ = kNoBlock;
  std::vector<int32_t> refs_;
  std::vector<BlockId> next_;
  std::vector<BlockId> prev_;
};

using KVBlockAllocator = BlockPool;  // the original design's name (docs/design.md)

}  // namespace cortex::kv
