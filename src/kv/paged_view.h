// What a kernel needs to read and write keys and values in place, and nothing of the cache's
// bookkeeping: the storage format, token slots, the arena's geometry (KVArena) and a paged view of
// one sequence's K or V in one layer (PagedKVView). KVCache (kv_cache.h) owns the arena and the
// block tables; the forward pass receives a KVArena plus resolved slots and block tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace cortex::kv {

using BlockId = int32_t;
inline constexpr BlockId kNoBlock = -1;
using SeqId = uint64_t;

// How K/V elements are stored. Every size and name of a format comes from its descriptor, so a
// new format (fp8, 4-bit) is one new row, not a hunt through the code for sizes.
//   Q8: int8 values with one float32 scale per row (one token's headDim elements of one head),
//   stored right after the row: scale = max |x| / 127, q = round-half-even(x / scale) (0 when
//   the row is all zeros), read back as float(q) * scale. A row never depends on its neighbours,
//   so what a position stores is the same whatever is batched or computed around it.
enum class KVDType : uint8_t { F32, F16, BF16, Q8 };

struct KVFormat {
  KVDType dtype;
  uint32_t elementBytes;  // bytes of one stored element
  uint32_t rowScaleBytes; // bytes after each row (its scale); a multiple of elementBytes
  const char* name;       // the CLI spelling: "f32", "f16", "bf16", "q8"
};

inline constexpr KVFormat kKVFormats[] = {
    {KVDType::F32, 4, 0, "f32"},
    {KVDType::F16, 2, 0, "f16"},
    {KVDType::BF16, 2, 0, "bf16"},
    {KVDType::Q8, 1, 4, "q8"},
};

constexpr const KVFormat& kvFormat(KVDType dtype) { return kKVFormats[static_cast<size_t>(dtype)]; }
constexpr size_t dtypeBytes(KVDType dtype) { return kvFormat(dtype).elementBytes; }
constexpr const char* toString(KVDType dtype) { return kvFormat(dtype).name; }
// Bytes of one stored row of headDim elements, its scale included.
constexpr size_t rowBytes(KVDType dtype, int64_t headDim) {
  return static_cast<size_t>(headDim) * dtypeBytes(dtype) + kvFormat(dtype).rowScaleBytes;
}
// The same in elements: the distance between the rows of consecutive tokens of one head.
constexpr int64_t rowStrideElements(KVDType dtype, int64_t headDim) {
  return static_cast<int64_t>(rowBytes(dtype, headDim) / dtypeBytes(dtype));
}
// The format named `name` ("f32", "f16", "bf16", "q8"); throws std::invalid_argument naming the
// choices.
KVDType parseKVDType(std::string_view name);

// Where one token's K/V rows live: physical block and token offset inside it.
struct TokenSlot {
  BlockId block = kNoBlock;
  int32_t offset = 0;
};

// A zero-copy view of one layer's K (or V) for one sequence. Element (token t, head h, dim d) is
// at base + (blockTable[t / blockSizeTokens] * blockStride + h * headStride +
// (t % blockSizeTokens) * tokenStride + d) * elementBytes; a Q8 row's scale follows its headDim
// elements.
struct PagedKVView {
  const std::byte* base = nullptr;      // this layer's K (or V) region
  const BlockId* blockTable = nullptr;  // numBlocks ids, logical order
  int32_t numBlocks = 0;
  int32_t numTokens = 0;  // valid positions: [0, numTokens)
  int32_t blockSizeTokens = 0;
  int32_t numKVHeads = 0;
  int32_t headDim = 0;
  int64_t blockStride = 0;  // elements
  int64_t headStride = 0;   // elements
  int64_t tokenStride = 0;  // elements
  KVDType dtype = KVDType::F16;

  // Address of the headDim-element row of (token, head). No bounds checks (hot path).
  const std::byte* row(int32_t token, int32_t head) const {
    const int64_t block = blockTable[token / blockSizeTokens];
    const int64_t elem = block * blockStride + head * headStride +
                         static_cast<int64_t>(token % blockSizeTokens) * tokenStride;
    return base + elem * static_cast<int64_t>(dtypeBytes(dtype));
  }
};

// Where a layer's K/V live: its group (whose block table it reads) and its slot among the layers
// a block of that group holds (kv_config.h, KVGroups).
struct KVLayerPlace {
  int32_t group = 0;
  int32_t slot = 0;
};

// The K/V arena's addresses and geometry: enough to address the row of any (slot, layer, head)
// and to build paged views from a block table, without the cache's lock or bookkeeping. Valid as
// long as the KVCache that handed it out (its arena never moves).
struct KVArena {
  std::byte* kBase = nullptr;
  std::byte* vBase = nullptr;
  int32_t numLayers = 0;
  int32_t numKVHeads = 0;
  int32_t headDim = 0;
  int32_t blockSizeTokens = 0;
  int32_t numGroups = 1;      // block tables per sequence
  int32_t layersPerBlock = 0; // layers one block holds (slots)
  std::vector<KVLayerPlace> places;  // per layer
  int64_t slotStride = 0;   // elements
  int64_t blockStride = 0;  // elements
  int64_t headStride = 0;   // elements
  int64_t tokenStride = 0;  // elements (rowStrideElements)
  KVDType dtype = KVDType::F16;

  // The group whose block table holds `layer`'s positions.
  int32_t groupOf(int32_t layer) const { return places[static_cast<size_t>(layer)].group; }
  // `slot.block` must be a block of the layer's group.
  int64_t rowByteOffset(TokenSlot slot, int32_t layer, int32_t head) const {
    return (places[static_cast<size_t>(layer)].slot * slotStride + slot.block * blockStride +
            head * headStride + static_cast<int64_t>(slot.offset) * tokenStride) *
           static_cast<int64_t>(dtypeBytes(dtype));
  }
  // A view of positions [0, numTokens) of one layer through its group's block table of numBlocks
  // ids (entries a window no longer sees may be kNoBlock: they are never read).
  PagedKVView kView(int32_t layer, const BlockId* table, int32_t numBlocks,
                    int32_t numTokens) const {
    return view(kBase, layer, table, numBlocks, numTokens);
  }
  PagedKVView vView(int32_t layer, const BlockId* table, int32_t numBlocks,
                    int32_t numTokens) const {
    return view(vBase, layer, table, numBlocks, numTokens);
  }

 private:
  PagedKVView view(const std::byte* half, int32_t layer, const BlockId* table, int32_t numBlocks,
                   int32_t numTokens) const {
    PagedKVView v;
    v.base = half + places[static_cast<size_t>(layer)].slot * slotStride *
                        static_cast<int64_t>(dtypeBytes(dtype));
    v.blockTable = table;
    v.numBlocks = numBlocks;
    v.numTokens = numTokens;
    v.blockSizeTokens = blockSizeTokens;
    v.numKVHeads = numKVHeads;
    v.headDim = headDim;
    v.blockStride = blockStride;
    v.headStride = headStride;
    v.tokenStride = tokenStride;
    v.dtype = dtype;
    return v;
  }
};

// The filled rows [0, rows) of one block of one group (a windowed sequence's block whose positions
// moved: kv_cache.h, shiftWindow).
struct BlockRows {
  int32_t group = 0;
  BlockId block = kNoBlock;
  int32_t rows = 0;
};

// One stored row of n elements (its scale included for Q8) from or to floats.
void loadRow(const std::byte* row, float* out, int32_t n, KVDType dtype);
void storeRow(const float* src, std::byte* row, int32_t n, KVDType dtype);

// Stores one token's K and V for a layer: k and v hold numKVHeads * headDim floats (head-major),
// converted to the storage format. The slot must be one its caller reserved in the layer's group
// and does not share (new positions from appendTokens are never shared). No lock, no checks (hot
// path).
void writeKV(const KVArena& arena, TokenSlot slot, int32_t layer, const float* k, const float* v);

// Copies a view into a contiguous float tensor [numKVHeads][numTokens][headDim] (out must hold
// that many floats). For tests and debugging only: attention reads the view in place.
void gather(const PagedKVView& view, float* out);

}  // namespace cortex::kv
