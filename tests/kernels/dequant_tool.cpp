// Test-only: dequantizes raw rows of a weight type with kernels::dequantizeRow, so that tests in
// other languages can compare the canonical floats with an independent implementation.
//   dequant_tool TYPE COLS IN OUT
// reads IN (whole rows of TYPE, COLS elements each, in the GGUF block layout) and writes the
// rows' floats to OUT as little-endian float32. Exits 2 with a message on bad arguments.
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "kernels/weights.h"

namespace {

std::optional<cortex::kernels::WeightType> parseType(const std::string& name) {
  using cortex::kernels::WeightType;
  for (int t = 0; t <= static_cast<int>(WeightType::Q6_K); ++t) {
    const auto type = static_cast<WeightType>(t);
    if (name == cortex::kernels::toString(type)) return type;
  }
  return std::nullopt;
}

int usage(const std::string& why) {
  std::cerr << "dequant_tool: " << why << "\nusage: dequant_tool TYPE COLS IN OUT\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) return usage("expected 4 arguments");
  const auto type = parseType(argv[1]);
  if (!type) return usage(std::string("unknown type ") + argv[1]);
  int64_t cols = 0;
  try {
    cols = std::stoll(argv[2]);
  } catch (const std::exception&) {
    return usage(std::string("COLS is not a number: ") + argv[2]);
  }
  std::ifstream in(argv[3], std::ios::binary);
  if (!in) return usage(std::string("cannot read ") + argv[3]);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (cols <= 0 || cols % cortex::kernels::blockElems(*type) != 0) {
    return usage("COLS must be a positive multiple of the block size");
  }
  const size_t rb = cortex::kernels::rowBytes(*type, cols);
  if (bytes.empty() || bytes.size() % rb != 0) {
    return usage("IN holds " + std::to_string(bytes.size()) + " bytes, not whole rows of " +
                 std::to_string(rb));
  }
  const cortex::kernels::WeightMatrix w{bytes.data(), *type, static_cast<int64_t>(bytes.size() / rb),
                                        cols};
  try {
    cortex::kernels::validate(w);
  } catch (const std::exception& e) {
    return usage(e.what());
  }
  std::vector<float> out(static_cast<size_t>(w.rows * cols));
  for (int64_t r = 0; r < w.rows; ++r) cortex::kernels::dequantizeRow(w, r, out.data() + r * cols);
  std::ofstream os(argv[4], std::ios::binary);
  os.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size() * sizeof(float)));
  if (!os) return usage(std::string("cannot write ") + argv[4]);
  return 0;
}
