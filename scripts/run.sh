#!/usr/bin/env bash
# Installs what is needed, builds CortexStream, fetches the default model and runs the main job:
# a chat-formatted generation streamed to the terminal. Arguments are passed to
# `cortexstream generate` (e.g. scripts/run.sh --prompt "Why is the sky blue?" --max-tokens 64).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/install_deps.sh
scripts/fetch_model.sh
scripts/build.sh release cortexstream
if (($# == 0)); then
  set -- --prompt "What is a paged KV cache, in two sentences?"
fi
exec build/src/cli/cortexstream generate --chat --temperature 0 --max-tokens 128 "$@"
