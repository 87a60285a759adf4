// BlockPool (KVBlockAllocator in the original CortexStream KV cache design; see docs/design.md):
// the physical layer of the KV cache.
//
// A fixed number of equal blocks, identified by dense integer ids [0, totalBlocks). The pool
// knows nothing about bytes or tokens: it hands out ids, counts references and keeps free ids in
// an intrusive free queue (links live in per-block arrays, so freeing a block and taking it out of
// the middle of the queue are both O(1), and the queue order is the reuse order). Nothing is
// allocated on the heap after construction.
//
// Prefix caching: a block in use may be given a 64-bit content hash (setHash). When its last owner
// frees it, a hashed block keeps its content and its hash: it is *cached*, still in the free queue
// (at the tail, so the least recently freed cached block is reused first) and still found by
// findCached. Touching a cached block takes it back out of the middle of the queue in O(1).
// Allocation takes the head of the queue; if that block is cached, it is evicted (its hash
// dropped). Freed blocks without a hash go to the head instead: an empty block is reused before
// any cached content is given up. The hash table is open addressing with linear probing, sized at
// construction (twice the block count, a power of two), so it never allocates either.
//
// Resizing: the pool is built with a capacity (at least its size); grow adds empty blocks up to
// it, shrink gives back the blocks with the highest ids once none of them is in use, and relocate
// moves a block in use (its references and hash) to a free id, so shrink can be made possible.
// Every per-block array and the hash table are sized for the capacity, so resizing allocates
// nothing either.
//
// Not thread-safe by itself: KVCache serialises every call under its own lock.
// Errors: every precondition violation throws KVError (see kv_error.h) and changes nothing.
#pragma once

#include <cstdint>
#include <cstddef>
#include <iosfwd>
#include <span>
#include <vector>

#include "kv/paged_view.h"

namespace cortex::kv {

// A cached block given up: its id and the hash it held.
struct EvictedBlock {
  BlockId block = kNoBlock;
  uint64_t hash = 0;
  bool operator==(const EvictedBlock&) const = default;
};

class BlockPool {
 public:
  // numBlocks >= 1, capacity >= numBlocks (0: numBlocks). All blocks start free, in id order (0
  // is handed out first).
  explicit BlockPool(int32_t numBlocks, int32_t capacity = 0);

  // Takes out.size() blocks, all or nothing: on success writes their ids to `out` (in queue
  // order) with ref count 1; throws KVError{OutOfBlocks} without touching anything when fewer
  // are free, KVError{InvalidArgument} when out is empty. A cached block taken is evicted: its
  // hash is dropped and, when `evicted` is given, the block and its hash are appended to it.
  void allocate(std::span<BlockId> out, std::vector<EvictedBlock>* evicted = nullptr);
  // Takes one block (ref count 1); throws KVError{OutOfBlocks} when none is free.
  BlockId allocateOne(std::vector<EvictedBlock>* evicted = nullptr);

  // Drops one reference to each block, in the order given; a block whose count reaches 0 goes to
  // the free queue: to its tail when hashed (cached), to its head otherwise. Every id must be in
  // use (ref count >= 1): checked before anything changes.
  void free(std::span<const BlockId> ids);
  void free(BlockId id) { free(std::span<const BlockId>(&id, 1)); }

  // Adds one reference to a block in use (sharing between sequences).
  void addRef(BlockId id);

  // 0 for a free block.
  int32_t refCount(BlockId id) const;

  // --- prefix caching ------------------------------------------------------------------------
  // The block holding `hash` (in use or cached), or kNoBlock.
  BlockId findCached(uint64_t hash) const;
  // Takes a reference on a hashed block: one more owner if it is in use; if it is cached, it
  // leaves the free queue (O(1)) with ref count 1. Throws InvalidArgument for an unhashed block.
  void touch(BlockId id);
  // Registers `hash` for a block in use that has none. False, with nothing changed, when another
  // block already holds that hash (the same content computed twice: the first copy is kept).
  bool setHash(BlockId id, uint64_t hash);
  // Drops the hash of a block in use (its content is about to change). No-op when unhashed.
  void clearHash(BlockId id);
  bool isHashed(BlockId id) const;
  uint64_t blockHash(BlockId id) const;  // the hash of a hashed block
  // Evicts every cached block (ref count 0, hashed); appends them and their hashes to `removed`.
  // Blocks in use keep theirs. Returns how many were evicted.
  int32_t evictAllCached(std::vector<EvictedBlock>* removed = nullptr);

  // Blocks an allocation can take: free ones, cached ones included.
  int32_t freeBlocks() const { return numFree_; }
  // Of those, the ones holding cached content (evicted when taken).
  int32_t cachedBlocks() const { return numCached_; }
  // Blocks holding a hash, in use or cached.
  int32_t hashedBlocks() const { return numHashed_; }
  int32_t usedBlocks() const { return total_ - numFree_; }
  int32_t totalBlocks() const { return total_; }
  // Blocks with ref count > 1.
  int32_t sharedBlocks() const { return numShared_; }

  // --- resizing ---------------------------------------------------------------------------
  int32_t capacity() const { return capacity_; }
  // Adds empty blocks [totalBlocks(), n) (reused first). Throws InvalidArgument unless
  // totalBlocks() <= n <= capacity().
  void grow(int32_t n);
  // Removes blocks [n, totalBlocks()); the cached ones among them are evicted (appended to
  // `evicted`). Throws InvalidArgument unless 1 <= n <= totalBlocks() and none of them is in use.
  void shrink(int32_t n, std::vector<EvictedBlock>* evicted = nullptr);
  // Moves block `from` (in use) to `to` (free; evicted first when cached, appended to
  // `evicted`): `to` takes its references and hash, `from` becomes an empty free block. The
  // caller moves the content and every table entry. Throws InvalidArgument otherwise.
  void relocate(BlockId from, BlockId to, std::vector<EvictedBlock>* evicted = nullptr);

  // External fragmentation as a contiguous allocator sees it: 1 - (longest run of consecutive
  // free ids / free blocks), 0 when nothing is free. Reported for comparison only: a paged cache
  // never needs consecutive ids, so this number never limits allocation. O(totalBlocks).
  double fragmentation() const;

  // An ASCII map of the pool, 64 blocks a line: '.' free, 'C' cached, 'X' used by one owner,
  // 'S' shared.
  void dumpBlockMap(std::ostream& os) const;

  // Free ids from head (next handed out) to tail. O(freeBlocks); for tests and dumps.
  std::vector<BlockId> freeListOrder() const;

  // Verifies the free queue (acyclic, doubly linked, exactly the ref-0 blocks, count matches), the
  // shared and cached counts, and the hash table (every hashed block found under its hash, nothing
  // else in it). Throws KVError{InvariantViolated} describing the first problem found.
  void checkInvariants() const;

 private:
  void checkId(BlockId id, const char* what) const;
  void pushFreeTail(BlockId id);
  void pushFreeHead(BlockId id);
  void unlinkFree(BlockId id);
  size_t slotOf(uint64_t hash) const { return static_cast<size_t>(mix(hash)) & tableMask_; }
  static uint64_t mix(uint64_t h);
  size_t findSlot(uint64_t hash) const;  // the slot holding `hash`, or the empty slot ending its probe
  void eraseHash(BlockId id);            // drops id's hash from the table (backward-shift delete)

  int32_t total_;
  int32_t capacity_;
  int32_t numFree_;
  int32_t numShared_ = 0;
  int32_t numCached_ = 0;
  int32_t numHashed_ = 0;
  BlockId head_ = kNoBlock;
  BlockId tail_ = kNoBlock;
  std::vector<int32_t> refs_;
  std::vector<BlockId> next_;
  std::vector<BlockId> prev_;
  std::vector<uint8_t> queued_;  // on the free queue
  std::vector<uint8_t> hashed_;
  std::vector<uint64_t> hash_;
  std::vector<BlockId> table_;  // open addressing: a block id per slot, kNoBlock when empty
  size_t tableMask_ = 0;
};

using KVBlockAllocator = BlockPool;  // the original design's name (docs/design.md)

}  // namespace cortex::kv
