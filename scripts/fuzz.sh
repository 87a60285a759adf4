#!/usr/bin/env bash
# Builds the fuzzers (libFuzzer + ASan + UBSan, clang-14) in build-fuzz/ and runs them for a
# bounded time: the GGUF reader from the seed corpus in fuzz/corpus/ (regenerate it with
# fuzz/make_corpus.py) for SECONDS, then the KV session reader (which makes its own seed) for half
# as long.
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
# note: only the fuzz targets (the GGUF reader's and the KV cache's sources) are built, not the
# whole project.
cmake --build "$build" --target gguf_fuzz kv_session_fuzz -j "$(nproc)"

mkdir -p "$build/corpus"
cd "$build"
./fuzz/gguf_fuzz -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
  -dict="$root/fuzz/gguf.dict" -print_final_stats=1 "$build/corpus" "$root/fuzz/corpus"
mkdir -p "$build/corpus-kv-session"
./fuzz/kv_session_fuzz -max_total_time="$(( (seconds + 1) / 2 ))" -timeout=10 -rss_limit_mb=2048 \
  -max_len=4096 -print_final_stats=1 "$build/corpus-kv-session"
