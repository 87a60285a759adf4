#!/usr/bin/env bash
# Configures and builds one flavour of CortexStream.
#   scripts/build.sh            -> build/        (Release, -O3 -march=native)
#   scripts/build.sh asan       -> build-asan/   (ASan + UBSan)
#   scripts/build.sh tsan       -> build-tsan/   (TSan)
#   scripts/build.sh portable   -> build-portable/ (Release without -march=native: runs on any
#                                  x86-64 CPU, the kernels still pick their level at run time)
# Further arguments name targets to build (default: all).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavour="${1:-release}"
shift || true
jobs="$(nproc)"
case "$flavour" in
  release) dir=build; args=(-DCMAKE_BUILD_TYPE=Release) ;;
  asan) dir=build-asan; args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCS_SANITIZE=address,undefined") ;;
  tsan) dir=build-tsan; args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCS_SANITIZE=thread) ;;
  portable) dir=build-portable; args=(-DCMAKE_BUILD_TYPE=Release -DCS_NATIVE=OFF) ;;
  *) echo "unknown flavour: $flavour (release, asan, tsan, portable)" >&2; exit 2 ;;
esac
cmake -S "$root" -B "$root/$dir" "${args[@]}" >/dev/null
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$root/$dir" -j "$jobs" "${targets[@]}"
