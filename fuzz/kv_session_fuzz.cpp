// libFuzzer target for the KV session reader (KVCache::loadSession): any byte string must either
// load or throw KVError, never crash, read out of bounds, hit undefined behaviour or leave the
// cache inconsistent (checkInvariants after every input).
//
// Random bytes rarely get past the magic and the checksum, so an input is read as edits of a
// valid session (saved once at start from a small hybrid cache): byte 0 picks whether the
// checksum is recomputed after the edits (so the parser behind it is reached) and how much of the
// file is kept; then each 3 bytes (offset: 2 bytes, value: 1 byte) XOR one byte of the file.
// An input that starts with the session magic is instead loaded as it is.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>

#include "kv/kv_cache.h"

namespace {

using namespace cortex::kv;

KVCacheConfig config() {
  KVCacheConfig c;
  c.numLayers = 3;
  c.numKVHeads = 1;
  c.headDim = 8;
  c.blockSizeTokens = 4;
  c.numBlocks = 24;
  c.dtype = KVDType::Q8;
  c.layerWindows = {5, 0, 5};
  return c;
}

// The session format's checksum (FNV-1a 64 of every byte before the last 8).
void fixChecksum(std::string& file) {
  if (file.size() < 8) return;
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < file.size() - 8; ++i) {
    h = (h ^ static_cast<uint8_t>(file[i])) * 0x100000001b3ull;
  }
  std::memcpy(file.data() + file.size() - 8, &h, 8);
}

// A valid session of 20 tokens (5 blocks, every group) with a little metadata.
std::string validSession() {
  KVCache k(config());
  std::vector<int32_t> tokens(20);
  for (int32_t i = 0; i < 20; ++i) tokens[static_cast<size_t>(i)] = 7 * i + 1;
  k.allocateFor(1, 4);
  for (int32_t pos = 0; pos < 20; ++pos) {
    if (pos >= 4 && pos % 4 == 0) k.appendTokens(1, 4);
    for (int32_t layer = 0; layer < 3; ++layer) {
      float row[8];
      for (int d = 0; d < 8; ++d) row[d] = static_cast<float>(pos * 8 + d) / 17.0f;
      k.writeKV(k.slotFor(1, pos, k.arena().groupOf(layer)), layer, row, row);
    }
    if ((pos + 1) % 4 == 0) k.cacheComputedBlocks(1, std::span(tokens).first(static_cast<size_t>(pos) + 1));
  }
  std::ostringstream out;
  k.saveSession(tokens, "{\"fuzz\": true}", out);
  return out.str();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string seed = validSession();
  static KVCache cache(config());
  std::string file;
  if (size >= 8 && std::memcmp(data, "CSKVSESS", 8) == 0) {
    file.assign(reinterpret_cast<const char*>(data), size);
  } else {
    file = seed;
    const uint8_t mode = size > 0 ? data[0] : 0;
    for (size_t i = 1; i + 3 <= size; i += 3) {
      const size_t at = (static_cast<size_t>(data[i]) | static_cast<size_t>(data[i + 1]) << 8) %
                        file.size();
      file[at] = static_cast<char>(file[at] ^ static_cast<char>(data[i + 2]));
    }
    if (mode & 0x80) file.resize(file.size() * (mode & 0x7f) / 128);  // truncated
    if (mode & 0x01) fixChecksum(file);
  }
  std::istringstream in(file);
  try {
    cache.loadSession(in);
  } catch (const KVError&) {
  }
  cache.checkInvariants();
  if (cache.stats().cachedBlocks > 16) cache.resetPrefixCache();
  return 0;
}
