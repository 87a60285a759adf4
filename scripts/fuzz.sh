#!/usr/bin/env bash
# Builds the GGUF fuzzer (libFuzzer + ASan + UBSan, clang-14) in build-fuzz/ and runs it for a
# bounded time from the seed corpus in fuzz/corpus/ (regenerate it with fuzz/make_corpus.py).
#   scripts/fuzz.sh [SECONDS]        default 60
# New interesting inputs go to build-fuzz/corpus/ (not committed); a crash leaves
# build-fuzz/crash-* and a non-zero exit status.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${1:-60}"
build="$root/build-fuzz"
cxx="${CXX_FUZZ:-clang++-14}"

cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$cxx" \
  -DCS_BUILD_FUZZ=ON -DCS_BUILD_TESTS=OFF >/dev/null
# note: only the fuzz target (the GGUF reader sources) is built, not the whole project.
cmake --build "$build" --target gguf_fuzz -j "$(nproc)"

mkdir -p "$build/corpus"
cd "$build"
./fuzz/gguf_fuzz -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
  -dict="$root/fuzz/gguf.dict" -print_final_stats=1 "$build/corpus" "$root/fuzz/corpus"
