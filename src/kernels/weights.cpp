#include "kernels/weights.h"

#include <stdexcept>
#include <string>

#include "kernels/ggml_blocks.h"
#include "kernels/simd.h"

namespace cortex::kernels {

const char* toString(WeightType type) {
  switch (type) {
    case WeightType::F32: return "F32";
    case WeightType::F16: return "F16";
    case WeightType::BF16: return "BF16";
    case WeightType::Q8_0: return "Q8_0";
    case WeightType::Q4_0: return "Q4_0";
    case WeightType::Q4_1: return "Q4_1";
    case WeightType::Q5_0: return "Q5_0";
    case WeightType::Q5_1: return "Q5_1";
    case WeightType::Q2_K: return "Q2_K";
    case WeightType::Q3_K: return "Q3_K";
    case WeightType::Q4_K: return "Q4_K";
    case WeightType::Q5_K: return "Q5_K";
    case WeightType::Q6_K: return "Q6_K";
  }
  return "?";
}

bool isKQuant(WeightType type) {
  switch (type) {
    case WeightType::Q2_K:
    case WeightType::Q3_K:
    case WeightType::Q4_K:
    case WeightType::Q5_K:
    case WeightType::Q6_K: return true;
    default: return false;
  }
}

int64_t blockElems(WeightType type) {
  switch (type) {
    case WeightType::F32:
    case WeightType::F16:
    case WeightType::BF16: return 1;
    default: return isKQuant(type) ? 256 : 32;
  }
}

size_t blockBytes(WeightType type) {
  switch (type) {
    case WeightType::F32: return 4;
    case WeightType::F16:
    case WeightType::BF16: return 2;
    case WeightType::Q8_0: return detail::DecQ8_0::kBytes;
    case WeightType::Q4_0: return detail::DecQ4_0::kBytes;
    case WeightType::Q4_1: return detail::DecQ4_1::kBytes;
    case WeightType::Q5_0: return detail::DecQ5_0::kBytes;
    case WeightType::Q5_1: return detail::DecQ5_1::kBytes;
    case WeightType::Q2_K: return detail::DecQ2_K::kBytes;
    case WeightType::Q3_K: return detail::DecQ3_K::kBytes;
    case WeightType::Q4_K: return detail::DecQ4_K::kBytes;
    case WeightType::Q5_K: return detail::DecQ5_K::kBytes;
    case WeightType::Q6_K: return detail::DecQ6_K::kBytes;
  }
  return 0;
}

size_t rowBytes(WeightType type, int64_t cols) {
  return static_cast<size_t>(cols / blockElems(type)) * blockBytes(type);
}

void validate(const WeightMatrix& w) {
  const auto fail = [&](const std::string& what) {
    throw std::invalid_argument(std::string("weight matrix (") + toString(w.type) + ", " +
                                std::to_string(w.rows) + " x " + std::to_string(w.cols) +
                                "): " + what);
  };
  if (w.data == nullptr) fail("no data");
  if (w.rows <= 0 || w.cols <= 0) fail("rows and cols must be positive");
  const int64_t multiple = blockElems(w.type) == 1 ? 8 : blockElems(w.type);
  if (w.cols % multiple != 0) fail("cols must be a multiple of " + std::to_string(multiple));
}

namespace {
template <class Dec>
void dequantizeRowT(const WeightMatrix& w, int64_t row, float* out) {
  const std::byte* p = w.rowPtr(row);
  for (int64_t c = 0; c < w.cols; c += Dec::kElems, p += Dec::kBytes) Dec::scalar(p, out + c);
}
}  // namespace

void dequantizeRow(const WeightMatrix& w, int64_t row, float* out) {
  switch (w.type) {
    case WeightType::F32: return dequantizeRowT<detail::DecF32>(w, row, out);
    case WeightType::F16: return dequantizeRowT<detail::DecF16>(w, row, out);
    case WeightType::BF16: return dequantizeRowT<detail::DecBF16>(w, row, out);
    case WeightType::Q8_0: return dequantizeRowT<detail::DecQ8_0>(w, row, out);
    case WeightType::Q4_0: return dequantizeRowT<detail::DecQ4_0>(w, row, out);
    case WeightType::Q4_1: return dequantizeRowT<detail::DecQ4_1>(w, row, out);
    case WeightType::Q5_0: return dequantizeRowT<detail::DecQ5_0>(w, row, out);
    case WeightType::Q5_1: return dequantizeRowT<detail::DecQ5_1>(w, row, out);
    case WeightType::Q2_K: return dequantizeRowT<detail::DecQ2_K>(w, row, out);
    case WeightType::Q3_K: return dequantizeRowT<detail::DecQ3_K>(w, row, out);
    case WeightType::Q4_K: return dequantizeRowT<detail::DecQ4_K>(w, row, out);
    case WeightType::Q5_K: return dequantizeRowT<detail::DecQ5_K>(w, row, out);
    case WeightType::Q6_K: return dequantizeRowT<detail::DecQ6_K>(w, row, out);
  }
}

}  // namespace cortex::kernels
