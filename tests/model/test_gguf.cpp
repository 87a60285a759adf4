// GGUF reader and ggml type table: exact round trips through a hand-written file, then every way a
// file can be truncated or corrupted must give a ModelError that names the problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "model/errors.h"
#include "model/ggml_types.h"
#include "model/gguf.h"
#include "gguf_writer.h"

namespace cortex::model {
namespace {

using testing::ByteWriter;
using testing::GGUFBuilder;

// GGUF value type ids.
constexpr uint32_t kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
                   kStr = 8, kArr = 9, kU64 = 10, kI64 = 11, kF64 = 12;

std::vector<uint8_t> bytesOf(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

// Expects `fn` to throw ModelError whose message contains every one of `parts`.
template <typename Fn>
void expectModelError(Fn&& fn, std::initializer_list<std::string_view> parts) {
  try {
    fn();
    ADD_FAILURE() << "expected ModelError";
  } catch (const ModelError& e) {
    const std::string msg = e.what();
    for (std::string_view p : parts) {
      EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
    }
  }
}

GGUFFile parse(const std::vector<uint8_t>& b) { return GGUFFile::fromMemory(b, "test.gguf"); }

// A file with one metadata entry of every type (and nested arrays) plus four tensors.
GGUFBuilder fullBuilder(uint32_t version) {
  GGUFBuilder g(version, 64);
  g.kvString("general.architecture", "llama");
  g.kvScalar<uint8_t>("t.u8", kU8, 200);
  g.kvScalar<int8_t>("t.i8", kI8, -100);
  g.kvScalar<uint16_t>("t.u16", kU16, 60000);
  g.kvScalar<int16_t>("t.i16", kI16, -30000);
  g.kvScalar<uint32_t>("t.u32", kU32, 4000000000u);
  g.kvScalar<int32_t>("t.i32", kI32, -2000000000);
  g.kvScalar<float>("t.f32", kF32, 0.1f);
  g.kvScalar<uint8_t>("t.bool", kBool, 1);
  g.kvString("t.str", std::string("h\xc3\xa9llo\0x", 8));
  g.kvScalar<uint64_t>("t.u64", kU64, 18000000000000000000ull);
  g.kvScalar<int64_t>("t.i64", kI64, -9000000000000000000ll);
  g.kvScalar<double>("t.f64", kF64, 1e-300);
  {  // array of strings
    ByteWriter w;
    w.u32(kStr);
    w.u64(3);
    w.str("a");
    w.str("");
    w.str("ccc");
    g.kvRaw("t.arr.str", kArr, w.bytes);
  }
  {  // array of int32
    ByteWriter w;
    w.u32(kI32);
    w.u64(4);
    for (int32_t x : {1, -2, 3, 2147483647}) w.put(x);
    g.kvRaw("t.arr.i32", kArr, w.bytes);
  }
  {  // array of float32
    ByteWriter w;
    w.u32(kF32);
    w.u64(2);
    w.put(1.5f);
    w.put(-0.25f);
    g.kvRaw("t.arr.f32", kArr, w.bytes);
  }
  {  // array of every other fixed type, one element each via nested arrays: [[u8],[i64 x2],[]]
    ByteWriter w;
    w.u32(kArr);
    w.u64(3);
    w.u32(kU8);
    w.u64(1);
    w.u8(7);
    w.u32(kI64);
    w.u64(2);
    w.put<int64_t>(-1);
    w.put<int64_t>(5);
    w.u32(kBool);
    w.u64(0);
    g.kvRaw("t.arr.nested", kArr, w.bytes);
  }
  {  // empty array of float64
    ByteWriter w;
    w.u32(kF64);
    w.u64(0);
    g.kvRaw("t.arr.empty", kArr, w.bytes);
  }
  g.kvScalar<uint32_t>("general.alignment", kU32, 64);
  g.tensor("f32.vec", 0, {5}, bytesOf(20, 1));
  g.tensor("q8.mat", 8, {64, 3}, bytesOf(34 * 2 * 3, 2));
  g.tensor("q4_1.mat", 3, {32, 2, 2}, bytesOf(20 * 4, 3));
  g.tensor("f16.scalar", 1, {}, bytesOf(2, 4));
  return g;
}

class GGUFVersions : public ::testing::TestWithParam<uint32_t> {};

TEST_P(GGUFVersions, ReadsEveryMetadataTypeExactly) {
  const GGUFBuilder g = [] {
    GGUFBuilder b = fullBuilder(GetParam());
    return b;
  }();
  const GGUFFile f = parse(g.build());
  EXPECT_EQ(f.version(), GetParam());
  EXPECT_EQ(f.alignment(), 64u);
  EXPECT_EQ(f.metadata().size(), 19u);
  EXPECT_EQ(f.metadata()[0].key, "general.architecture");

  EXPECT_EQ(f.getString("general.architecture"), "llama");
  EXPECT_EQ(f.find("t.u8")->type(), GGUFValueType::UINT8);
  EXPECT_EQ(f.getU32("t.u8"), 200u);
  EXPECT_EQ(f.getI64("t.i8"), -100);
  EXPECT_EQ(f.getU32("t.u16"), 60000u);
  EXPECT_EQ(f.getI64("t.i16"), -30000);
  EXPECT_EQ(f.getU32("t.u32"), 4000000000u);
  EXPECT_EQ(f.getI64("t.i32"), -2000000000);
  EXPECT_EQ(f.getF32("t.f32"), 0.1f);
  EXPECT_EQ(*f.find("t.f32")->toF64(), static_cast<double>(0.1f));
  EXPECT_TRUE(f.getBool("t.bool"));
  EXPECT_EQ(f.getString("t.str"), std::string("h\xc3\xa9llo\0x", 8));
  EXPECT_EQ(f.getU64("t.u64"), 18000000000000000000ull);
  EXPECT_EQ(f.getI64("t.i64"), -9000000000000000000ll);
  EXPECT_EQ(*f.find("t.f64")->toF64(), 1e-300);
  EXPECT_EQ(f.getStringArray("t.arr.str"), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_EQ(f.getI32Array("t.arr.i32"), (std::vector<int32_t>{1, -2, 3, 2147483647}));
  EXPECT_EQ(f.getF32Array("t.arr.f32"), (std::vector<float>{1.5f, -0.25f}));
  EXPECT_EQ(f.getF32Array("t.arr.i32")[1], -2.0f);
  EXPECT_TRUE(f.getF32Array("t.arr.empty").empty());

  const GGUFValue* nested = f.find("t.arr.nested");
  ASSERT_NE(nested, nullptr);
  ASSERT_TRUE(nested->isArray());
  EXPECT_EQ(nested->arrayType(), GGUFValueType::ARRAY);
  ASSERT_EQ(nested->arraySize(), 3u);
  EXPECT_EQ(nested->at(0).arrayType(), GGUFValueType::UINT8);
  EXPECT_EQ(*nested->at(0).at(0).toU64(), 7u);
  EXPECT_EQ(*nested->at(1).at(0).toI64(), -1);
  EXPECT_EQ(*nested->at(1).at(1).toI64(), 5);
  EXPECT_EQ(nested->at(2).arrayType(), GGUFValueType::BOOL);
  EXPECT_EQ(nested->at(2).arraySize(), 0u);
  EXPECT_THROW(nested->at(3), ModelError);
  EXPECT_EQ(f.find("missing"), nullptr);
  EXPECT_FALSE(f.has("missing"));
}

TEST_P(GGUFVersions, ReadsTensorTableAndDataInPlace) {
  const std::vector<uint8_t> bytes = fullBuilder(GetParam()).build();
  const GGUFFile f = parse(bytes);
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.dataOffset() % 64, 0u);

  const GGUFTensorInfo& v = f.tensor("f32.vec");
  EXPECT_EQ(v.type, GGMLType::F32);
  EXPECT_EQ(v.dims, (std::vector<uint64_t>{5}));
  EXPECT_EQ(v.nElements, 5u);
  EXPECT_EQ(v.nBytes, 20u);
  EXPECT_EQ(v.offset, 0u);
  EXPECT_EQ(v.fileOffset, f.dataOffset());
  EXPECT_EQ(std::vector<uint8_t>(v.bytes().begin(), v.bytes().end()), bytesOf(20, 1));

  const GGUFTensorInfo& q8 = f.tensor("q8.mat");
  EXPECT_EQ(q8.type, GGMLType::Q8_0);
  EXPECT_EQ(q8.dims, (std::vector<uint64_t>{64, 3}));
  EXPECT_EQ(q8.rowLength(), 64u);
  EXPECT_EQ(q8.nRows(), 3u);
  EXPECT_EQ(q8.nBytes, 34u * 2 * 3);
  EXPECT_EQ(q8.offset, 64u);
  EXPECT_EQ(std::vector<uint8_t>(q8.data, q8.data + q8.nBytes), bytesOf(204, 2));

  const GGUFTensorInfo& q41 = f.tensor("q4_1.mat");
  EXPECT_EQ(q41.type, GGMLType::Q4_1);
  EXPECT_EQ(q41.nElements, 128u);
  EXPECT_EQ(q41.nRows(), 4u);
  EXPECT_EQ(q41.nBytes, 80u);
  EXPECT_EQ(q41.offset, 64u + 256u);

  const GGUFTensorInfo& s = f.tensor("f16.scalar");
  EXPECT_TRUE(s.dims.empty());
  EXPECT_EQ(s.nElements, 1u);
  EXPECT_EQ(s.nBytes, 2u);
  EXPECT_EQ(s.fileOffset + s.nBytes, bytes.size());  // the last tensor ends the file

  EXPECT_EQ(f.findTensor("nope"), nullptr);
  expectModelError([&] { (void)f.tensor("blk.0.attn_q.weight"); },
                   {"test.gguf", "tensor 'blk.0.attn_q.weight' not found"});
}

INSTANTIATE_TEST_SUITE_P(V2AndV3, GGUFVersions, ::testing::Values(2u, 3u));

TEST(GGUF, DefaultAlignmentIs32AndTensorlessFileNeedsNoDataSection) {
  GGUFBuilder g;
  g.kvString("general.name", "x");
  const GGUFFile f = parse(g.build());
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_TRUE(f.tensors().empty());
}

TEST(GGUF, GettersConvertIntegerWidthsAndRejectWhatDoesNotFit) {
  GGUFBuilder g;
  g.kvScalar<uint64_t>("u64.small", kU64, 42);
  g.kvScalar<uint64_t>("u64.big", kU64, 1ull << 40);
  g.kvScalar<int32_t>("i32.neg", kI32, -1);
  g.kvScalar<int32_t>("i32.pos", kI32, 100000);
  g.kvScalar<double>("f64", kF64, 2.5);
  g.kvString("s", "text");
  g.kvScalar<double>("f64.huge", kF64, 1e300);
  g.kvScalar<double>("f64.inf", kF64, std::numeric_limits<double>::infinity());
  {
    ByteWriter w;
    w.u32(kF64);
    w.u64(2);
    w.put(1.0);
    w.put(-1e39);
    g.kvRaw("arr.f64.huge", kArr, w.bytes);
  }
  {
    ByteWriter w;
    w.u32(kI64);
    w.u64(2);
    w.put<int64_t>(1);
    w.put<int64_t>(1ll << 40);
    g.kvRaw("arr.i64.big", kArr, w.bytes);
  }
  const GGUFFile f = parse(g.build());
  EXPECT_EQ(f.getU32("u64.small"), 42u);
  EXPECT_EQ(f.getI64("u64.big"), 1ll << 40);
  EXPECT_EQ(f.getU32("i32.pos"), 100000u);
  EXPECT_EQ(f.getF32("i32.neg"), -1.0f);
  EXPECT_EQ(f.getF32("f64"), 2.5f);
  expectModelError([&] { (void)f.getU32("u64.big"); },
                   {"test.gguf", "'u64.big'", "uint64 1099511627776", "fits in 32 bits"});
  expectModelError([&] { (void)f.getU32("i32.neg"); }, {"'i32.neg'", "int32 -1", "unsigned"});
  expectModelError([&] { (void)f.getU64("i32.neg"); }, {"'i32.neg'", "non-negative"});
  expectModelError([&] { (void)f.getString("i32.pos"); }, {"'i32.pos'", "expected a string"});
  expectModelError([&] { (void)f.getI64("s"); }, {"'s' is string", "integer"});
  expectModelError([&] { (void)f.getBool("s"); }, {"expected a bool"});
  expectModelError([&] { (void)f.getStringArray("s"); }, {"array of strings"});
  expectModelError([&] { (void)f.getF32("missing.key"); },
                   {"test.gguf", "metadata key 'missing.key' not found"});
  expectModelError([&] { (void)f.getI32Array("arr.i64.big"); }, {"element 1", "int32"});
  EXPECT_EQ(f.getF32Array("arr.i64.big")[1], 1099511627776.0f);
  expectModelError([&] { (void)f.getI32Array("s"); }, {"array of integers"});
  expectModelError([&] { (void)f.getF32("f64.huge"); }, {"'f64.huge'", "float32 range"});
  expectModelError([&] { (void)f.getF32Array("arr.f64.huge"); }, {"element 1", "float32 range"});
  EXPECT_TRUE(std::isinf(f.getF32("f64.inf")));
}

// Every proper prefix of a valid file (whose last tensor ends at the last byte) is invalid.
TEST(GGUF, TruncationAtEveryByteThrowsModelError) {
  for (uint32_t version : {2u, 3u}) {
    const std::vector<uint8_t> full = fullBuilder(version).build();
    ASSERT_NO_THROW(parse(full));
    for (size_t n = 0; n < full.size(); ++n) {
      const std::vector<uint8_t> prefix(full.begin(), full.begin() + static_cast<ptrdiff_t>(n));
      EXPECT_THROW(parse(prefix), ModelError) << "prefix of " << n << " bytes parsed";
    }
  }
}

TEST(GGUF, TruncationMessagesSayWhereAndWhat) {
  const std::vector<uint8_t> full = fullBuilder(3).build();
  expectModelError([&] { parse({}); }, {"test.gguf", "empty (0 bytes)"});
  expectModelError([&] { parse({full.begin(), full.begin() + 6}); },
                   {"test.gguf", "truncated at byte 4", "version"});
  expectModelError([&] { parse({full.begin(), full.begin() + 54}); },
                   {"tensor count 4 and metadata count 19 need at least", "truncated"});
  const std::string name = "f16.scalar";
  const auto at = std::search(full.begin(), full.end(), name.begin(), name.end());
  expectModelError([&] { parse({full.begin(), at + 3}); },
                   {"tensor info 3 of 4", "the tensor name claims 10 bytes but only 3 remain"});
  expectModelError([&] { parse({full.begin(), full.end() - 1}); },
                   {"tensor 'f16.scalar'", "outside", "data section"});
}

// Header offsets of the fields of a builder-made v3 file.
constexpr size_t kTensorCountAt = 8, kKvCountAt = 16, kFirstKvAt = 24;

void poke64(std::vector<uint8_t>& b, size_t at, uint64_t v) { std::memcpy(&b[at], &v, 8); }
void poke32(std::vector<uint8_t>& b, size_t at, uint32_t v) { std::memcpy(&b[at], &v, 4); }

TEST(GGUF, CorruptHeaderFieldsAreNamed) {
  std::vector<uint8_t> b = fullBuilder(3).build();
  {
    auto c = b;
    c[0] = 'X';
    expectModelError([&] { parse(c); }, {"test.gguf", "magic", "GGUF"});
  }
  {
    auto c = b;
    poke32(c, 4, 1);
    expectModelError([&] { parse(c); }, {"version 1 is not supported"});
    poke32(c, 4, 4);
    expectModelError([&] { parse(c); }, {"unsupported GGUF version 4"});
    poke32(c, 4, 0x03000000);
    expectModelError([&] { parse(c); }, {"big-endian"});
  }
  {
    auto c = b;
    poke64(c, kTensorCountAt, 1ull << 62);
    expectModelError([&] { parse(c); }, {"tensor count 4611686018427387904", "need at least"});
  }
  {
    auto c = b;
    poke64(c, kKvCountAt, std::numeric_limits<uint64_t>::max());
    expectModelError([&] { parse(c); }, {"metadata count 18446744073709551615", "need at least"});
  }
  {
    auto c = b;
    poke64(c, kKvCountAt, 20);  // one more entry than present: reads into the tensor infos
    EXPECT_THROW(parse(c), ModelError);
  }
}

TEST(GGUF, CorruptMetadataIsNamed) {
  {  // string length beyond the file
    std::vector<uint8_t> b = fullBuilder(3).build();
    poke64(b, kFirstKvAt, 1ull << 50);
    expectModelError([&] { parse(b); },
                     {"metadata entry 0", "the key claims 1125899906842624 bytes", "remain"});
  }
  {  // unknown value type
    GGUFBuilder g;
    g.kvScalar<uint32_t>("bad.type", 13, 0);
    expectModelError([&] { parse(g.build()); },
                     {"key 'bad.type'", "unknown value type 13"});
  }
  {  // unknown array element type
    GGUFBuilder g;
    ByteWriter w;
    w.u32(99);
    w.u64(0);
    g.kvRaw("bad.elem", kArr, w.bytes);
    expectModelError([&] { parse(g.build()); }, {"key 'bad.elem'", "unknown array element type 99"});
  }
  {  // array count larger than the file could hold
    GGUFBuilder g;
    ByteWriter w;
    w.u32(kU32);
    w.u64(1ull << 60);
    g.kvRaw("big.arr", kArr, w.bytes);
    expectModelError([&] { parse(g.build()); },
                     {"key 'big.arr'", "array of 1152921504606846976 uint32 elements"});
  }
  {  // array count near 2^64 (element size multiplication must not wrap)
    GGUFBuilder g;
    ByteWriter w;
    w.u32(kU64);
    w.u64(std::numeric_limits<uint64_t>::max() / 8 + 2);
    g.kvRaw("wrap.arr", kArr, w.bytes);
    expectModelError([&] { parse(g.build()); }, {"key 'wrap.arr'", "2^64"});
  }
  {  // string inside an array longer than the rest of the file
    GGUFBuilder g;
    ByteWriter w;
    w.u32(kStr);
    w.u64(1);
    w.u64(1000);
    w.bytes.resize(w.size() + 10);
    g.kvRaw("tok", kArr, w.bytes);
    expectModelError([&] { parse(g.build()); }, {"key 'tok'", "claims 1000 bytes"});
  }
  {  // arrays nested absurdly deep
    GGUFBuilder g;
    ByteWriter w;
    for (int i = 0; i < 100; ++i) {
      w.u32(kArr);
      w.u64(1);
    }
    w.u32(kU8);
    w.u64(0);
    g.kvRaw("deep", kArr, w.bytes);
    expectModelError([&] { parse(g.build()); }, {"key 'deep'", "nested more than 8"});
  }
  {  // duplicate key
    GGUFBuilder g;
    g.kvString("dup", "a");
    g.kvString("dup", "b");
    expectModelError([&] { parse(g.build()); }, {"metadata entry 1", "key 'dup'", "twice"});
  }
  {  // bad alignments
    for (uint32_t a : {0u, 3u, 48u}) {
      GGUFBuilder g;
      g.kvScalar<uint32_t>("general.alignment", kU32, a);
      expectModelError([&] { parse(g.build()); }, {"general.alignment", "power of two"});
    }
    GGUFBuilder g;
    g.kvString("general.alignment", "32");
    expectModelError([&] { parse(g.build()); }, {"general.alignment", "string"});
  }
  {  // non-printable key bytes are escaped in messages
    GGUFBuilder g;
    g.kvScalar<uint32_t>(std::string("k\x01\xff", 3), 77, 0);
    expectModelError([&] { parse(g.build()); }, {"key 'k\\x01\\xff'"});
  }
}

TEST(GGUF, CorruptTensorInfosAreNamed) {
  auto one = [](uint32_t type, std::vector<uint64_t> dims, size_t dataBytes) {
    GGUFBuilder g;
    g.tensor("blk.0.w", type, std::move(dims), std::vector<uint8_t>(dataBytes, 1));
    return g;
  };
  expectModelError([&] { parse(one(0, {1, 1, 1, 1, 1}, 4).build()); },
                   {"tensor 'blk.0.w'", "5 dimensions"});
  expectModelError([&] { parse(one(0, {1ull << 32, 1ull << 32}, 4).build()); },
                   {"tensor 'blk.0.w'", "dimensions overflow"});
  expectModelError([&] { parse(one(0, {1ull << 63}, 4).build()); },
                   {"tensor 'blk.0.w'", "dimensions overflow"});
  // 2^62 F32 elements: the element count fits, the byte size does not.
  expectModelError([&] { parse(one(0, {1ull << 62}, 4).build()); },
                   {"tensor 'blk.0.w'", "2^64"});
  expectModelError([&] { parse(one(0, {1ull << 20, 1ull << 42}, 4).build()); },
                   {"tensor 'blk.0.w'", "overflows 64 bits"});
  expectModelError([&] { parse(one(99, {4}, 4).build()); },
                   {"tensor 'blk.0.w'", "type id 99", "unknown type 99"});
  expectModelError([&] { parse(one(4, {32}, 20).build()); },
                   {"tensor 'blk.0.w'", "type id 4", "Q4_2"});
  expectModelError([&] { parse(one(2, {33, 2}, 36).build()); },
                   {"tensor 'blk.0.w'", "row length 33", "Q4_0 block size 32"});
  // The data of a 16-element F32 tensor needs 64 bytes; give it 63.
  {
    GGUFBuilder g = one(0, {16}, 63);
    expectModelError([&] { parse(g.build()); },
                     {"tensor 'blk.0.w'", "outside the 63-byte data section"});
  }
  {
    GGUFBuilder g = one(0, {4}, 16);
    g.overrideLastOffset(std::numeric_limits<uint64_t>::max() - 31);
    expectModelError([&] { parse(g.build()); }, {"tensor 'blk.0.w'", "outside"});
  }
  {
    GGUFBuilder g = one(0, {4}, 16);
    g.overrideLastOffset(8);
    expectModelError([&] { parse(g.build()); },
                     {"tensor 'blk.0.w'", "offset 8 is not a multiple of the alignment 32"});
  }
  {
    GGUFBuilder g;
    g.tensor("same", 0, {4}, std::vector<uint8_t>(16));
    g.tensor("same", 0, {4}, std::vector<uint8_t>(16));
    expectModelError([&] { parse(g.build()); }, {"tensor info 1 of 2", "'same'", "twice"});
  }
  {  // overlapping tensors are allowed
    GGUFBuilder g;
    g.tensor("a", 0, {8}, std::vector<uint8_t>(32));
    g.tensor("b", 0, {4}, std::vector<uint8_t>(16));
    g.overrideLastOffset(0);
    const GGUFFile f = parse(g.build());
    EXPECT_EQ(f.tensor("a").data, f.tensor("b").data);
  }
  {  // zero-length dimension: no bytes, no rows
    GGUFBuilder g = one(2, {0, 5}, 0);
    g.tensor("tail", 0, {1}, std::vector<uint8_t>(4));
    const GGUFFile f = parse(g.build());
    EXPECT_EQ(f.tensor("blk.0.w").nBytes, 0u);
    EXPECT_EQ(f.tensor("blk.0.w").nRows(), 0u);
  }
}

TEST(GGUF, UnsupportedTensorTypeParsesAndIsReportedByName) {
  GGUFBuilder g;
  g.tensor("blk.0.ffn_up.weight", 17 /* IQ2_XS */, {256, 2}, std::vector<uint8_t>(74 * 2));
  const GGUFFile f = parse(g.build());
  const GGUFTensorInfo& t = f.tensor("blk.0.ffn_up.weight");
  EXPECT_EQ(t.type, GGMLType::IQ2_XS);
  EXPECT_EQ(t.nBytes, 148u);
  try {
    requireSupported(t.type, t.name);
    ADD_FAILURE() << "expected ModelError";
  } catch (const ModelError& e) {
    EXPECT_STREQ(e.what(),
                 "tensor 'blk.0.ffn_up.weight' has type IQ2_XS, which CortexStream does not "
                 "support yet (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, "
                 "Q3_K, Q4_K, Q5_K, Q6_K)");
  }
}

TEST(GGMLTypes, LayoutsNamesAndSupport) {
  EXPECT_EQ(ggmlTypeName(GGMLType::Q4_1), "Q4_1");
  EXPECT_EQ(ggmlTypeName(GGMLType::BF16), "BF16");
  EXPECT_EQ(ggmlTypeName(GGMLType::IQ4_XS), "IQ4_XS");
  EXPECT_EQ(ggmlTypeName(static_cast<GGMLType>(1000)), "unknown type 1000");
  EXPECT_FALSE(isKnownType(static_cast<GGMLType>(42)));
  EXPECT_TRUE(isKnownType(GGMLType::Q4_2));
  EXPECT_FALSE(hasKnownLayout(GGMLType::Q4_2));

  struct Row {
    GGMLType t;
    uint64_t block, bytes;
  };
  for (const Row& r : {Row{GGMLType::F32, 1, 4}, Row{GGMLType::F16, 1, 2}, Row{GGMLType::BF16, 1, 2},
                       Row{GGMLType::Q8_0, 32, 34}, Row{GGMLType::Q4_0, 32, 18},
                       Row{GGMLType::Q4_1, 32, 20}, Row{GGMLType::Q5_0, 32, 22},
                       Row{GGMLType::Q5_1, 32, 24}, Row{GGMLType::Q2_K, 256, 84},
                       Row{GGMLType::Q3_K, 256, 110}, Row{GGMLType::Q4_K, 256, 144},
                       Row{GGMLType::Q5_K, 256, 176}, Row{GGMLType::Q6_K, 256, 210}}) {
    EXPECT_TRUE(isSupported(r.t)) << ggmlTypeName(r.t);
    EXPECT_EQ(blockElements(r.t), r.block);
    EXPECT_EQ(blockBytes(r.t), r.bytes);
    EXPECT_NO_THROW(requireSupported(r.t, "x"));
  }
  EXPECT_EQ(rowBytes(GGMLType::F32, 576), 2304u);
  EXPECT_EQ(rowBytes(GGMLType::Q4_1, 576), 18u * 20u);
  EXPECT_EQ(rowBytes(GGMLType::Q8_0, 1536), 48u * 34u);
  EXPECT_EQ(rowBytes(GGMLType::Q4_K, 512), 288u);
  EXPECT_EQ(rowBytes(GGMLType::Q4_0, 0), 0u);
  EXPECT_FALSE(isSupported(GGMLType::IQ2_XS));
  EXPECT_FALSE(isSupported(GGMLType::Q8_K));
  EXPECT_FALSE(isSupported(static_cast<GGMLType>(77)));
  expectModelError([] { (void)rowBytes(GGMLType::Q4_0, 33); },
                   {"33 elements", "Q4_0", "blocks of 32"});
  expectModelError([] { (void)rowBytes(GGMLType::F32, 1ull << 63); }, {"2^64"});
  expectModelError([] { (void)blockBytes(GGMLType::Q4_3); }, {"Q4_3", "no known block layout"});
  expectModelError([] { requireSupported(static_cast<GGMLType>(77), "w"); },
                   {"tensor 'w' has type unknown type 77"});
}

// ---- files on disk --------------------------------------------------------------------------

std::filesystem::path writeTemp(const std::string& name, const std::vector<uint8_t>& bytes) {
  const auto path = std::filesystem::temp_directory_path() / name;
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return path;
}

TEST(GGUFFileOnDisk, MapsReadsAndSurvivesMoves) {
  const std::vector<uint8_t> bytes = fullBuilder(3).build();
  const auto path = writeTemp("cs_test_gguf_ok.gguf", bytes);
  GGUFFile f = GGUFFile::open(path.string());
  EXPECT_EQ(f.path(), path.string());
  EXPECT_EQ(f.fileSizeBytes(), bytes.size());
  const uint8_t* data = f.tensor("q8.mat").data;
  GGUFFile moved = std::move(f);
  EXPECT_EQ(moved.tensor("q8.mat").data, data);  // the mapping did not move
  EXPECT_EQ(std::vector<uint8_t>(data, data + 204), bytesOf(204, 2));
  EXPECT_EQ(moved.getStringArray("t.arr.str")[2], "ccc");
  std::filesystem::remove(path);
}

TEST(GGUFFileOnDisk, OpenErrorsNameThePath) {
  expectModelError([] { (void)GGUFFile::open("/nonexistent/dir/model.gguf"); },
                   {"/nonexistent/dir/model.gguf", "cannot open", "No such file"});
  expectModelError([] { (void)GGUFFile::open(std::filesystem::temp_directory_path().string()); },
                   {"not a regular file"});
  const auto empty = writeTemp("cs_test_gguf_empty.gguf", {});
  expectModelError([&] { (void)GGUFFile::open(empty.string()); },
                   {empty.string(), "empty (0 bytes)"});
  std::filesystem::remove(empty);
}

// The default model, when present (scripts/fetch_model.sh): facts of the SmolLM2-135M-Instruct
// Q4_1 file (GGUF v3, Llama, 30 layers, hidden 576, 3 KV heads, RoPE theta 100000, vocabulary
// 49152, Q8_0 embedding table) and every tensor type supported.
TEST(GGUFFileOnDisk, DefaultModel) {
  const std::string path = std::string(CS_SOURCE_DIR) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " missing; run scripts/fetch_model.sh";
  const GGUFFile f = GGUFFile::open(path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.getString("general.architecture"), "llama");
  EXPECT_EQ(f.getU32("llama.block_count"), 30u);
  EXPECT_EQ(f.getU32("llama.embedding_length"), 576u);
  EXPECT_EQ(f.getU32("llama.attention.head_count_kv"), 3u);
  EXPECT_EQ(f.getF32("llama.rope.freq_base"), 100000.0f);
  EXPECT_EQ(f.getStringArray("tokenizer.ggml.tokens").size(), 49152u);
  EXPECT_EQ(f.getI32Array("tokenizer.ggml.token_type").size(), 49152u);
  EXPECT_EQ(f.tensors().size(), 272u);
  const GGUFTensorInfo& emb = f.tensor("token_embd.weight");
  EXPECT_EQ(emb.dims, (std::vector<uint64_t>{576, 49152}));
  EXPECT_EQ(emb.type, GGMLType::Q8_0);
  for (const GGUFTensorInfo& t : f.tensors()) EXPECT_NO_THROW(requireSupported(t.type, t.name));
}

}  // namespace
}  // namespace cortex::model
