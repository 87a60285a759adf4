#!/usr/bin/env bash
# Installs what is needed, builds CortexStream, fetches the default model and runs the main job:
# the OpenAI-compatible server on http://127.0.0.1:8080 (Ctrl-C stops it cleanly). Arguments are
# passed to `cortexstream serve` (e.g. scripts/run.sh --port 9000 --kv-cache-memory 1GiB).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install_deps.sh
scripts/fetch_model.sh
scripts/build.sh release cortexstream
exec build/src/cli/cortexstream serve "$@"
