#!/usr/bin/env bash
# Configures and builds one flavour of CortexStream.
#   scripts/build.sh            -> build/        (Release, -O3 -march=native)
#   scripts/build.sh asan       -> build-asan/   (ASan + UBSan)
#   scripts/build.sh tsan       -> build-tsan/   (TSan)
#   scripts/build.sh portable   -> build-portable/ (Release without -march=native: runs on any
#                                  x86-64 CPU, the kernels still pick their level at run time)
# CS_WITH_MLX=1 adds the MLX backend (--backend mlx), with MLX from the mlx-cpu Python wheel that
# scripts/install_deps.sh installs; without it the build needs no MLX.
# Further arguments name targets to build (default: all).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
flavour="${1:-release}"
shift || true
jobs="$(nproc)"
case "$flavour" in
  release) dir=build; args=(-DCMAKE_BUILD_TYPE=Release) ;;
  asan) dir=build-asan; args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCS_SANITIZE=address,undefined" -DCS_BUILD_BENCH=OFF) ;;
  tsan) dir=build-tsan; args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DCS_SANITIZE=thread) ;;
  portable) dir=build-portable; args=(-DCMAKE_BUILD_TYPE=Release -DCS_NATIVE=OFF) ;;
  *) echo "unknown flavour: $flavour (release, asan, tsan, portable)" >&2; exit 2 ;;
esac
if [[ "${CS_WITH_MLX:-0}" == 1 ]]; then
  mlx_dir="$(python3 -c 'import mlx, os; print(os.path.join(list(mlx.__path__)[0], "share", "cmake", "MLX"))')" || {
    echo "CS_WITH_MLX=1: MLX is not installed (pip install mlx-cpu; scripts/install_deps.sh does)" >&2
    exit 1
  }
  args+=(-DCS_WITH_MLX=ON "-DMLX_DIR=$mlx_dir")
else
  args+=(-DCS_WITH_MLX=OFF)
fi
cmake -S "$root" -B "$root/$dir" "${args[@]}" >/dev/null
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$root/$dir" -j "$jobs" "${targets[@]}"
