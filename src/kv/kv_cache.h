// KVCache: the logical layer of the paged KV cache.
//
// Every sequence owns a block table: a list of physical block ids from the BlockPool, in logical
// order. Token position p of a sequence lives in block table[p / blockSizeTokens] at offset
// p % blockSizeTokens. The keys and values of all blocks live in one preallocated, 64-byte
// aligned arena (a K half and a V half), so attention reads them in place through a PagedKVView.
//
// Arena layouts (elements; B = blockSizeTokens, H = numKVHeads, D = headDim, N = numBlocks):
//   LayerMajor (default): [layer][block][head][token][dim]  -> one layer's blocks are contiguous
//   HeadMajor:            [layer][head][block][token][dim]  -> one (layer, head)'s blocks are
//                                                              contiguous
// In both, the rows of one head inside one block are contiguous (B x D), which is what the
// attention kernel streams over.
//
// Thread safety: bookkeeping calls (allocate/append/fork/free, slots, views, stats) may come from
// several threads at once; they are serialised by one mutex. Row addresses and writeKV need no
// lock: they are arithmetic on an arena that never moves, and the caller writes only to slots it
// reserved. A view (and its block-table pointer) stays valid until the next bookkeeping call that
// changes the same sequence (append/free); the engine calls those from one thread per sequence.
//
// Prefix caching (on unless config.prefixCaching is false): once the forward pass has written a
// sequence's positions, cacheComputedBlocks gives each full block a hash chained from the hash of
// the block before it and its own token ids (block i's hash covers tokens [0, (i + 1) * B)). A
// later sequence whose first tokens are the same finds those blocks (cachedPrefixTokens) and is
// created on them (tryAllocateWithPrefix) instead of computing them again. Freed hashed blocks
// stay cached, evictable in LRU order (BlockPool); a sequence's blocks are freed last block first,
// so a prefix's root is evicted last. A hit is verified against the block's stored token ids and
// parent hash, so a hash collision can only mislead through a collision of the parent chain.
//
// Hybrid cache (layers with sliding windows, config.layerWindows): layers are grouped by window
// into groups of equal size (kvGroups, kv_config.h), and a sequence holds one block table per
// group, all indexed by the same logical block number. A block is a page of one group's layers.
// A windowed group gives its blocks back to the pool as the sequence grows: when positions from
// T on are appended, the group's blocks that lie wholly before T - W + 1 (the first key the query
// at T reads) leave its table (the entry becomes kNoBlock) and return to the pool, cached when
// hashed. Global groups keep every block. Prefix caching hashes each group's blocks under the
// same chained hash mixed with the group; a hit of h blocks needs every global group's blocks
// [0, h) and each windowed group's blocks from the one holding position h * B - W + 1 up to h,
// so the hit is the longest prefix for which all groups hold what the next query reads. Events
// report the first group's blocks (the chain, which is the same for every group).
//
// Errors: every failure throws KVError (kv_error.h) and leaves the cache unchanged.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kv/block_pool.h"
#include "kv/kv_error.h"
#include "kv/kv_config.h"
#include "kv/kv_events.h"
#include "kv/paged_view.h"
#include "kv/spin_mutex.h"

namespace cortex::kv {

// One sequence's share of a forward step: its new positions [firstPos, firstPos + numTokens),
// already reserved (allocateFor / appendTokens).
struct StepSequence {
  SeqId seq = 0;
  int32_t firstPos = 0;
  int32_t numTokens = 0;
};

struct KVCacheStats {
  int32_t totalBlocks = 0;
  int32_t usedBlocks = 0;
  int32_t freeBlocks = 0;
  int32_t sharedBlocks = 0;        // blocks with more than one owner
  int32_t cachedBlocks = 0;        // no owner, holding a cached prefix: counted in freeBlocks too
                                   // (an allocation may evict them)
  int32_t numSequences = 0;
  int64_t liveTokens = 0;          // token slots holding a token (each physical slot once)
  int64_t allocatedTokenSlots = 0; // usedBlocks * blockSizeTokens
  uint64_t totalBytes = 0;         // arena size, K and V
  uint64_t allocatedBytes = 0;     // usedBlocks * bytesPerBlock
  uint64_t freeBytes = 0;
  double utilization = 0;          // liveTokens / allocatedTokenSlots (0 when nothing allocated)
  double fragmentation = 0;        // 1 - utilization when something is allocated, else 0
};

class KVCache {
 public:
  // Validates the configuration (positive sizes, exactly one of numBlocks / memoryBudgetBytes, a
  // budget of at least one block) and allocates the arena (untouched until warmup()).
  explicit KVCache(const KVCacheConfig& config);
  ~KVCache();
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  const KVCacheConfig& config() const { return config_; }
  const KVGroups& groups() const { return groups_; }
  int32_t numGroups() const { return static_cast<int32_t>(groups_.groups.size()); }
  int32_t numBlocks() const { return numBlocks_.load(std::memory_order_relaxed); }
  // The most blocks resize() can make it (config maxMemoryBytes; at least numBlocks()).
  int32_t capacityBlocks() const { return capacity_; }
  int32_t blockSizeTokens() const { return config_.blockSizeTokens; }
  // Bytes one block holds across all layers, K and V.
  uint64_t bytesPerBlock() const { return bytesPerBlock_; }
  // Blocks needed to hold `tokens` tokens (tokens >= 0) in one group's table.
  int32_t blocksForTokens(int64_t tokens) const;
  // kv::blocksForSequence for this cache: the most blocks one sequence holds on its way to
  // `tokens` positions, computing at most stepTokens per step.
  int64_t blocksForSequence(int64_t tokens, int32_t stepTokens) const;
  // The longest sequence the whole pool can hold (whole blocks), computing at most stepTokens per
  // step; INT32_MAX when every group is windowed and the windows fit.
  int64_t maxSequenceTokens(int32_t stepTokens) const {
    return maxSequenceTokensFor(numBlocks(), stepTokens);
  }
  // The same for a pool of `blocks` blocks.
  int64_t maxSequenceTokensFor(int32_t blocks, int32_t stepTokens) const;

  // Writes to every page of the arena's blocks so the first requests do not pay for page faults.
  void warmup();

  // --- resizing while in use (kv_resize.cpp) ---------------------------------------------------
  // Makes the pool `blocks` blocks, 1 <= blocks <= capacityBlocks(). The arena's address range
  // is reserved for the capacity at construction, so no block address ever moves: growing
  // commits memory for the new blocks (empty, handed out first); shrinking gives back blocks
  // [blocks, numBlocks()): their cached blocks are evicted, the blocks in use among them are
  // moved (K/V copied, every table updated) to free blocks below `blocks`, and their memory goes
  // back to the system. Throws KVError{OutOfBlocks} when more blocks are in use than `blocks`
  // (free some first), {InvalidArgument} for a size out of range, a block being copied or saved
  // at the moment (retry), or a cache whose K/V live elsewhere (setExternalBlockCopier); the
  // cache is unchanged then. Returns the blocks moved. Call it from the thread that appends to
  // the sequences (the engine's, between steps): a copy on write in flight writes outside the
  // lock.
  int32_t resize(int32_t blocks);

  // --- sequences (tokens in, blocks out) ------------------------------------------------------
  // Creates `seq` with room for `initialTokens` (>= 1) positions [0, initialTokens), all or
  // nothing; with `win` on, it keeps only its sinks and window (see "Windowed sequences" below).
  // Throws SequenceExists, InvalidArgument, OutOfBlocks.
  void allocateFor(SeqId seq, int32_t initialTokens, SeqWindow win = {});
  // Adds one position to `seq` and returns it (its index, = the old usedTokens). Takes a new block
  // (per group) only when the last one is full; copies a partly filled last block first if it is
  // shared (copy on write); windowed groups first give back the blocks their window left behind.
  // Throws UnknownSequence, OutOfBlocks.
  int32_t appendToken(SeqId seq) { return appendTokens(seq, 1); }
  // Adds n >= 1 positions, all or nothing; returns the first new position.
  int32_t appendTokens(SeqId seq, int32_t n);
  // The same two, for callers that expect the pool to run dry (the scheduler): false, with nothing
  // changed, when the pool has too few free blocks; misuse (unknown or existing sequence, bad
  // counts) still throws.
  bool tryAllocateFor(SeqId seq, int32_t initialTokens, SeqWindow win = {});
  bool tryAppendTokens(SeqId seq, int32_t n);
  // Free blocks the pool must have for appendTokens(seq, n) to succeed: the new and copy-on-write
  // blocks it takes, less the blocks windowed groups give back first (never below 0). Throws
  // UnknownSequence, InvalidArgument.
  int32_t blocksNeededToAppend(SeqId seq, int32_t n) const;
  // Makes `dst` a copy of `src` that shares all of src's blocks (ref counts +1, no bytes copied,
  // no block taken). Throws UnknownSequence (src), SequenceExists (dst). The first append to
  // either copies their shared, partly filled last block (copy on write); that copy of bytes runs
  // outside the cache's lock.
  void fork(SeqId src, SeqId dst);
  // Releases `seq`'s blocks (shared blocks stay with their other owners). Unknown ids are
  // ignored: freeing twice is harmless. Returns whether the sequence existed.
  bool freeFor(SeqId seq);

  // --- prefix caching --------------------------------------------------------------------------
  bool prefixCaching() const { return config_.prefixCaching; }
  // Tokens of the longest cached prefix of `tokens`: whole blocks only, so at most
  // tokens.size() rounded down to a block. Looks, changes nothing. 0 when caching is off.
  // With `win` on, capped as tryAllocateWithPrefix caps a windowed sequence's hit.
  int32_t cachedPrefixTokens(std::span<const int32_t> tokens, SeqWindow win = {}) const;
  // Blocks that tryAllocateWithPrefix(seq, prefix, totalTokens) would take from the free queue:
  // fresh blocks beyond the hit ones, plus hit blocks that are cached (they leave the queue).
  int32_t blocksNeededToAllocate(std::span<const int32_t> prefix, int32_t totalTokens,
                                 SeqWindow win = {}) const;
  // Creates `seq` with positions [0, totalTokens) (>= 1), its first blocks being the cached
  // prefix of `prefix` (as cachedPrefixTokens finds it, at most totalTokens - 1 tokens so one is
  // left to compute) and the rest fresh, all or nothing. Returns the cached tokens (a multiple of
  // the block size, possibly 0), or -1 with nothing changed when the pool is short. With `win`
  // on, the hit stops where the window would first skip a position (below). Throws
  // SequenceExists, InvalidArgument.
  int32_t tryAllocateWithPrefix(SeqId seq, std::span<const int32_t> prefix, int32_t totalTokens,
                                SeqWindow win = {});
  // Records that positions [0, tokens.size()) of `seq` are computed (their K/V written), with
  // their token ids: every full block among them not hashed yet gets its hash and can be hit. Only
  // the tokens of newly full blocks are read. No-op when caching is off. Throws UnknownSequence,
  // InvalidArgument (more tokens than the sequence holds).
  void cacheComputedBlocks(SeqId seq, std::span<const int32_t> tokens);
  // Evicts every cached block (blocks in use keep their hashes). Returns how many.
  int32_t resetPrefixCache();
  // For a runner that keeps K/V in its own memory instead of this arena (the MLX backend): a copy
  // on write calls copier(from, to) (on the appending thread) instead of copying arena bytes;
  // the runner must copy block `from` to `to` before it next reads or writes either. Sessions
  // read and write the arena, so they are not for such a cache. Set before the first sequence.
  void setExternalBlockCopier(std::function<void(BlockId from, BlockId to)> copier);
  // Turns event recording on or off (off at construction); while on, every store, eviction and
  // reset is recorded until takeEvents collects it.
  void recordEvents(bool on);
  // Moves the events recorded since the last call into `out` (appended, oldest first).
  void takeEvents(std::vector<KVEvent>& out);
  // The chained hash of `tokens`' full blocks, as this cache computes it (block i covers tokens
  // [0, (i + 1) * B)). For tests and tools.
  std::vector<uint64_t> blockHashes(std::span<const int32_t> tokens) const;

  // --- windowed sequences (StreamingLLM: attention sinks + a sliding window) --------------------
  // A sequence created with a SeqWindow keeps, in its global groups, the blocks of its first
  // `sinks` positions for good and gives back the blocks that fall wholly between them and its
  // window (the query at position p reads keys [0, sinks) and [p - window + 1, p]); its
  // sliding-window groups keep their own windows. Its positions are cache positions, not token
  // indices: when they reach the model's limit, shiftWindow moves the window back next to the
  // sinks. Its blocks are hashed for the prefix cache only while nothing has been skipped (the
  // blocks wholly before position sinks + window, whose K/V are those of full attention) and
  // never after a shift; a prefix hit is capped the same way.
  struct WindowShift {
    int32_t tokens = 0;  // positions moved back by (a multiple of the block size; 0: none)
    std::vector<BlockRows> moved;  // blocks whose positions moved: their keys need re-rotating
  };
  // Moves windowed `seq` back: first gives back every block the query at position
  // usedTokens(seq) would not read, then removes, in every group, as many given-back table
  // entries after its sink blocks as all groups have (d blocks), so position p >= the sinks'
  // blocks becomes p - d * B. Changes only bookkeeping: the caller must re-rotate the keys of
  // `moved` (RoPE by -tokens) before the sequence is read again. Throws UnknownSequence,
  // InvalidArgument for a sequence without a window, or one whose moved blocks are shared or
  // hashed (the window must lie wholly past sinks + window when it shifts).
  WindowShift shiftWindow(SeqId seq);

  int32_t usedTokens(SeqId seq) const;
  // Offset inside the last block where the next appended token goes (usedTokens % blockSize).
  int32_t getTokenOffsetInBlock(SeqId seq) const;
  bool hasSequence(SeqId seq) const;
  // Copy of one group's block table (logical order; kNoBlock where a window gave the block back).
  // For tests, dumps and diagnostics. Throws UnknownSequence, InvalidArgument (group).
  std::vector<BlockId> blockTable(SeqId seq, int32_t group = 0) const;

  // --- resolving a step (one lock for the whole batch) ----------------------------------------
  // For each sequence in `step`, in order: appends the slots of its new positions to `slots`
  // (numGroups() per position: position-major, then group), its block tables (numGroups() tables
  // of n = blocksForTokens(firstPos + numTokens) ids each, group after group) to `blockTables`,
  // and the index where its first table starts to `tableStarts` (group g's table starts at
  // start + g * n). The outputs are cleared first and are copies: they stay valid whatever the
  // cache does next. Throws UnknownSequence, or InvalidArgument for positions outside a sequence
  // or behind a window, with the outputs cleared.
  void resolveStep(std::span<const StepSequence> step, std::vector<TokenSlot>& slots,
                   std::vector<BlockId>& blockTables, std::vector<int32_t>& tableStarts) const;
  // The arena's addresses and geometry, for writing and reading K/V in place (paged_view.h).
  const KVArena& arena() const { return arena_; }

  // --- writing K/V (positions in, slots and addresses out) -------------------------------------
  // The slot of position pos in [0, usedTokens(seq)) in one group's blocks. Throws
  // UnknownSequence, InvalidArgument (also for a position the group's window gave back).
  TokenSlot slotFor(SeqId seq, int32_t pos, int32_t group = 0) const;
  // Slots of positions [firstPos, firstPos + out.size()) under one lock.
  void slotsFor(SeqId seq, int32_t firstPos, std::span<TokenSlot> out, int32_t group = 0) const;
  // Address of the headDim-element K (or V) row of (slot, layer, head); lock-free arithmetic.
  // The slot must come from the layer's group (arena().groupOf(layer)). Throws LayerOutOfRange;
  // slot and head are not checked (hot path; slots come from slotFor).
  std::byte* kRow(TokenSlot slot, int32_t layer, int32_t head);
  std::byte* vRow(TokenSlot slot, int32_t layer, int32_t head);
  // kv::writeKV on this cache's arena, with the layer checked (throws LayerOutOfRange).
  void writeKV(TokenSlot slot, int32_t layer, const float* k, const float* v);

  // --- sessions: a prefix's cached blocks to a file and back (kv_session.cpp) -------------------
  // Writes `tokens`' longest prefix that the prefix cache can serve (whole blocks, every group's
  // blocks a hit would take) with its K/V and `metadata` (opaque bytes of the caller's) to `out`
  // in the session format (kv_session.cpp). Returns the tokens saved (0: nothing cached, an
  // empty session is still written). The blocks are held while their bytes are copied, so no
  // eviction can change them. Throws KVError{InvalidArgument} when prefix caching is off or the
  // stream fails.
  int32_t saveSession(std::span<const int32_t> tokens, std::string_view metadata,
                      std::ostream& out);
  struct LoadedSession {
    std::vector<int32_t> tokens;  // the saved prefix's token ids
    std::string metadata;
    int32_t blocksLoaded = 0;     // blocks written into the pool (the others were cached already)
  };
  // Reads a session saved by a cache of the same model, format, block size and layer groups
  // (the whole file is read and verified first); its blocks become cached blocks, so a prompt
  // starting with its tokens hits them. Throws KVError{InvalidArgument} naming what is wrong
  // (not a session, another version, another model or KV format, truncated, checksum mismatch,
  // inconsistent records) or KVError{OutOfBlocks} when the pool cannot take the blocks; either
  // way the cache is unchanged.
  LoadedSession loadSession(std::istream& in);

  // --- tiers below the pool (kvtier): blocks out as they are hashed, back in on a hit -----------
  // The key a lower tier keeps block `index` of `group` under, for a prefix whose chained block
  // hashes are `chain` (blockHashes): the same hash the pool registers the block under, which
  // covers the model, the KV format, the group and every token up to the block's end.
  uint64_t tierKey(uint64_t chain, int32_t group) const { return groupHash(chain, group); }
  // Parent hash of every sequence's first block: the model fingerprint mixed with the KV format,
  // block size, shape and layer groups. Two caches can share blocks only when theirs are equal.
  uint64_t hashRoot() const { return hashRoot_; }
  // Bytes of one block's K and V payload (every slot and head of its group's layers).
  size_t blockPayloadBytes() const;
  // A full, hashed block as a lower tier stores it.
  struct ExportedBlock {
    uint64_t key = 0;           // tierKey(chain, group)
    uint64_t parent = 0;        // chained hash of the blocks before it (hashRoot() for the first)
    int32_t index = 0;          // logical block in its sequence
    int32_t group = 0;
    std::vector<int32_t> tokens;     // its blockSizeTokens token ids
    std::vector<std::byte> payload;  // blockPayloadBytes() bytes
  };
  // While on (off at construction), cacheComputedBlocks notes every block it hashes, for
  // takeNewBlocks.
  void recordNewBlocks(bool on);
  // Copies out the blocks hashed since the last call that still hold their hash (a block evicted
  // meanwhile is left out), oldest first. Each is held while its bytes are copied, outside the
  // lock. Appends to `out`.
  void takeNewBlocks(std::vector<ExportedBlock>& out);
  // A block read back from a lower tier, already verified against the prefix: its logical index,
  // group and payload (blockPayloadBytes()).
  struct TierBlock {
    int32_t index = 0;
    int32_t group = 0;
    const std::byte* payload = nullptr;
  };
  // Makes `blocks` cached blocks of the prefix `tokens` (whose whole blocks they belong to), as
  // loadSession does, so a request starting with `tokens` hits them; blocks the pool already
  // holds are kept. Installs the longest run of whole logical blocks, in index order, that the
  // free blocks allow. Returns the number of logical blocks [first index, first index + n) whose
  // every given group is now cached. Throws KVError{InvalidArgument} for indices or groups outside
  // `tokens`' blocks, prefix caching off.
  int32_t installTierBlocks(std::span<const int32_t> tokens, std::span<const TierBlock> blocks);

  // --- reading ---------------------------------------------------------------------------------
  // Paged views of all usedTokens(seq) positions of one layer (through its group's table; a
  // windowed layer's view reads only its window). Throws UnknownSequence, LayerOutOfRange. Valid
  // until the next append/free of the same sequence.
  PagedKVView getKView(SeqId seq, int32_t layer) const;
  PagedKVView getVView(SeqId seq, int32_t layer) const;

  // --- monitoring ------------------------------------------------------------------------------
  KVCacheStats stats() const;
  uint64_t getTotalAllocated() const;  // bytes in used blocks
  uint64_t getTotalFree() const;       // bytes in free blocks
  int32_t getNumAllocatedSequences() const;
  bool isFull() const;                 // no free block left
  double getFragmentation() const;     // unused slots in allocated blocks / allocated slots
  double getUtilization() const;       // live tokens / allocated slots
  int32_t freeBlocks() const;
  int32_t usedBlocks() const;
  // Statistics (configuration, blocks, bytes, sequences, live tokens, utilization,
  // fragmentation), then every sequence's block table, one line each.
  void dumpCacheStats(std::ostream& os) const;
  // The pool's block map ('.' free, 'C' cached, 'X' used, 'S' shared).
  void dumpBlockMap(std::ostream& os) const;

  // Verifies: pool invariants; each block's ref count equals the number of block tables holding
  // it; each table has exactly blocksForTokens(usedTokens) entries, given-back entries (kNoBlock)
  // only at the front of windowed groups' tables and never where the next query reads; every
  // block belongs to the group whose tables hold it; per-block fill counts agree with every owner
  // and sum to the live-token count; bytes allocated + free = arena; a hashed block sits in every
  // table that holds it at a position whose chained hash (mixed with the group) is its own, and
  // stores the token ids of that position's block. Throws KVError{InvariantViolated}.
  void checkInvariants() const;

 private:
  struct Table {
    std::vector<BlockId> blocks;  // blocksForTokens(tokens) entries
    int32_t kept = 0;             // leading entries kept for good (a windowed sequence's sinks)
    int32_t dropped = 0;          // entries [kept, dropped) a window gave back (kNoBlock)
  };
  struct Sequence {
    std::vector<Table> tables;  // one per group
    int32_t tokens = 0;
    SeqWindow win;              // windowed sequence (StreamingLLM), when on
    int32_t shifted = 0;        // positions shiftWindow moved it back by, in all
    // Chained hashes of the first hashes.size() blocks (full and computed). A block may hold its
    // hash (BlockPool::isHashed) or not (another block registered the same content first).
    std::vector<uint64_t> hashes;
  };
  // A copy on write planned under the lock and done outside it: the source block keeps the
  // reference taken for it until the copy is over.
  struct PendingCopy {
    BlockId from = kNoBlock;
    BlockId to = kNoBlock;
    int32_t tokens = 0;
  };

  Sequence& find(SeqId seq);
  const Sequence& find(SeqId seq) const;
  void checkLayer(int32_t layer) const;
  void checkGroup(int32_t group) const;
  // First logical block a windowed group still needs once positions from `tokens` on are
  // computed (0 for a global group), for a new sequence (prefix lookups).
  int32_t firstNeededBlock(int32_t group, int64_t tokens) const;
  // The same for the table of `group` of `s`: the end of the entries it may give back (at least
  // its kept entries; 0 when it keeps everything).
  int32_t firstNeededBlock(const Sequence& s, int32_t group, int64_t tokens) const;
  // Checks a SeqWindow (InvalidArgument) and sets the kept entries of `s`'s tables.
  void applyWindow(Sequence& s, SeqWindow win) const;
  // Blocks of a sequence with `win` that a prefix hit may cover or hashing may register: those
  // wholly before sinks + window (INT32_MAX without a window).
  int32_t fullAttentionBlocks(SeqWindow win) const;
  // The same for `s`, which registers nothing more once shifted.
  int32_t hashableBlocks(const Sequence& s) const;
  // Gives back table entries [t.dropped, drop) (their blocks go to the pool, cached if hashed).
  void giveBackLocked(Table& t, int32_t drop);
  // Gross: blocks taken (new + copy on write); freed: blocks the windows give back first.
  void appendNeedsLocked(const Sequence& s, int32_t n, int32_t& gross, int32_t& freed) const;
  void copyBlock(BlockId from, BlockId to, int32_t tokens);
  // Takes out.size() blocks for `group` (recording evictions first).
  void takeBlocks(std::span<BlockId> out, int32_t group);
  void fillBlocks(std::span<const BlockId> blocks, int32_t tokens);  // tokens from the first on
  int32_t allocateLocked(SeqId seq, int32_t initialTokens, bool throwIfShort, SeqWindow win);
  // -1: too few free blocks. Needed copies on write are left in `copies` for the caller to finish.
  int32_t appendLocked(SeqId seq, int32_t n, bool throwIfShort, std::vector<PendingCopy>& copies);
  int32_t appendAndCopy(SeqId seq, int32_t n, bool throwIfShort);
  uint64_t chainHash(uint64_t parent, const int32_t* tokens) const;
  uint64_t groupHash(uint64_t chain, int32_t group) const;
  // The longest verified hit of `prefix` (at most maxBlocks blocks) that every group can serve
  // (see the file comment). With `tables`, each group's hit blocks (kNoBlock before its window)
  // land in tables[g]; with `hashes`, the chain.
  int32_t lookupLocked(std::span<const int32_t> prefix, int32_t maxBlocks,
                       std::vector<Table>* tables, std::vector<uint64_t>* hashes) const;
  void releaseBlocksLocked(const Sequence& s);  // last position first
  void noteEvicted();  // turns evictedScratch_ into a BlockRemoved event
  // Slots of positions [firstPos, firstPos + count) in `group`, to out[0], out[stride], ...
  void slotsLocked(SeqId seq, const Sequence& s, int32_t firstPos, size_t count, int32_t group,
                   TokenSlot* out, size_t stride) const;
  // Byte offset, in either half of the arena, of block b's rows of one (slot, head): contiguous,
  // blockSizeTokens rows, in both layouts.
  size_t headRowsOffset(BlockId b, int32_t slot, int32_t head) const {
    return static_cast<size_t>(slot * arena_.slotStride + b * arena_.blockStride +
                               head * arena_.headStride) *
           dtypeBytes(config_.dtype);
  }
  // One block's K and V (every slot and head) copied to or from `buf` (blockPayloadBytes()).
  void copyBlockOut(BlockId b, std::byte* buf) const;
  void copyBlockIn(BlockId b, const std::byte* buf);
  // A block to install into the pool as cached (sessions, tiers): its place and bytes.
  struct InstallRecord {
    int32_t index = 0;
    int32_t group = 0;
    const std::byte* bytes = nullptr;
    BlockId block = kNoBlock;
    bool fresh = false;
  };
  // Makes `records` cached blocks of the prefix `tokens` (whole blocks): held if the pool has
  // them, else taken, copied in and registered. All or nothing (OutOfBlocks), or with `partial`
  // the longest run of whole logical blocks that fits (records is cut to it). Sorts records by
  // index. Returns the blocks newly registered.
  int32_t installBlocks(std::span<const int32_t> tokens, std::vector<InstallRecord>& records,
                        bool partial);
  // Takes (ref + 1, held) or gives back a held reference on a block a session reads or writes.
  void holdLocked(BlockId b);
  void releaseHeldLocked(BlockId b);
  KVCacheStats statsLocked() const;
  // Calls fn(byte offset, bytes) for each contiguous run of the arena holding blocks [from, to):
  // per half and slot (layer-major), or per half, slot and head (head-major).
  void forEachBlockRange(int32_t from, int32_t to,
                         const std::function<void(size_t, size_t)>& fn) const;
  // Makes the arena memory of blocks [from, to) usable (commit) or gives it back (decommit).
  void commitBlocks(int32_t from, int32_t to);
  void decommitBlocks(int32_t from, int32_t to);

  KVCacheConfig config_;
  KVGroups groups_;
  std::atomic<int32_t> numBlocks_{0};
  int32_t capacity_ = 0;       // blocks the arena's address range holds
  uint64_t reservedBytes_ = 0;  // the mapping's length
  uint64_t bytesPerBlock_ = 0;
  uint64_t halfBytes_ = 0;  // bytes of the K half (= V half)
  std::byte* memory_ = nullptr;
  KVArena arena_;

  mutable SpinMutex mu_;
  BlockPool pool_;
  std::vector<int32_t> blockFill_;   // tokens stored in each physical block
  std::vector<int32_t> blockGroup_;  // the group each block was last taken for
  int64_t liveTokens_ = 0;
  std::unordered_map<SeqId, Sequence> seqs_;
  uint64_t hashRoot_ = 0;               // parent hash of every sequence's first block
  std::vector<int32_t> blockTokens_;    // token ids held by each hashed block (B per block)
  std::vector<uint64_t> blockParent_;   // parent hash of each hashed block
  // References held outside block tables: copies on write in flight, blocks a session is saving
  // or loading.
  std::vector<int32_t> heldRefs_;
  bool recordEvents_ = false;
  bool recordNewBlocks_ = false;
  struct NewBlock {
    BlockId block = kNoBlock;
    uint64_t key = 0;
    int32_t index = 0;
    int32_t group = 0;
  };
  std::vector<NewBlock> newBlocks_;  // hashed since the last takeNewBlocks
  std::function<void(BlockId, BlockId)> externalCopier_;
  std::vector<KVEvent> events_;
  std::vector<EvictedBlock> evictedScratch_;
};

}  // namespace cortex::kv
