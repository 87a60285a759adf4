#!/usr/bin/env bash
# Installs what is needed, builds, and runs every test:
#   1. the Release build's unit tests (ctest) and the Python tests against independent references;
#      the MLX backend's tests (ctest -L mlx) and the server tests with `serve --backend mlx`
#   2. the unit and concurrency tests again under ASan + UBSan
#   3. the concurrency tests under TSan
#   4. a portable build (no -march=native): the kernel and logits-invariance tests on every
#      instruction-set level this CPU has
#   5. the GGUF fuzzer for a bounded time
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
jobs="$(nproc)"

scripts/install_deps.sh
scripts/fetch_model.sh
scripts/fetch_model.sh gemma3-270m  # the second architecture's real model (SentencePiece, K-quants)

echo "== release build (with the MLX backend) and tests"
CS_WITH_MLX=1 scripts/build.sh release
ctest --test-dir build --output-on-failure -j "$jobs" -LE mlx
echo "== python tests (independent references)"
CORTEXSTREAM_BIN="$root/build/src/cli/cortexstream" python3 -m pytest -q tests/python

echo "== MLX backend: its unit tests, and the server tests served by it"
ctest --test-dir build --output-on-failure -L mlx --no-tests=error
CORTEXSTREAM_BIN="$root/build/src/cli/cortexstream" CORTEXSTREAM_BACKEND=mlx \
  python3 -m pytest -q tests/python/test_server.py

echo "== ASan + UBSan"
scripts/build.sh asan
ctest --test-dir build-asan --output-on-failure -j "$jobs" -LE model

echo "== TSan (concurrency tests)"
scripts/build.sh tsan test_kv_concurrency test_kv_tiers test_thread_pool test_engine_batching test_http_server
ctest --test-dir build-tsan --output-on-failure -L concurrency --no-tests=error

echo "== portable build (kernel levels chosen at run time)"
scripts/build.sh portable test_kernels test_logits_invariance
ctest --test-dir build-portable --output-on-failure -j "$jobs" -R "^(Isa|Quantize|PackedMatmul|Matmul|Weights|Ops|Attention|Precisions)" --no-tests=error

if [[ -x scripts/fuzz.sh ]]; then
  echo "== fuzzing"
  scripts/fuzz.sh "${CS_FUZZ_SECONDS:-60}"
fi
echo "all tests passed"
