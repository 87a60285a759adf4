// Memory sizes written by people on the command line: "512MiB", "1GiB", "300MB", "1000000".
#pragma once

#include <cstdint>
#include <string_view>

namespace cortex::server {

// Bytes for `text`: a non-negative number (digits, optionally one '.' and a fraction) followed by
// an optional unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024), also the
// one-letter K/M/G/T (powers of 1024, as `ls -h` and most CLIs mean them). Units are
// case-insensitive; spaces between number and unit are allowed. A fraction must come out to a
// whole number of bytes ("1.5KiB" = 1536, "1.5B" is an error). Throws std::invalid_argument with a
// message naming the text for anything else, including overflow of 64 bits.
uint64_t parseByteSize(std::string_view text);

}  // namespace cortex::server
