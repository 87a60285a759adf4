#include "kvtier/block_record.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

namespace cortex::kvtier {

namespace {

constexpr char kMagic[8] = {'C', 'S', 'K', 'V', 'B', 'L', 'K', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = sizeof kMagic + 4 + 3 * 8 + 4 * 4;

template <typename T>
void put(std::byte*& p, const T& v) {
  std::memcpy(p, &v, sizeof v);
  p += sizeof v;
}

template <typename T>
T get(const std::byte*& p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  p += sizeof v;
  return v;
}

}  // namespace

std::vector<std::byte> encodeBlockRecord(uint64_t hashRoot, const kv::KVCache::ExportedBlock& b) {
  const size_t tokenBytes = b.tokens.size() * sizeof(int32_t);
  std::vector<std::byte> out(kHeaderBytes + tokenBytes + b.payload.size() + 8);
  std::byte* p = out.data();
  std::memcpy(p, kMagic, sizeof kMagic);
  p += sizeof kMagic;
  put(p, kVersion);
  put(p, hashRoot);
  put(p, b.key);
  put(p, b.parent);
  for (uint32_t v : {static_cast<uint32_t>(b.index), static_cast<uint32_t>(b.group),
                     static_cast<uint32_t>(b.tokens.size()),
                     static_cast<uint32_t>(b.payload.size())}) {
    put(p, v);
  }
  std::memcpy(p, b.tokens.data(), tokenBytes);
  p += tokenBytes;
  if (!b.payload.empty()) std::memcpy(p, b.payload.data(), b.payload.size());
  p += b.payload.size();
  put(p, static_cast<uint64_t>(XXH3_64bits(out.data(), out.size() - 8)));
  return out;
}

std::string checkBlockRecord(std::span<const std::byte> record, const ExpectedBlock& expect,
                             std::span<const std::byte>& payload) {
  payload = {};
  if (record.size() < sizeof kMagic || std::memcmp(record.data(), kMagic, sizeof kMagic) != 0) {
    return "not a CortexStream KV block record";
  }
  if (record.size() < kHeaderBytes) return "truncated record (" + std::to_string(record.size()) +
                                           " bytes)";
  const std::byte* p = record.data() + sizeof kMagic;
  const auto version = get<uint32_t>(p);
  if (version != kVersion) {
    return "format version " + std::to_string(version) + ", this build reads version " +
           std::to_string(kVersion);
  }
  const auto root = get<uint64_t>(p);
  const auto key = get<uint64_t>(p);
  const auto parent = get<uint64_t>(p);
  const auto index = get<uint32_t>(p);
  const auto group = get<uint32_t>(p);
  const auto tokens = get<uint32_t>(p);
  const auto payloadBytes = get<uint32_t>(p);
  const uint64_t size = kHeaderBytes + uint64_t{tokens} * 4 + payloadBytes + 8;
  if (record.size() != size) {
    return "record of " + std::to_string(record.size()) + " bytes, its header says " +
           std::to_string(size) + " (truncated or damaged)";
  }
  uint64_t stored;
  std::memcpy(&stored, record.data() + record.size() - 8, 8);
  if (XXH3_64bits(record.data(), record.size() - 8) != stored) {
    return "checksum mismatch (the record is damaged)";
  }
  if (root != expect.hashRoot) return "written by another model or KV cache configuration";
  if (key != expect.key || group != static_cast<uint32_t>(expect.group) ||
      index != static_cast<uint32_t>(expect.index)) {
    return "stored under another key";
  }
  if (tokens != expect.tokens.size() || payloadBytes != expect.payloadBytes) {
    return "block size or payload size differs from this cache's";
  }
  if (parent != expect.parent ||
      std::memcmp(p, expect.tokens.data(), expect.tokens.size() * sizeof(int32_t)) != 0) {
    return "holds other tokens than the prefix (a hash collision)";
  }
  payload = std::span<const std::byte>(p + expect.tokens.size() * sizeof(int32_t), payloadBytes);
  return {};
}

}  // namespace cortex::kvtier
