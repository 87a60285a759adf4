#include "server/byte_size.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace cortex::server {

namespace {

[[noreturn]] void fail(std::string_view text, const char* why) {
  throw std::invalid_argument("invalid size '" + std::string(text) + "': " + why +
                              " (examples: 512MiB, 1GiB, 300MB, 1000000)");
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

}  // namespace

uint64_t parseByteSize(std::string_view text) {
  size_t i = 0;
  while (i < text.size() && text[i] == ' ') ++i;
  // Integer and fractional digits, kept exactly (no floating point): value = whole + frac/10^k.
  uint64_t whole = 0;
  uint64_t frac = 0;
  uint64_t fracScale = 1;
  size_t digits = 0;
  constexpr uint64_t kMax = std::numeric_limits<uint64_t>::max();
  for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i, ++digits) {
    const auto d = static_cast<uint64_t>(text[i] - '0');
    if (whole > (kMax - d) / 10) fail(text, "too large");
    whole = whole * 10 + d;
  }
  if (i < text.size() && text[i] == '.') {
    ++i;
    for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i, ++digits) {
      if (fracScale > kMax / 1000 / 10) fail(text, "too many decimals");
      frac = frac * 10 + static_cast<uint64_t>(text[i] - '0');
      fracScale *= 10;
    }
  }
  if (digits == 0) fail(text, "expected a number");
  while (i < text.size() && text[i] == ' ') ++i;
  std::string unit = lower(text.substr(i));
  while (!unit.empty() && unit.back() == ' ') unit.pop_back();

  uint64_t multiplier = 0;
  if (unit.empty() || unit == "b") multiplier = 1;
  const char* const prefixes = "kmgt";
  for (int p = 0; p < 4 && multiplier == 0; ++p) {
    const char c = prefixes[p];
    uint64_t dec = 1, bin = 1;
    for (int k = 0; k <= p; ++k) {
      dec *= 1000;
      bin *= 1024;
    }
    if (unit == std::string{c} || unit == std::string{c, 'i', 'b'} ||
        unit == std::string{c, 'i'}) {
      multiplier = bin;
    } else if (unit == std::string{c, 'b'}) {
      multiplier = dec;
    }
  }
  if (multiplier == 0) fail(text, "unknown unit");

  if (whole > kMax / multiplier) fail(text, "too large");
  const uint64_t wholeBytes = whole * multiplier;
  if (frac != 0) {
    // frac / fracScale * multiplier exactly, without overflow: with g = gcd(multiplier,
    // fracScale), the result is whole iff (fracScale / g) divides frac, and it is < multiplier.
    const uint64_t g = std::gcd(multiplier, fracScale);
    const uint64_t scale = fracScale / g;
    if (frac % scale != 0) fail(text, "not a whole number of bytes");
    const uint64_t fracBytes = frac / scale * (multiplier / g);
    if (wholeBytes > kMax - fracBytes) fail(text, "too large");
    return wholeBytes + fracBytes;
  }
  return wholeBytes;
}

}  // namespace cortex::server
